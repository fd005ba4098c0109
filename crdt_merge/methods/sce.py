"""SCE: select salient elements, calculate weights from their energy, erase sign conflicts.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", https://arxiv.org/abs/2408.07990
(mergekit 0.1.5's ``sce``). With ``d_i = x_i - b`` over ``N`` donors and ``n`` elements:

1. Select (``select_topk < 1``): per element the population variance of the donors'
   deltas, ``mu = (sum_i d_i) / N``, ``var = (sum_i (d_i - mu)^2) / N``; with ``z`` the
   number of nonzero variances, keep the ``int(z * select_topk)`` largest (exact ranks, ties
   to the lower flat index; none if that is 0 or ``select_topk <= 0``) in every ``d_i``.
2. Calculate: ``e_i = fixed_sum(d_i * d_i) / n``; ``w_i = e_i / sum_i e_i``, or ``1/N``
   for all when ``|sum_i e_i| < 1e-6``.
3. Erase: the elected sign ``g`` (TIES's rule: the sum in ascending order of value
   ``>= 0`` elects ``+``); ``a_i = [sign(d_i) == g] * w_i`` (a zero delta never agrees);
   ``out = b + (sum_i d_i * a_i) / max(sum_i a_i, 1e-6)``.

Sums over donors are in canonical order from ``+0``.
"""

from __future__ import annotations

import numpy as np

from crdt_merge.lazy import torch
from crdt_merge.methods.base import Bound, Method, ParamSpec, TensorJob, register
from crdt_merge.methods.reduce import tree_sum
from crdt_merge.methods.select import rank_band
from crdt_merge.methods.task_arithmetic import elected_sign

WEIGHT_EPS = 1e-6
DIVISOR_EPS = 1e-6


def variance(d: list[np.ndarray]) -> np.ndarray:
    """The population variance across donors, per element (fixed donor order)."""
    count = float(len(d))
    mu = np.zeros_like(d[0])
    for x in d:
        mu = mu + x
    mu = mu / count
    acc = np.zeros_like(d[0])
    for x in d:
        t = x - mu
        acc = acc + t * t
    return acc / count


def select_mask(d: list[np.ndarray], topk: float) -> np.ndarray | None:
    """The shared keep mask of step 1, or None when everything is kept."""
    if topk >= 1:
        return None
    n = d[0].size
    if topk <= 0:
        return np.zeros(n, dtype=bool)
    var = variance(d)
    k = int(float(np.count_nonzero(var)) * topk)
    if k == 0:
        return np.zeros(n, dtype=bool)
    vt = torch.from_numpy(var)
    band = rank_band(lambda s, e, step=1: vt[s:e:step], n, 0, k)
    return band.block(vt, 0).numpy()


def energy_weights(d: list[np.ndarray]) -> list[float]:
    """Step 2's ``w_i``."""
    n = d[0].size
    energies = []
    for x in d:
        xt = torch.from_numpy(x)
        energies.append(tree_sum(lambda s, e, xt=xt: xt[s:e] * xt[s:e], n) / n)
    total = 0.0
    for v in energies:
        total = total + v
    if abs(total) < WEIGHT_EPS:
        return [1.0 / len(d)] * len(d)
    return [v / total for v in energies]


def _sce(job: TensorJob, bound: Bound) -> torch.Tensor:
    if job.base is None:
        raise ValueError("sce needs a base")
    shape = job.base.shape
    b = job.base.reshape(-1).numpy()
    if not job.donors:
        return job.base
    d = [x.reshape(-1).numpy() - b for x in job.donors]
    mask = select_mask(d, float(bound.options["select_topk"]))
    if mask is not None:
        d = [x * mask for x in d]
    weights = energy_weights(d)
    g = elected_sign([torch.from_numpy(x) for x in d]).numpy()
    merged = np.zeros_like(b)
    total = np.zeros_like(b)
    for x, w in zip(d, weights, strict=True):
        a = (np.sign(x) == g) * w
        merged = merged + x * a
        total = total + a
    out = b + merged / np.maximum(total, DIVISOR_EPS)
    return torch.from_numpy(out).reshape(shape)


SCE = register(
    Method(
        name="sce",
        paper="https://arxiv.org/abs/2408.07990",
        base="required",
        params=(
            ParamSpec("select_topk", "global", float, 1.0, low=0.0, high=1.0,
                      doc="fraction of highest-variance elements kept"),
            ParamSpec("int8_mask", "global", bool, False, doc="accepted; no effect here"),
        ),
        kernel=_sce,
        min_donors=0,
    )
)
