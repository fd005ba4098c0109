"""sin, cos and acos built only from correctly rounded float64 operations.

``torch.sin``/``torch.acos`` run SLEEF's vector code under AVX2 and the C library's scalar
code under ``ATEN_CPU_CAPABILITY=default``, and those differ in the last bit; the C library
itself may pick an FMA variant on one CPU and not on another. The SLERP family needs a few
angles per tensor (or per row), so they are computed here from ``+ - * /``, ``sqrt``,
``round`` and comparisons only, each an IEEE-754 correctly rounded elementwise operation,
in a fixed order: the same bits on every CPU, kernel and thread count. Accuracy is a few
units in the last place, far below what any merge needs.

Construction (also in specs/methods.md):

* ``sin``/``cos``: ``k = round(x * 2/pi)`` (ties to even); ``r = (x - k*P1) - k*P2`` with
  fdlibm's two-part ``pi/2`` (``P1`` has 33 significant bits, so ``k*P1`` is exact for
  ``|k| < 2**20``); then the Taylor polynomials of sin and cos on ``|r| <= pi/4`` up to the
  ``r**19`` and ``r**20`` terms, evaluated by Horner's rule in ``r*r``; the quadrant
  ``k mod 4`` picks and signs them.
* ``acos(x) = 2 * atan(sqrt((1 - x) / (1 + x)))``; ``atan(y)`` uses ``pi/2 - atan(1/y)`` for
  ``y > 1``, two half-angle steps ``y -> y / (1 + sqrt(1 + y*y))`` and the Taylor series up
  to ``y**25``, times 4.
"""

from __future__ import annotations

import math

from crdt_merge.lazy import torch

_TWO_OVER_PI = 6.36619772367581382433e-01
_PIO2_1 = 1.57079632673412561417e00
_PIO2_1T = 6.07710050650619224932e-11
_PIO2 = 1.57079632679489655800e00
_LIMIT = float(1 << 19) * _PIO2

_SIN = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(1, 10)]  # r^3 .. r^19
_COS = [(-1.0) ** k / math.factorial(2 * k) for k in range(1, 11)]  # r^2 .. r^20
_ATAN = [(-1.0) ** k / (2 * k + 1) for k in range(1, 13)]  # y^3 .. y^25


def _horner(coeffs: list[float], z: torch.Tensor) -> torch.Tensor:
    """``c0 + z*(c1 + z*(c2 + ...))``."""
    acc = torch.full_like(z, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * z + c
    return acc


def _reduce(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if bool((x.abs() > _LIMIT).any()):
        raise ValueError("angle too large for this argument reduction")
    k = torch.round(x * _TWO_OVER_PI)
    r = (x - k * _PIO2_1) - k * _PIO2_1T
    q = torch.remainder(k.to(torch.int64), 4)
    return r, q


def _sin_poly(r: torch.Tensor) -> torch.Tensor:
    z = r * r
    return r + (r * z) * _horner(_SIN, z)


def _cos_poly(r: torch.Tensor) -> torch.Tensor:
    z = r * r
    return 1.0 + z * _horner(_COS, z)


def sin_t(x: torch.Tensor) -> torch.Tensor:
    """Elementwise sine of a float64 tensor (deterministic; see module docstring)."""
    r, q = _reduce(x)
    s, c = _sin_poly(r), _cos_poly(r)
    out = torch.where(q == 0, s, torch.where(q == 1, c, torch.where(q == 2, -s, -c)))
    return torch.where(x == 0, x, out)  # keep sin(+-0) = +-0


def cos_t(x: torch.Tensor) -> torch.Tensor:
    """Elementwise cosine of a float64 tensor (deterministic; see module docstring)."""
    r, q = _reduce(x)
    s, c = _sin_poly(r), _cos_poly(r)
    return torch.where(q == 0, c, torch.where(q == 1, -s, torch.where(q == 2, -c, s)))


def _atan_nonneg(y: torch.Tensor) -> torch.Tensor:
    big = y > 1.0
    z = torch.where(big, 1.0 / torch.where(big, y, 1.0), y)
    for _ in range(2):
        z = z / (1.0 + torch.sqrt(1.0 + z * z))
    zz = z * z
    small = z + (z * zz) * _horner(_ATAN, zz)
    a = 4.0 * small
    return torch.where(big, _PIO2 - a, a)


def acos_t(x: torch.Tensor) -> torch.Tensor:
    """Elementwise arccosine of a float64 tensor clamped to [-1, 1] (deterministic)."""
    x = torch.clamp(x, -1.0, 1.0)
    y = torch.sqrt((1.0 - x) / (1.0 + x))  # +inf at x == -1, where atan gives pi/2
    return 2.0 * _atan_nonneg(y)


def _scalar(fn, x: float) -> float:
    return float(fn(torch.tensor([x], dtype=torch.float64))[0])


def sin(x: float) -> float:
    """Sine of a float, bit-identical to :func:`sin_t` of a one-element tensor."""
    return _scalar(sin_t, x)


def cos(x: float) -> float:
    """Cosine of a float, bit-identical to :func:`cos_t` of a one-element tensor."""
    return _scalar(cos_t, x)


def acos(x: float) -> float:
    """Arccosine of a float in [-1, 1], bit-identical to :func:`acos_t`."""
    return _scalar(acos_t, x)
