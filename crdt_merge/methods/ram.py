"""RAM and RAM+ (tensor-local): average where task vectors overlap, keep them where unique.

"Reinforced Agent Merging", https://arxiv.org/abs/2601.13572 (mergekit 0.1.5's ``ram`` and
``ramplus_tl``).

With ``d_i = x_i - b``, donor ``i`` *contributes* to element ``k`` iff
``|d_i[k]| > epsilon``; ``c[k]`` counts the contributors. Then, summing over donors in
canonical order from ``+0``:

* ``ram``: ``out = b + sum_i [i contributes] * (d_i if c == 1 else d_i / c)``;
* ``ramplus_tl``: per donor, over the whole tensor, ``S_i`` = the elements it shares
  (contributes and ``c > 1``), ``U_i`` = those only it contributes to,
  ``rho_i = S_i / max(U_i, epsilon)`` and ``lambda_i = 1 + r * min(max(rho_i, 0), alpha)``;
  unique entries are scaled by ``lambda_i``:
  ``out = b + sum_i [i contributes] * (d_i * lambda_i if c == 1 else d_i / c)``.

``ram`` is elementwise (a raw kernel, streamed); ``ramplus_tl`` needs the counts of the
whole tensor first (two passes over the blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crdt_merge.methods.base import Bound, Method, ParamSpec, Raw, register, via_raw
from crdt_merge.methods.reduce import BLOCK, blocks
from crdt_merge.numeric import round_raw, widen_raw

_EPS = ParamSpec("epsilon", "global", float, 1e-5, low=0.0,
                 doc="a delta counts where its magnitude exceeds this")


def _block_deltas(base: Raw, donors: Sequence[Raw], s: int, e: int, eps: float,
                  b: np.ndarray, d: np.ndarray, nz: np.ndarray, count: np.ndarray) -> None:
    """Widen, take deltas ``d``, their contribution mask ``nz`` and the count."""
    k = e - s
    np.copyto(b[:k], widen_raw(base.values[s:e], base.dtype, b[:k]))  # F64: a view
    count[:k] = 0
    for i, x in enumerate(donors):
        np.subtract(widen_raw(x.values[s:e], x.dtype, d[i, :k]), b[:k], out=d[i, :k])
        np.greater(np.abs(d[i, :k]), eps, out=nz[i, :k])
        np.add(count[:k], nz[i, :k], out=count[:k])


def _merge(base: Raw | None, donors: Sequence[Raw], out: Raw, eps: float,
           lambdas: Sequence[float]) -> None:
    if base is None:
        raise ValueError("ram needs a base")
    n = out.values.size
    size = min(n, BLOCK)
    b, acc, term = (np.empty(size) for _ in range(3))
    d = np.empty((len(donors), size))
    nz = np.empty((len(donors), size), dtype=bool)
    count = np.empty(size, dtype=np.int64)
    for s, e in blocks(n):
        k = e - s
        if not donors:
            round_raw(widen_raw(base.values[s:e], base.dtype, b[:k]), out.dtype, out.values[s:e])
            continue
        _block_deltas(base, donors, s, e, eps, b, d, nz, count)
        c = count[:k]
        unique = c == 1
        divisor = np.maximum(c, 1).astype(np.float64)
        m, t = acc[:k], term[:k]
        m.fill(0.0)
        for i, lam in enumerate(lambdas):
            np.divide(d[i, :k], divisor, out=t)  # shared: d / c
            if lam != 1.0:
                np.copyto(t, d[i, :k] * lam, where=unique)  # unique: d * lambda
            np.multiply(t, nz[i, :k], out=t)  # not contributing: 0
            np.add(m, t, out=m)
        np.add(b[:k], m, out=m)
        round_raw(m, out.dtype, out.values[s:e])


def _ram(bound: Bound, base: Raw | None, donors: Sequence[Raw], out: Raw) -> None:
    _merge(base, donors, out, float(bound.options["epsilon"]), [1.0] * len(donors))


def ramplus_lambdas(base: Raw, donors: Sequence[Raw], eps: float, r: float,
                    alpha: float) -> list[float]:
    """``lambda_i`` of ``ramplus_tl`` (see the module docstring): exact integer counts."""
    n = base.values.size
    size = min(n, BLOCK)
    b = np.empty(size)
    d = np.empty((len(donors), size))
    nz = np.empty((len(donors), size), dtype=bool)
    count = np.empty(size, dtype=np.int64)
    shared = [0] * len(donors)
    unique = [0] * len(donors)
    for s, e in blocks(n):
        k = e - s
        _block_deltas(base, donors, s, e, eps, b, d, nz, count)
        one = count[:k] == 1
        for i in range(len(donors)):
            u = int(np.count_nonzero(nz[i, :k] & one))
            unique[i] += u
            shared[i] += int(np.count_nonzero(nz[i, :k])) - u
    out = []
    for sh, un in zip(shared, unique, strict=True):
        rho = float(sh) / max(float(un), eps)
        out.append(1.0 + r * min(max(rho, 0.0), alpha))
    return out


def _ramplus(bound: Bound, base: Raw | None, donors: Sequence[Raw], out: Raw) -> None:
    if base is None:
        raise ValueError("ramplus_tl needs a base")
    eps = float(bound.options["epsilon"])
    lambdas = ramplus_lambdas(base, donors, eps, float(bound.options["r"]),
                              float(bound.options["alpha"]))
    _merge(base, donors, out, eps, lambdas)


RAM = register(
    Method(
        name="ram",
        paper="https://arxiv.org/abs/2601.13572",
        base="required",
        params=(_EPS,),
        kernel=via_raw(_ram),
        raw_kernel=_ram,
        min_donors=0,
        streaming=True,
    )
)

RAMPLUS_TL = register(
    Method(
        name="ramplus_tl",
        paper="https://arxiv.org/abs/2601.13572",
        base="required",
        params=(
            ParamSpec("r", "global", float, 0.1, doc="gain on unique entries per shared ratio"),
            ParamSpec("alpha", "global", float, 0.2, doc="cap on the shared/unique ratio"),
            _EPS,
        ),
        kernel=via_raw(_ramplus),
        min_donors=0,
        streaming=True,
    )
)
