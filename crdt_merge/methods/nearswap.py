"""NearSwap: take the donor's value where it is already near the base's.

alchemonaut, QuartetAnemoi-70B-t0.0001 (mergekit's reference for the method),
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001.

Per element, with base ``a`` and the one donor ``x``:
``w = min(max(t / max(|a - x|, 1e-6), 0), 1)`` and ``out = w*x + (1 - w)*a``, in that
order of operations (mergekit's), in float64. Elementwise: a raw kernel, streamed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crdt_merge.methods.base import Bound, Method, ParamSpec, Raw, register, via_raw
from crdt_merge.methods.reduce import BLOCK, blocks
from crdt_merge.numeric import round_raw, widen_raw

FLOOR = 1e-6


def _nearswap(bound: Bound, base: Raw | None, donors: Sequence[Raw], out: Raw) -> None:
    if base is None:
        raise ValueError("nearswap needs a base")
    (donor,) = donors
    t = float(bound.options["t"])
    n = out.values.size
    wa, wx, w, tmp = (np.empty(min(n, BLOCK)) for _ in range(4))
    for s, e in blocks(n):
        k = e - s
        a = widen_raw(base.values[s:e], base.dtype, wa[:k])
        x = widen_raw(donor.values[s:e], donor.dtype, wx[:k])
        ww, tt = w[:k], tmp[:k]
        np.subtract(a, x, out=ww)
        np.abs(ww, out=ww)
        np.maximum(ww, FLOOR, out=ww)
        np.divide(t, ww, out=ww)
        np.clip(ww, 0.0, 1.0, out=ww)  # weight
        np.subtract(1.0, ww, out=tt)
        np.multiply(tt, a, out=tt)  # (1 - w) * a
        np.multiply(ww, x, out=ww)  # w * x
        np.add(ww, tt, out=ww)
        round_raw(ww, out.dtype, out.values[s:e])


NEARSWAP = register(
    Method(
        name="nearswap",
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        base="required",
        params=(ParamSpec("t", "global", float, doc="distance below which the donor is taken"),),
        kernel=via_raw(_nearswap),
        raw_kernel=_nearswap,
        min_donors=1,
        max_donors=1,
        streaming=True,
    )
)
