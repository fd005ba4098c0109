"""DELLA: magnitude-aware random dropping (MagPrune), then task arithmetic or TIES signs.

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", https://arxiv.org/abs/2406.11617.

Within each row (the vectors along dim 1; a 1-D tensor is one row) of ``c`` entries, the
entry of ascending magnitude rank ``rank`` (1..c) is kept with probability
``(density - epsilon) + 2 * epsilon * (rank - 1) / (c - 1)``, drawn as ``u_j < p_j`` from the
donor's BLAKE3 uniforms (:mod:`.rng`). With ``rescale`` (default, as mergekit) the kept
entries are scaled to the delta's L1 norm. ``della`` elects signs (``normalize: true``),
``della_linear`` adds (``normalize: false``). ``epsilon`` defaults to 0.15 and must keep
``density +- epsilon`` inside (0, 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from crdt_merge.lazy import torch
from crdt_merge.methods import sparsify
from crdt_merge.methods.base import Bound, ParamSpec, TensorJob
from crdt_merge.methods.select import Magnitudes
from crdt_merge.methods.sparsify import Keep
from crdt_merge.methods.task_arithmetic import register_gta

PAPER = "https://arxiv.org/abs/2406.11617"
EPSILON = ParamSpec(
    "epsilon",
    "per_model",
    float,
    0.15,
    low=0.0,
    high=0.5,
    high_open=True,
    doc="half-width of the keep-probability ramp",
)


def magprune_sparsifier(
    i: int,
    mags: Magnitudes,
    delta_of: Callable[[], torch.Tensor],
    job: TensorJob,
    bound: Bound,
) -> Keep | None:
    """Keep donor ``i``'s entries with rank-dependent probabilities."""
    p = bound.per_donor[i]
    density, epsilon = float(p["density"]), float(p["epsilon"])
    if density >= 1:
        return None
    return sparsify.magprune(delta_of(), job.keys[i], density, epsilon)


def _check(options: Mapping[str, object], mine: Mapping[str, object], where: str) -> None:
    density, epsilon = mine.get("density"), mine.get("epsilon")
    if isinstance(density, float) and isinstance(epsilon, float):
        sparsify.check_magprune(density, epsilon, where)


DELLA = register_gta("della", PAPER, magprune_sparsifier, consensus=True, normalize=True,
                     rescale=True, extra=(EPSILON,), random=True, check=_check)
DELLA_LINEAR = register_gta("della_linear", PAPER, magprune_sparsifier, consensus=False,
                            normalize=False, rescale=True, extra=(EPSILON,), random=True,
                            check=_check)
