"""TIES-merging: trim each task vector to its largest entries, elect signs, average.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
https://arxiv.org/abs/2306.01708.

Each delta keeps its ``max(1, int(density * n))`` largest magnitudes (ties at the threshold:
lower flat index wins), then the generalized task-arithmetic merge with sign consensus
(:mod:`.task_arithmetic`). Defaults as mergekit: ``normalize: true``, ``rescale: false``.
"""

from __future__ import annotations

from crdt_merge.methods import sparsify
from crdt_merge.methods.base import Bound, TensorJob
from crdt_merge.methods.select import Magnitudes
from crdt_merge.methods.sparsify import Keep
from crdt_merge.methods.task_arithmetic import register_gta


def magnitude_sparsifier(
    i: int, mags: Magnitudes, delta_of: object, job: TensorJob, bound: Bound
) -> Keep | None:
    """Keep donor ``i``'s ``density`` share of largest magnitudes."""
    n = job.donors[i].numel()
    return sparsify.magnitude(mags, n, float(bound.per_donor[i]["density"]))


TIES = register_gta("ties", "https://arxiv.org/abs/2306.01708", magnitude_sparsifier,
                    consensus=True, normalize=True, rescale=False)
