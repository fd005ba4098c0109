"""Golden vectors of specs/methods.md, "LoRA adapters": the materialised delta
``scale * B @ A`` in float64 with the fixed summation order, from the spec alone.

Independent of crdt_merge and of numpy: Python floats are IEEE-754 binary64 and each ``*``,
``+``, ``/`` and ``math.sqrt`` on them is correctly rounded, so the loops below are the
spec's formulas, one operation at a time. Inputs are float32 (or bfloat16) values given by
their bytes, outputs float64 bytes, all hex, little-endian, row-major.

    python specs/vectors/lora/make_vectors.py [OUT_DIR]     # writes lora.json
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path


class Rng:
    """SplitMix64: a fixed stream of 64-bit integers (no library RNG)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & (2**64 - 1)

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & (2**64 - 1)
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        return z ^ (z >> 31)

    def f32(self) -> float:
        """A float32 value in about [-1, 1): 24 random bits over 2^23, minus 1."""
        return (self.next() >> 40) / float(1 << 23) - 1.0


def f32_bits(x: float) -> bytes:
    return struct.pack("<f", x)


def bf16_bits(x: float) -> bytes:
    """x must be exactly representable in bfloat16: the top half of its float32 bytes."""
    raw = struct.pack("<f", x)
    assert raw[:2] == b"\0\0", x
    return raw[2:]


def matmul_scaled(a: list[list[float]], b: list[list[float]], scale: float) -> list[list[float]]:
    """delta[i][j] = scale * (((B[i][0]*A[0][j] + B[i][1]*A[1][j]) + ...) + B[i][r-1]*A[r-1][j])"""
    r = len(a)
    out = []
    for i in range(len(b)):
        row = []
        for j in range(len(a[0])):
            s = b[i][0] * a[0][j]
            for k in range(1, r):
                s = s + b[i][k] * a[k][j]
            row.append(scale * s)
        out.append(row)
    return out


def scale_of(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else float(r))


def case(name: str, a: list[list[float]], b: list[list[float]], alpha: float, rslora: bool,
         transpose: bool, dtype: str = "F32") -> dict:
    r = len(a)
    scale = scale_of(alpha, r, rslora)
    delta = matmul_scaled(a, b, scale)
    if transpose:
        delta = [list(col) for col in zip(*delta)]
    pack = f32_bits if dtype == "F32" else bf16_bits
    return {
        "name": name, "dtype": dtype, "r": r, "alpha": repr(alpha), "rslora": rslora,
        "transpose": transpose,
        "a_shape": [r, len(a[0])], "a": b"".join(pack(x) for row in a for x in row).hex(),
        "b_shape": [len(b), r], "b": b"".join(pack(x) for row in b for x in row).hex(),
        "scale": struct.pack("<d", scale).hex(),
        "delta_shape": [len(delta), len(delta[0])],
        "delta": b"".join(struct.pack("<d", x) for row in delta for x in row).hex(),
    }


def rand_matrix(rng: Rng, rows: int, cols: int) -> list[list[float]]:
    return [[struct.unpack("<f", struct.pack("<f", rng.f32()))[0] for _ in range(cols)]
            for _ in range(rows)]


def vectors() -> dict:
    rng = Rng(15)
    cases = [
        case("plain r=4", rand_matrix(rng, 4, 6), rand_matrix(rng, 5, 4), 8.0, False, False),
        case("rslora r=4", rand_matrix(rng, 4, 3), rand_matrix(rng, 3, 4), 8.0, True, False),
        case("fan_in_fan_out r=2", rand_matrix(rng, 2, 3), rand_matrix(rng, 4, 2), 16.0, False, True),
        case("odd alpha r=3 (scale 7/3 rounds)", rand_matrix(rng, 3, 4), rand_matrix(rng, 2, 3),
             7.0, False, False),
        case("rslora r=3 alpha=0.1", rand_matrix(rng, 3, 2), rand_matrix(rng, 2, 3), 0.1, True, False),
        # the order of the sum decides the value: (2^24 + 1) - 2^24 is 0 in order k = 0, 1, 2
        # (in float64 2^53 + 1 rounds to 2^53), 1 in another order
        case("order matters", [[2.0**26], [1.0], [-(2.0**26)]],
             [[2.0**27, 1.0, 2.0**27]], 1.0, False, False),
        case("bfloat16 factors", [[0.5, -1.25], [2.0, 0.0078125]], [[1.5, -3.0], [0.25, 8.0]],
             32.0, False, False, dtype="BF16"),
    ]
    return {"spec": "specs/methods.md, LoRA adapters", "cases": cases}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    text = json.dumps(vectors(), indent=1, ensure_ascii=True) + "\n"
    (out / "lora.json").write_text(text)


if __name__ == "__main__":
    main()
