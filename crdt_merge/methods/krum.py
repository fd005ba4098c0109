"""Krum and Multi-Krum: keep the donors whose task vectors sit closest to the others.

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017, https://papers.nips.cc/paper/6617 (Krum; Multi-Krum averages the
``m`` best). Whole-model methods: resolve scores each contribution over the whole model
(:mod:`crdt_merge.resolve.krum`: the sum of its ``n - f - 2`` smallest squared distances
to the others' task vectors, ties broken by op id), keeps ``1`` (``krum``) or ``m``
(``multi_krum``, default ``n - f``) and records the choice in the plan. The per-tensor rule
here then merges the kept donors: the mean of their task vectors,
``out = b + (((0 + d_0) + d_1) + ...) / k`` (for ``krum``, ``k = 1``: the chosen donor).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crdt_merge.methods.base import Bound, Method, ParamSpec, Raw, register, via_raw
from crdt_merge.methods.reduce import BLOCK, blocks
from crdt_merge.numeric import round_raw, widen_raw


def mean_task_vector(bound: Bound, base: Raw | None, donors: Sequence[Raw], out: Raw) -> None:
    """``b + (sum_i d_i) / k`` elementwise (canonical order, from ``+0``)."""
    if base is None:
        raise ValueError("krum needs a base")
    n = out.values.size
    wide, acc, term = (np.empty(min(n, BLOCK)) for _ in range(3))
    for s, e in blocks(n):
        k = e - s
        b = widen_raw(base.values[s:e], base.dtype, wide[:k])
        m, t = acc[:k], term[:k]
        m.fill(0.0)
        for x in donors:
            np.subtract(widen_raw(x.values[s:e], x.dtype, t), b, out=t)
            np.add(m, t, out=m)
        if donors:
            np.divide(m, float(len(donors)), out=m)
        np.add(b, m, out=m)
        round_raw(m, out.dtype, out.values[s:e])


_F = ParamSpec("f", "global", int, 1, low=0,
               doc="donors assumed hostile (n - f - 2 >= 1 neighbours are scored)")

KRUM = register(
    Method(
        name="krum",
        paper="https://papers.nips.cc/paper/6617",
        base="required",
        params=(_F,),
        kernel=via_raw(mean_task_vector),
        raw_kernel=mean_task_vector,
        min_donors=1,
        streaming=True,
    ),
    per_tensor=False,
)

MULTI_KRUM = register(
    Method(
        name="multi_krum",
        paper="https://papers.nips.cc/paper/6617",
        base="required",
        params=(_F, ParamSpec("m", "global", int, None, low=1,
                              doc="donors kept (default n - f)")),
        kernel=via_raw(mean_task_vector),
        raw_kernel=mean_task_vector,
        min_donors=1,
        streaming=True,
    ),
    per_tensor=False,
)
