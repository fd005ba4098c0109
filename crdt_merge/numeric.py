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


def _to_float32_round_to_odd(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounding to odd: truncate toward zero, then set the last bit if
    anything was cut off. Rounding to odd first and then to nearest-even in a format at
    least two bits narrower equals rounding once (Boldo and Melquiond, 2008)."""
    f = x.to(torch.float32)
    bits = f.view(torch.int32).clone()
    back = f.to(torch.float64)
    finite = torch.isfinite(x) & torch.isfinite(f)
    overshoot = finite & (back.abs() > x.abs())
    bits = torch.where(overshoot, bits - 1, bits)  # one ulp toward zero (same sign)
    inexact = finite & (bits.view(torch.float32).to(torch.float64) != x)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32)


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float64 tensor to ``dtype`` once, to nearest with ties to even.

    torch casts float64 to bfloat16 and float16 through float32, rounding twice, which is
    off by one ulp in rare ties; going through float32 rounded to odd gives the correctly
    rounded result on every kernel (all steps are elementwise).

    For bfloat16 the double rounding can go wrong only where the float32 value sits exactly
    halfway between two bfloat16 values (its low 16 bits are 0x8000); those few elements
    are found with one bit test and rounded through round-to-odd, the rest cast directly.
    Both give the same bits where both apply, so the fast path changes nothing but time.
    """
    if dtype in (torch.float64, torch.float32) or not dtype.is_floating_point:
        return x.to(dtype)
    x = x.to(torch.float64)
    if dtype != torch.bfloat16:
        return _to_float32_round_to_odd(x).to(dtype)
    f = x.to(torch.float32)
    halfway = (f.view(torch.int32) & 0xFFFF) == 0x8000
    if bool(halfway.any()):
        flat = f.reshape(-1)
        where = halfway.reshape(-1).nonzero().squeeze(1)
        flat[where] = _to_float32_round_to_odd(x.reshape(-1)[where])
        f = flat.reshape(x.shape)
    return f.to(dtype)
