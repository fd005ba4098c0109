"""exp and log built only from correctly rounded float64 operations (numpy arrays).

As :mod:`.trig` does for angles: ``np.exp``/``np.log`` come from whatever libm or SIMD code
the machine has and may differ in the last bit, so ``arcee_fusion``'s softmax and KL
divergence use these instead. A few ulps of accuracy; the same bits everywhere.

* ``exp(x)``: ``k = round(x / ln 2)`` (ties to even), ``r = (x - k*L1) - k*L2`` with
  fdlibm's two-part ``ln 2`` (``L1`` has 32 significant bits, so ``k*L1`` is exact),
  the Taylor polynomial of ``e^r`` to ``r^13`` by Horner's rule (``|r| <= 0.35``), scaled
  by ``2^k`` (``ldexp``: exact, or one rounding in the subnormal range). ``x < -745`` gives
  0, ``x > 709`` infinity.
* ``log(x)`` for ``x > 0``: ``x = m * 2^e`` (``frexp``, exact) with ``m`` moved into
  ``[sqrt(1/2), sqrt(2))``; ``s = (m - 1) / (m + 1)``;
  ``log(m) = 2 (s + s^3/3 + ... + s^25/25)`` by Horner's rule in ``s*s``;
  ``log(x) = e*L1 + (log(m) + e*L2)``. ``log(0) = -inf``.
"""

from __future__ import annotations

import math

import numpy as np

_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_EXP = [1.0 / math.factorial(k) for k in range(0, 14)]  # r^0 .. r^13
_LOG = [1.0 / (2 * k + 1) for k in range(0, 13)]  # s^1 .. s^25 (in s*s)
_SQRT_HALF = 0.70710678118654752440


def _horner(coeffs: list[float], z: np.ndarray) -> np.ndarray:
    acc = np.full_like(z, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * z + c
    return acc


def exp(x: np.ndarray) -> np.ndarray:
    """``e**x`` elementwise (float64), see the module docstring."""
    x = np.asarray(x, dtype=np.float64)
    low = x < -745.0
    high = x > 709.0
    xc = np.clip(x, -745.0, 709.0)
    k = np.rint(xc * _INV_LN2)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    out = np.ldexp(_horner(_EXP, r), k.astype(np.int64))
    out[low] = 0.0
    out[high] = np.inf
    return out


def log(x: np.ndarray) -> np.ndarray:
    """The natural logarithm elementwise of positive float64 values."""
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)
    small = m < _SQRT_HALF
    m = np.where(small, m * 2.0, m)
    e = (e - small).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    lm = (s * _horner(_LOG, s * s)) * 2.0
    out = e * _LN2_HI + (lm + e * _LN2_LO)
    out[x == 0] = -np.inf
    return out
