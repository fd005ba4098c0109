"""Numeric rules that make a merge give the same bytes on every CPU (DESIGN section 4).

Elementwise float64 ``+ - * /`` and ``sqrt`` are correctly rounded in IEEE 754, so they give
the same bits whatever SIMD width or thread count torch picks. Reductions are not: torch's
``sum`` and ``dot`` change their association with the kernel (default vs AVX2) and with
the thread count. :func:`fixed_sum` reduces with a fixed binary tree of elementwise adds
instead, so its result is a function of the values alone.

Never use ``torch.add(..., alpha=)``, ``addcmul``, ``lerp`` or ``torch.sum`` on merge paths:
they may fuse multiply-add or reorder.
"""

from __future__ import annotations

import threading

import numpy as np

from crdt_merge import NUMERIC_VERSION  # noqa: E402,F401  (re-exported)
from crdt_merge.dtypes import DTYPES, FLOATS
from crdt_merge.lazy import torch


def fixed_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum all elements of ``x`` along a fixed pairwise tree; a 0-d tensor of ``x``'s dtype.

    The tree depends only on ``x.numel()``: pad to a power of two with zeros, then add the
    second half onto the first until one element is left. Every step is an elementwise add,
    so the result is the same on any kernel and any thread count.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros((), dtype=x.dtype)
    size = 1 << (n - 1).bit_length()
    if size != n:
        flat = torch.cat([flat, torch.zeros(size - n, dtype=flat.dtype)])
    while flat.numel() > 1:
        half = flat.numel() // 2
        flat = flat[:half] + flat[half:]
    return flat.reshape(())


def fixed_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` with the fixed tree of :func:`fixed_sum` (float64 in, float64 out)."""
    return fixed_sum(a.reshape(-1) * b.reshape(-1))


def fixed_norm(a: torch.Tensor) -> torch.Tensor:
    """The Euclidean norm of all elements, deterministic as :func:`fixed_sum`."""
    return torch.sqrt(fixed_dot(a, a))


_LOW29 = (1 << 29) - 1
"""The float64 significand bits below float32's."""


_WORK = threading.local()
_WORK_MAX = 1 << 17
"""Temporaries of up to this many elements (the blocks merges work in) come from buffers
each thread keeps: allocating them anew for every block makes the C allocator give memory
back to the system and take it again, page faults and all, many times a second."""


def _tmp(slot: str, dtype: type, n: int) -> np.ndarray:
    """A temporary array of ``n`` elements for this thread's use under the name ``slot``
    (never returned to a caller: the next call with that slot overwrites it)."""
    if n > _WORK_MAX:
        return np.empty(n, dtype)
    bufs = _WORK.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, dtype))
    if buf is None:
        buf = bufs[(slot, dtype)] = np.empty(_WORK_MAX, dtype)
    return buf[:n]


def _to_float32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: ``x`` when it is a float32, else its float32
    neighbour whose last significand bit is one. Rounding to odd first and then to nearest
    even in a format at least two bits narrower equals rounding once (Boldo and Melquiond,
    2008). The result is a temporary (see :func:`_tmp`).

    On the bit pattern (integer operations, exact on every kernel): clear the 29 bits
    below float32's significand and set the lowest kept bit if any of them was one (it is
    one iff ``low + (2**29 - 1)`` carries into bit 29). The result has 24 significant bits,
    so the conversion to float32 is exact wherever float32 is normal (infinities and NaNs
    stay what they are; beyond float32's range it overflows to infinity, as rounding
    would). Values that land below float32's normal range are rare and take the exact
    comparison-based rule, :func:`_round_to_odd_exact`.
    """
    bits = np.ascontiguousarray(x, dtype=np.float64).reshape(-1).view(np.int64)
    n = bits.size
    low = np.bitwise_and(bits, _LOW29, out=_tmp("low", np.int64, n))
    sticky = np.add(low, _LOW29, out=_tmp("sticky", np.int64, n))
    np.bitwise_and(sticky, 1 << 29, out=sticky)
    np.bitwise_xor(bits, low, out=low)  # the bits with the low 29 cleared
    np.bitwise_or(low, sticky, out=low)
    out = _tmp("odd", np.float32, n)
    # beyond float32's range: infinity, as intended; a signalling NaN: quiet, as intended
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(out, low.view(np.float64), casting="same_kind")
    # zero iff the float32 is subnormal and not zero: |out bits| - 1 in [0, 2**23)
    sub = np.bitwise_and(out.view(np.int32), 0x7FFFFFFF, out=_tmp("sub", np.int32, n))
    np.subtract(sub, 1, out=sub)
    np.right_shift(sub, 23, out=sub)
    if np.count_nonzero(sub) < n:
        where = np.flatnonzero(sub == 0)
        out[where] = _round_to_odd_exact(bits.view(np.float64)[where])
    return out


def _round_to_odd_exact(x: np.ndarray) -> np.ndarray:
    """The same rounding as :func:`_to_float32_round_to_odd`, by comparisons: from ``f``,
    ``x`` rounded to nearest, when ``f != x`` and ``f``'s last bit is zero the odd
    neighbour is one ulp from ``f`` toward ``x``: bit pattern plus one when ``|x| > |f|``,
    minus one otherwise (float magnitudes are ordered like their bit patterns, zero and
    subnormals included). ``x - f`` is exact, so its sign tells which way."""
    with np.errstate(over="ignore", invalid="ignore"):
        f = x.astype(np.float32)
        d = x - f.astype(np.float64)
    bits = f.view(np.int32)
    fix = (d != 0) & (d == d) & ((bits & 1) == 0)  # inexact, not NaN, even
    up = (d > 0) == (x > 0)  # |x| > |f|
    step = fix.astype(np.int32) * (up.astype(np.int32) * 2 - 1)
    return (bits + step).view(np.float32)


RAW_DTYPES: dict[str, type] = {name: getattr(np, DTYPES[name].numpy or "") for name in FLOATS}
"""How numpy holds each float dtype's stored bits (numpy has no bfloat16: its bits)."""

_BF16_NAN = 0x7FC0
_F16_NAN = 0x7E00


def widen_raw(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """The float64 values of stored bits ``raw`` of ``dtype`` (``RAW_DTYPES``), exactly.
    Returns ``raw`` itself for float64 (never modify the result in place), else ``out``
    (float64, of ``raw``'s length) filled."""
    if dtype == "F64":
        return raw
    if dtype == "BF16":  # a bfloat16 is the top half of the float32 of the same value
        wide = _tmp("wide", np.uint32, raw.size)
        np.copyto(wide, raw)
        np.left_shift(wide, 16, out=wide)
        raw = wide.view(np.float32)
    with np.errstate(invalid="ignore"):  # a signalling NaN arrives quiet: still a NaN
        np.copyto(out, raw)
    return out


def round_raw(x: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Round the float64 values ``x`` once to ``dtype`` (to nearest, ties to even), into
    ``out``, that dtype's stored bits (``RAW_DTYPES``).

    bfloat16 and float16 go through float32 rounded to odd (a second rounding to a format
    this much narrower is then exact). A NaN becomes one fixed pattern (bfloat16 ``0x7FC0``,
    float16 the sign and ``0x7E00``), not whatever a conversion kernel makes of its payload:
    torch's own conversions do not agree on it between their vectorised and scalar code.
    """
    if dtype == "F64":
        np.copyto(out, x)
        return
    if dtype == "F32":
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32's range: inf
            np.copyto(out, x, casting="same_kind")
        return
    odd = _to_float32_round_to_odd(x)
    bits = odd.view(np.uint32)
    nan = np.isnan(odd, out=_tmp("nan", np.bool_, odd.size))
    if dtype == "BF16":
        # to nearest even on the top 16 bits: add 0x7FFF plus the lowest kept bit
        lsb = np.right_shift(bits, 16, out=_tmp("lsb", np.uint32, bits.size))
        np.bitwise_and(lsb, 1, out=lsb)
        np.add(lsb, 0x7FFF, out=lsb)
        np.add(lsb, bits, out=lsb)
        np.right_shift(lsb, 16, out=lsb)
        np.copyto(out, lsb, casting="unsafe")
        if nan.any():
            out[nan] = _BF16_NAN
    elif dtype == "F16":
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(out, odd, casting="same_kind")
        if nan.any():
            half = out.view(np.uint16)
            half[nan] = (np.right_shift(bits[nan], 16) & 0x8000) | _F16_NAN
    else:
        raise ValueError(f"not a float dtype: {dtype}")


_NAMES = {DTYPES[name].torch: name for name in FLOATS}


def raw_view(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A flat contiguous float tensor's stored bits as numpy (no copy), with its dtype name."""
    name = _NAMES[str(t.dtype).removeprefix("torch.")]
    flat = t.reshape(-1)
    if name == "BF16":
        return flat.view(torch.int16).numpy().view(np.uint16), name
    return flat.numpy(), name


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float64 tensor to ``dtype`` once, to nearest with ties to even
    (:func:`round_raw`).

    torch casts float64 to bfloat16 and float16 through float32, rounding twice, which is
    off by one ulp where the float32 value lands exactly halfway between two values of the
    narrow type; going through float32 rounded to odd (all steps elementwise) gives the
    correctly rounded result on every kernel.
    """
    if dtype in (torch.float64, torch.float32) or not dtype.is_floating_point:
        return x.to(dtype)
    out = torch.empty(x.shape, dtype=dtype)
    values = x.detach().to(torch.float64).contiguous().reshape(-1).numpy()
    raw, name = raw_view(out)
    for start in range(0, values.size, _WORK_MAX):  # elementwise: blocks give the same bits
        stop = start + _WORK_MAX  # and keep the temporaries to a few blocks
        round_raw(values[start:stop], name, raw[start:stop])
    return out
