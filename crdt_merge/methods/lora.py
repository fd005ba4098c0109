"""LoRA deltas materialised exactly: ``delta = scale * (B @ A)``, in float64, fixed order.

PEFT defines a LoRA module's weight update as ``transpose(B @ A, fan_in_fan_out) * scale``
with ``A`` of shape ``(r, in)``, ``B`` of shape ``(out, r)`` and ``scale = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). The product is a reduction over the rank, so the order of
its additions is part of the result; here it is fixed (specs/methods.md, "LoRA adapters"):

    p_k[i, j] = fl(B[i, k] * A[k, j])                  every factor widened exactly to float64
    s_0 = p_0,  s_k = fl(s_{k-1} + p_k)   k = 1 .. r-1  (ascending k, no fused multiply-add)
    delta[i, j] = fl(scale * s_{r-1}[i, j])           (then transposed when fan_in_fan_out)

where ``fl`` is IEEE-754 binary64 round-to-nearest-even. Only elementwise numpy operations
are used (each correctly rounded, one at a time), never BLAS, so the bytes do not depend on
the CPU, the BLAS build or the number of threads. The result stays float64: the method that
merges it rounds once, to the output dtype.
"""

from __future__ import annotations

import math

import numpy as np

#: rows of the output computed together (bounds the temporaries, keeps them in cache)
_ROWS = 64


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (each operation
    correctly rounded in float64; ``sqrt`` is correctly rounded by IEEE-754)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return float(alpha) / (math.sqrt(rank) if rslora else float(rank))


def lora_delta(a: np.ndarray, b: np.ndarray, scale: float, fan_in_fan_out: bool = False) -> np.ndarray:
    """The float64 delta of one LoRA module (see the module docstring).

    Args:
        a: ``lora_A`` weight, shape ``(r, in)``, any float dtype (widened exactly).
        b: ``lora_B`` weight, shape ``(out, r)``.
        scale: :func:`lora_scale`.
        fan_in_fan_out: the base layer stores its weight as ``(in, out)`` (GPT-2's Conv1D):
            the delta is transposed to that layout.

    Returns:
        A C-contiguous float64 array of shape ``(out, in)``, or ``(in, out)`` when
        ``fan_in_fan_out``.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"LoRA factors of shapes A {list(a.shape)} and B {list(b.shape)} "
                         "do not multiply (A is (r, in), B is (out, r))")
    a64 = np.ascontiguousarray(a, dtype=np.float64)
    b64 = np.ascontiguousarray(b, dtype=np.float64)
    rank = a64.shape[0]
    out_dim, in_dim = b64.shape[0], a64.shape[1]
    delta = np.empty((out_dim, in_dim), dtype=np.float64)
    if rank == 0:
        delta.fill(0.0)
    else:
        tmp = np.empty((min(_ROWS, out_dim), in_dim), dtype=np.float64)
        for start in range(0, out_dim, _ROWS):
            stop = min(start + _ROWS, out_dim)
            acc = delta[start:stop]
            part = tmp[:stop - start]
            np.multiply(b64[start:stop, 0:1], a64[0:1, :], out=acc)
            for k in range(1, rank):
                np.multiply(b64[start:stop, k:k + 1], a64[k:k + 1, :], out=part)
                np.add(acc, part, out=acc)
            np.multiply(acc, scale, out=acc)
    return np.ascontiguousarray(delta.T) if fan_in_fan_out else delta
