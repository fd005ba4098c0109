"""Model breadcrumbs: drop each task vector's largest outliers and its small tail.

Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", https://arxiv.org/abs/2312.06795.

Per donor, with ``n`` entries: the ``int(gamma * n)`` largest magnitudes go, then the
smallest, so that ``int(density * n)`` remain (fewer outliers go if that is impossible);
ties at either edge are ranked by flat index (lower index = larger). Then the
task-arithmetic sum (``breadcrumbs``) or the TIES sign consensus (``breadcrumbs_ties``).
Defaults as mergekit: ``gamma: 0.01``, ``normalize: false``, ``rescale: false``.
"""

from __future__ import annotations

from crdt_merge.methods import sparsify
from crdt_merge.methods.base import Bound, ParamSpec, TensorJob
from crdt_merge.methods.select import Magnitudes
from crdt_merge.methods.sparsify import Keep
from crdt_merge.methods.task_arithmetic import register_gta

PAPER = "https://arxiv.org/abs/2312.06795"
GAMMA = ParamSpec(
    "gamma", "per_model", float, 0.01, low=0.0, high=1.0, doc="fraction of outliers dropped"
)


def outlier_sparsifier(
    i: int, mags: Magnitudes, delta_of: object, job: TensorJob, bound: Bound
) -> Keep | None:
    """Keep donor ``i``'s middle band of magnitudes."""
    p = bound.per_donor[i]
    n = job.donors[i].numel()
    return sparsify.magnitude_outliers(mags, n, float(p["density"]), float(p["gamma"]))


BREADCRUMBS = register_gta("breadcrumbs", PAPER, outlier_sparsifier, consensus=False,
                           normalize=False, rescale=False, extra=(GAMMA,))
BREADCRUMBS_TIES = register_gta("breadcrumbs_ties", PAPER, outlier_sparsifier, consensus=True,
                                normalize=False, rescale=False, extra=(GAMMA,))
