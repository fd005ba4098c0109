"""crdt-merge: replicated, deterministic model merging.

Sites hold replicas of a merge project: a grow-only set of signed, content-addressed ops
(contributions, retracts, recipes) plus the tensor pieces they reference. Replicas sync in
any order and topology; each resolves the same checkpoint, byte for byte.
"""

from crdt_merge import numeric as _numeric  # noqa: F401  (sets MKL_CBWR before torch loads)

__version__ = "0.1.0"
ENGINE = f"crdt-merge/{__version__}"
