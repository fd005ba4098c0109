"""Robust aggregation of task vectors: coordinate-wise median and trimmed mean.

Federated learning's answer to a donor that is broken or hostile (Yin et al., "Byzantine-
Robust Distributed Learning: Towards Optimal Statistical Rates", https://arxiv.org/abs/1803.01498,
coordinate-wise median and trimmed mean). Here over the donors' task vectors
``d_i = x_i - b``, per element ``k``:

* ``median``: the middle of the sorted ``d_i[k]`` (even counts: ``((+0 + lo) + hi) / 2``);
* ``trimmed_mean``: sort, drop the ``trim`` smallest and ``trim`` largest, and average the
  rest in ascending order, ``((+0 + v_0) + v_1 + ...) / (n - 2 trim)``; with unequal
  weights, ``sum w v / sum w`` over the kept ``(value, weight)`` pairs, sorted by value and
  then by weight (so which of two equal values is dropped never depends on donor order).

``out = b + m``. Sorting is exact and the sums run in sorted order, so the result is a
function of the multiset of donors: donor order cannot change a byte. Both are elementwise,
so they have raw kernels and resolve streams them like linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crdt_merge.errors import BadParameter
from crdt_merge.methods.base import Bound, Method, ParamSpec, Raw, register, via_raw
from crdt_merge.methods.reduce import BLOCK, blocks
from crdt_merge.numeric import round_raw, widen_raw


def _deltas(donors: Sequence[Raw], s: int, e: int, b: np.ndarray, d: np.ndarray) -> None:
    """``d[i] = widen(x_i[s:e]) - b`` for every donor (``b`` already widened)."""
    for i, x in enumerate(donors):
        np.subtract(widen_raw(x.values[s:e], x.dtype, d[i]), b, out=d[i])


def _run(base: Raw | None, donors: Sequence[Raw], out: Raw, reduce_block) -> None:
    """Walk the tensor in blocks: widen, take deltas, reduce them with ``reduce_block``
    (which fills ``m`` from the ``(donors, block)`` deltas), add the base, round once."""
    if base is None:
        raise ValueError("robust methods need a base")
    n = out.values.size
    size = min(n, BLOCK)
    wide = np.empty(size)
    d = np.empty((len(donors), size))
    m = np.empty(size)
    for s, e in blocks(n):
        k = e - s
        b = widen_raw(base.values[s:e], base.dtype, wide[:k])
        if not donors:
            round_raw(b, out.dtype, out.values[s:e])
            continue
        dk = d[:, :k]
        _deltas(donors, s, e, b, dk)
        reduce_block(dk, m[:k])
        np.add(b, m[:k], out=m[:k])  # b + m
        round_raw(m[:k], out.dtype, out.values[s:e])


def sort_rows(d: np.ndarray) -> None:
    """Sort each column of ``d`` (donors x elements) in place, ascending; exact.

    An odd-even transposition network of ``minimum``/``maximum`` (k rounds of whole-row
    operations: far faster than sorting each column of a few values on its own). NaN would
    spread through the network, so a block holding one is sorted by ``np.sort`` instead
    (NaN last)."""
    k = d.shape[0]
    if k < 2:
        return
    if np.isnan(d).any():
        d.sort(axis=0)
        return
    tmp = np.empty_like(d[0])
    for rnd in range(k):
        for i in range(rnd % 2, k - 1, 2):
            np.minimum(d[i], d[i + 1], out=tmp)
            np.maximum(d[i], d[i + 1], out=d[i + 1])
            d[i] = tmp


def median_of(d: np.ndarray, m: np.ndarray) -> None:
    """The coordinate-wise median of the rows of ``d`` into ``m`` (sorts ``d`` in place)."""
    sort_rows(d)  # exact; equal values (and +-0) are interchangeable below
    count = d.shape[0]
    mid = count // 2
    m.fill(0.0)
    if count % 2:
        np.add(m, d[mid], out=m)  # +0 + v: a -0 middle becomes +0
    else:
        np.add(m, d[mid - 1], out=m)
        np.add(m, d[mid], out=m)
        np.divide(m, 2.0, out=m)


def _median(bound: Bound, base: Raw | None, donors: Sequence[Raw], out: Raw) -> None:
    _run(base, donors, out, median_of)


def trim_count(bound: Bound, donors: int) -> int:
    """The ``trim`` parameter, checked against the donor count (at least one value kept)."""
    trim = int(bound.options["trim"])
    if donors and 2 * trim >= donors:
        raise BadParameter(
            f"trimmed_mean: trim={trim} drops {2 * trim} of {donors} values per entry, "
            f"leaving none; use trim < {(donors + 1) // 2} or add donors"
        )
    return trim


def trimmed_of(d: np.ndarray, m: np.ndarray, trim: int, weights: Sequence[float]) -> None:
    """The trimmed mean of the rows of ``d`` into ``m`` (see the module docstring)."""
    count = d.shape[0]
    kept = range(trim, count - trim)
    m.fill(0.0)
    if len(set(weights)) <= 1:  # equal weights: the plain mean of the kept values
        sort_rows(d)
        for j in kept:
            np.add(m, d[j], out=m)
        np.divide(m, float(len(kept)), out=m)
        return
    w = np.broadcast_to(np.asarray(weights, dtype=np.float64)[:, None], d.shape)
    order = np.lexsort((w, d), axis=0)  # by value, then by weight: a total order of pairs
    v = np.take_along_axis(d, order, axis=0)
    ws = np.take_along_axis(w, order, axis=0)
    total = np.zeros_like(m)
    for j in kept:
        np.add(m, v[j] * ws[j], out=m)
        np.add(total, ws[j], out=total)
    np.divide(m, total, out=m)


def _trimmed_mean(bound: Bound, base: Raw | None, donors: Sequence[Raw], out: Raw) -> None:
    trim = trim_count(bound, len(donors))
    weights = [float(w) for w in bound.column("weight")]
    _run(base, donors, out, lambda d, m: trimmed_of(d, m, trim, weights))


MEDIAN = register(
    Method(
        name="median",
        paper="https://arxiv.org/abs/1803.01498",
        base="required",
        params=(),
        kernel=via_raw(_median),
        raw_kernel=_median,
        min_donors=1,
        streaming=True,
    )
)

TRIMMED_MEAN = register(
    Method(
        name="trimmed_mean",
        paper="https://arxiv.org/abs/1803.01498",
        base="required",
        params=(
            ParamSpec("trim", "global", int, 1, low=0,
                      doc="values dropped at each end, per entry (2*trim < donors)"),
            ParamSpec("weight", "per_model", float, 1.0, low=0.0, low_open=True,
                      doc="the donor's weight among the kept values"),
        ),
        kernel=via_raw(_trimmed_mean),
        raw_kernel=_trimmed_mean,
        min_donors=1,
        streaming=True,
    )
)
