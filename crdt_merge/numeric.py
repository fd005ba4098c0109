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

import numpy as np
import torch  # crdt_merge/__init__ has set MKL_CBWR before this import

from crdt_merge import NUMERIC_VERSION  # noqa: E402,F401  (re-exported)


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


def _to_float32_round_to_odd(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounding to odd: ``x`` when it is a float32, else its float32
    neighbour whose last significand bit is one. Rounding to odd first and then to nearest
    even in a format at least two bits narrower equals rounding once (Boldo and Melquiond,
    2008).

    On the bit pattern (integer operations, exact on every kernel): clear the 29 bits
    below float32's significand and set the lowest kept bit if any of them was one (it is
    one iff ``low + (2**29 - 1)`` carries into bit 29). The result has 24 significant bits,
    so the conversion to float32 is exact wherever float32 is normal (infinities and NaNs
    stay what they are; beyond float32's range it overflows to infinity, as rounding
    would). Values that land below float32's normal range are rare and take the exact
    comparison-based rule, :func:`_round_to_odd_exact`.
    """
    bits = x.detach().contiguous().numpy().view(np.int64)  # numpy: fast integer kernels
    low = np.bitwise_and(bits, _LOW29)
    sticky = np.add(low, _LOW29)
    np.bitwise_and(sticky, 1 << 29, out=sticky)
    np.bitwise_xor(bits, low, out=low)  # the bits with the low 29 cleared
    np.bitwise_or(low, sticky, out=low)
    with np.errstate(over="ignore"):  # beyond float32's range: infinity, as intended
        out = low.view(np.float64).astype(np.float32)
    # zero iff the float32 is subnormal and not zero: |out bits| - 1 in [0, 2**23)
    sub = np.bitwise_and(out.view(np.int32), 0x7FFFFFFF)
    np.subtract(sub, 1, out=sub)
    np.right_shift(sub, 23, out=sub)
    result = torch.from_numpy(out).reshape(x.shape)
    if np.count_nonzero(sub) < sub.size:
        where = torch.from_numpy(np.flatnonzero(sub == 0))
        flat = result.reshape(-1)
        flat[where] = _round_to_odd_exact(x.reshape(-1)[where])
    return result


def _round_to_odd_exact(x: torch.Tensor) -> torch.Tensor:
    """The same rounding as :func:`_to_float32_round_to_odd`, by comparisons: from ``f``,
    ``x`` rounded to nearest, when ``f != x`` and ``f``'s last bit is zero the odd
    neighbour is one ulp from ``f`` toward ``x``: bit pattern plus one when ``|x| > |f|``,
    minus one otherwise (float magnitudes are ordered like their bit patterns, zero and
    subnormals included). ``x - f`` is exact, so its sign tells which way."""
    f = x.to(torch.float32)
    bits = f.view(torch.int32)
    d = x - f.to(torch.float64)
    fix = (d != 0) & (d == d) & ((bits & 1) == 0)  # inexact, not NaN, even
    up = (d > 0) == (x > 0)  # |x| > |f|
    step = fix.to(torch.int32).mul_(up.to(torch.int32).mul_(2).sub_(1))
    return (bits + step).view(torch.float32)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float64 tensor to ``dtype`` once, to nearest with ties to even.

    torch casts float64 to bfloat16 and float16 through float32, rounding twice, which is
    off by one ulp where the float32 value lands exactly halfway between two values of the
    narrow type; going through float32 rounded to odd (all steps elementwise) gives the
    correctly rounded result on every kernel.
    """
    if dtype in (torch.float64, torch.float32) or not dtype.is_floating_point:
        return x.to(dtype)
    return _to_float32_round_to_odd(x.to(torch.float64)).to(dtype)
