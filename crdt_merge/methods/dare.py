"""DARE: drop task-vector entries at random and rescale the rest (linear or with TIES signs).

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as
a Free Lunch", https://arxiv.org/abs/2311.03099.

Each entry of donor ``i``'s delta is kept iff ``u_j < density``, ``u`` being the BLAKE3
counter-based uniforms of ``job.keys[i]`` (:mod:`.rng`): the mask depends on the key and the
entry's flat index only. With ``rescale`` (the default, as in mergekit) the kept entries are
scaled to the delta's L1 norm. ``dare_linear`` then adds the deltas
(``normalize: false`` by default), ``dare_ties`` elects signs first.
"""

from __future__ import annotations

from crdt_merge.lazy import torch
from crdt_merge.methods import sparsify
from crdt_merge.methods.base import Bound, Method, TensorJob, register
from crdt_merge.methods.select import Magnitudes
from crdt_merge.methods.sparsify import Keep
from crdt_merge.methods.task_arithmetic import gta_params, merge_task_vectors

PAPER = "https://arxiv.org/abs/2311.03099"


def random_sparsifier(
    i: int, mags: Magnitudes, delta_of: object, job: TensorJob, bound: Bound
) -> Keep | None:
    """Keep each entry of donor ``i`` with probability ``density``."""
    n = job.donors[i].numel()
    return sparsify.random(job.keys[i], n, float(bound.per_donor[i]["density"]))


def _dare_ties(job: TensorJob, bound: Bound) -> torch.Tensor:
    return merge_task_vectors(job, bound, random_sparsifier, consensus=True)


def _dare_linear(job: TensorJob, bound: Bound) -> torch.Tensor:
    return merge_task_vectors(job, bound, random_sparsifier, consensus=False)


DARE_TIES = register(
    Method(
        name="dare_ties",
        paper=PAPER,
        base="required",
        params=gta_params(normalize=False, rescale=True),
        kernel=_dare_ties,
        streaming=True,
        min_donors=0,
        random=True,
    )
)

DARE_LINEAR = register(
    Method(
        name="dare_linear",
        paper=PAPER,
        base="required",
        params=gta_params(normalize=False, rescale=True),
        kernel=_dare_linear,
        streaming=True,
        min_donors=0,
        random=True,
    )
)
