"""Exact rank selection by magnitude, without sorting the tensor.

Magnitudes are ranked in one total order: larger ``|d|`` first, and among equal magnitudes
the LOWER flat index first. "Keep the top k" therefore keeps, among ties at the threshold,
the elements that come first in row-major order; mergekit's unstable ``argsort`` leaves
that choice to the sort kernel.

A selection of the descending ranks ``[r0, r1)`` is summed up by a :class:`Band`: the lowest
and highest kept magnitudes and, for each, the flat index where the equal elements stop
(resp. start) being kept. Any block of the tensor can then be masked on its own, so the
mask never has to be stored.

The boundary values are found without a sort: a fixed strided sample brackets each wanted
rank, one blockwise pass counts the elements above each bracket and collects those inside
it (value and flat index), and ``torch.kthvalue`` runs on the collected few. If a bracket
misses (the exact counts tell), the pass is repeated with an unbounded bracket. Every path
yields the same exact values, so the result never depends on the sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from crdt_merge.lazy import torch
from crdt_merge.methods.reduce import blocks

Magnitudes = Callable[..., "torch.Tensor"]
"""``mags(start, stop, step=1)``: non-negative float64 magnitudes of flat elements."""

_SAMPLE = 1 << 16


@dataclass(frozen=True)
class Band:
    """The elements of descending rank ``[r0, r1)`` (see the module docstring).

    Attributes:
        lo: the smallest kept magnitude; elements above it are kept (up to ``hi``).
        lo_cut: elements equal to ``lo`` are kept iff their flat index is ``< lo_cut``.
        hi: the largest kept magnitude, or ``None`` when nothing above is dropped.
        hi_cut: elements equal to ``hi`` are kept iff their flat index is ``>= hi_cut``.
        empty: nothing is kept.
    """

    lo: float = 0.0
    lo_cut: int = 0
    hi: float | None = None
    hi_cut: int = 0
    empty: bool = False

    def block(self, a: torch.Tensor, start: int) -> torch.Tensor:
        """The keep mask of the block of magnitudes ``a`` that starts at flat ``start``."""
        if self.empty:
            return torch.zeros(a.shape, dtype=torch.bool)
        stop = start + a.numel()
        if self.lo_cut >= stop:
            keep = a >= self.lo
        elif self.lo_cut <= start:
            keep = a > self.lo
        else:
            index = torch.arange(start, stop)
            keep = (a > self.lo) | ((a == self.lo) & (index < self.lo_cut))
        if self.hi is not None:
            if self.hi_cut <= start:
                keep &= a <= self.hi
            elif self.hi_cut >= stop:
                keep &= a < self.hi
            else:
                index = torch.arange(start, stop)
                keep &= (a < self.hi) | ((a == self.hi) & (index >= self.hi_cut))
        return keep

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """``x`` (a block of deltas or of their magnitudes, from flat ``start``) with the
        entries outside the band set to zero; ``x`` may be modified in place."""
        if self.empty:
            return torch.zeros_like(x)
        if self.hi is None and (self.lo_cut >= start + x.numel() or self.lo_cut <= start):
            # one comparison: keep |x| >= lo before the cut, |x| > lo after it
            if self.lo_cut <= start:
                return torch.nn.functional.hardshrink(x, self.lo)
            if self.lo <= 0:
                return x
            return torch.nn.functional.hardshrink(x, math.nextafter(self.lo, -math.inf))
        return x.mul_(self.block(x.abs(), start))

    def mask(self, mags: Magnitudes, n: int) -> torch.Tensor:
        """The whole flat keep mask (for tests and small tensors)."""
        return torch.cat(
            [self.block(mags(s, e), s) for s, e in blocks(n)] or [torch.zeros(0, dtype=torch.bool)]
        )


@dataclass
class _Wanted:
    rank: int
    lo: float
    hi: float
    above: int = 0
    values: list = field(default_factory=list)


def _brackets(mags: Magnitudes, n: int, ranks: list[int]) -> list[_Wanted]:
    if n <= 4 * _SAMPLE:
        return [_Wanted(r, -math.inf, math.inf) for r in ranks]
    step = n // _SAMPLE
    sample = torch.sort(mags(0, n, step), descending=True).values
    m = sample.numel()
    out = []
    for r in ranks:
        est = r * m / n
        slack = 4.0 * math.sqrt(est + 1.0) + 2.0
        q_hi, q_lo = int(est - slack), int(est + slack) + 1
        hi = math.inf if q_hi < 0 else float(sample[q_hi])
        lo = -math.inf if q_lo >= m else float(sample[q_lo])
        out.append(_Wanted(r, lo, hi))
    return out


def _collect(mags: Magnitudes, n: int, wanted: list[_Wanted]) -> None:
    """One pass: count the elements above each bracket, gather those inside it."""
    for w in wanted:
        w.above, w.values = 0, []
    for s, e in blocks(n):
        a = mags(s, e)
        for w in wanted:
            above = a > w.hi
            w.above += int(torch.count_nonzero(above))
            w.values.append(torch.masked_select(a, (a >= w.lo) & ~above))


def _resolve(w: _Wanted) -> tuple[float, int, int] | None:
    """The value at ``w.rank``, how many are above it and how many equal it."""
    values = torch.cat(w.values)
    inner = w.rank - w.above
    if not 0 <= inner < values.numel():
        return None
    v = float(torch.kthvalue(values, values.numel() - inner).values)
    above = w.above + int(torch.count_nonzero(values > v))
    return v, above, int(torch.count_nonzero(values == v))


def _select(mags: Magnitudes, n: int, ranks: list[int]) -> list[tuple[float, int, int]]:
    wanted = _brackets(mags, n, ranks)
    _collect(mags, n, wanted)
    found = [_resolve(w) for w in wanted]
    missed = [w for w, f in zip(wanted, found, strict=True) if f is None]
    if missed:  # only for data the sample misrepresents: select over everything
        for w in missed:
            w.lo, w.hi = -math.inf, math.inf
        _collect(mags, n, missed)
        redo = iter(_resolve(w) for w in missed)
        found = [f if f is not None else next(redo) for f in found]
    return found  # type: ignore[return-value]


def _position(mags: Magnitudes, n: int, v: float, j: int) -> int:
    """The flat index of the ``j``-th (0-based) element whose magnitude equals ``v``."""
    seen = 0
    for s, e in blocks(n):
        eq = mags(s, e) == v
        count = int(torch.count_nonzero(eq))
        if seen + count > j:
            return s + int(torch.nonzero(eq).reshape(-1)[j - seen])
        seen += count
    raise ValueError(f"fewer than {j + 1} magnitudes equal {v}")


def rank_band(mags: Magnitudes, n: int, r0: int, r1: int) -> Band:
    """The :class:`Band` of descending ranks ``[r0, r1)`` (clipped to ``[0, n)``)."""
    r0, r1 = max(0, r0), min(n, r1)
    if r1 <= r0:
        return Band(empty=True)
    if r0 == 0 and r1 == n:
        return Band(lo=-math.inf, lo_cut=n)
    ranks = [r1 - 1] + ([r0] if r0 > 0 else [])
    found = _select(mags, n, ranks)
    lo, above_lo, equal_lo = found[0]
    keep_lo = r1 - above_lo  # the first keep_lo elements equal to lo are kept
    lo_cut = _position(mags, n, lo, keep_lo) if keep_lo < equal_lo else n
    if r0 == 0:
        return Band(lo=lo, lo_cut=lo_cut)
    hi, above_hi, _ = found[1]
    skip_hi = r0 - above_hi  # the first skip_hi elements equal to hi are dropped
    hi_cut = _position(mags, n, hi, skip_hi) if skip_hi > 0 else 0
    return Band(lo=lo, lo_cut=lo_cut, hi=hi, hi_cut=hi_cut)
