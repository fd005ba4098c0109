"""crdt-merge: replicated, deterministic model merging.

Sites hold replicas of a merge project: a grow-only set of signed, content-addressed ops
(contributions, retracts, recipes) plus the tensor pieces they reference. Replicas sync in
any order and topology; each resolves the same checkpoint, byte for byte.
"""

import os as _os

# MKL must see this before torch loads it: conditional numerical reproducibility, so BLAS
# gives the same bits on every CPU (DESIGN section 4). Set here, before anything imports
# torch; torch itself is imported only by the modules that compute.
_os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

__version__ = "0.1.0"
#: the version of the numeric rules (crdt_merge.numeric): bump it when any rounding or
#: reduction changes bytes. Here, not in numeric.py, so reading it never loads torch.
NUMERIC_VERSION = "1"
ENGINE = f"crdt-merge/{__version__}"
