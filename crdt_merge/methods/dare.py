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

from crdt_merge.methods import sparsify
from crdt_merge.methods.base import Bound, TensorJob
from crdt_merge.methods.select import Magnitudes
from crdt_merge.methods.sparsify import Keep
from crdt_merge.methods.task_arithmetic import register_gta

PAPER = "https://arxiv.org/abs/2311.03099"


def random_sparsifier(
    i: int, mags: Magnitudes, delta_of: object, job: TensorJob, bound: Bound
) -> Keep | None:
    """Keep each entry of donor ``i`` with probability ``density``."""
    n = job.donors[i].numel()
    return sparsify.random(job.keys[i], n, float(bound.per_donor[i]["density"]))


DARE_TIES = register_gta("dare_ties", PAPER, random_sparsifier, consensus=True,
                         normalize=False, rescale=True, random=True)
DARE_LINEAR = register_gta("dare_linear", PAPER, random_sparsifier, consensus=False,
                           normalize=False, rescale=True, random=True)
