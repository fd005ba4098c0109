"""``round_to``: float64 rounded ONCE to bfloat16, float16 or float32, to nearest with ties to
even, checked against an oracle that shares no code with it: every finite value of the
target type as an exact fraction, the nearest found by bisection, a tie going to the even
bit pattern, and overflow to infinity past the largest value plus half an ulp."""

from __future__ import annotations

import bisect
import math
import struct
from fractions import Fraction
from functools import cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge.numeric import round_to

TYPES = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


@cache
def finite_values(dtype: torch.dtype) -> tuple[list[Fraction], list[int]]:
    """The non-negative finite values of a 16-bit float type, ascending, with their bits."""
    bits = torch.arange(0, 0x8000, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).to(torch.float64).tolist()
    pairs = sorted((Fraction(v), b) for v, b in zip(values, range(0x8000), strict=True)
                   if math.isfinite(v))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def oracle_bits(x: float, dtype: torch.dtype) -> int:
    """The 16-bit pattern of ``x`` correctly rounded (NaN not handled)."""
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    if math.isinf(x):
        return sign | int(torch.tensor(math.inf).to(dtype).view(torch.int16)) & 0x7FFF
    values, bits = finite_values(dtype)
    a = Fraction(abs(x))
    top, top_bits = values[-1], bits[-1]
    ulp = top - values[-2]
    if a >= top + ulp / 2:  # past halfway to the next (even) step: infinity
        inf = int(torch.tensor(math.inf).to(dtype).view(torch.int16)) & 0x7FFF
        return sign | inf
    i = bisect.bisect_left(values, a)
    if i < len(values) and values[i] == a:
        return sign | bits[i]
    lo, hi = i - 1, min(i, len(values) - 1)
    if a > top:
        return sign | top_bits
    below, above = a - values[lo], values[hi] - a
    if below < above:
        return sign | bits[lo]
    if above < below:
        return sign | bits[hi]
    return sign | (bits[lo] if bits[lo] % 2 == 0 else bits[hi])


def ours_bits(xs: list[float], dtype: torch.dtype) -> list[int]:
    out = round_to(torch.tensor(xs, dtype=torch.float64), dtype)
    return [b & 0xFFFF for b in out.view(torch.int16).tolist()]


def next_up(x: float, n: int = 1) -> float:
    (b,) = struct.unpack("<q", struct.pack("<d", x))
    return struct.unpack("<d", struct.pack("<q", b + n))[0]


def tricky(dtype: torch.dtype) -> list[float]:
    """Halfway points between neighbours and values a hair off them (where rounding
    through float32 to nearest goes wrong), subnormals, the overflow edge, zeros."""
    values, _ = finite_values(dtype)
    out = [0.0, -0.0, math.inf, -math.inf, 1e-300, -1e-300, 5e-324, 1e300, -1e300,
           3.4028235677973366e38, 3.4028236e38, 2.0 ** -126, 2.0 ** -127, 2.0 ** -149,
           2.0 ** -150, 1.5 * 2.0 ** -150, 2.0 ** -133, 2.0 ** -134, 3 * 2.0 ** -135]
    step = max(1, len(values) // 700)
    picks = list(range(1, len(values) - 1, step)) + [1, 2, 3, len(values) - 2, len(values) - 1]
    for i in picks:
        mid = float((values[i - 1] + values[i]) / 2)
        for m in (mid, next_up(mid), next_up(mid, -1), next_up(mid, 1 << 20),
                  next_up(mid, -(1 << 20)), next_up(mid, (1 << 28) + 1),
                  next_up(mid, -(1 << 28) - 1)):
            out += [m, -m]
    top = values[-1] + (values[-1] - values[-2]) / 2
    out += [float(top), next_up(float(top), -1), next_up(float(top), 1)]
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_tricky_values_round_once(dtype: torch.dtype) -> None:
    xs = tricky(dtype)
    want = [oracle_bits(x, dtype) for x in xs]
    got = ours_bits(xs, dtype)
    bad = [(x, hex(w), hex(g)) for x, w, g in zip(xs, want, got, strict=True) if w != g]
    assert not bad, bad[:10]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_plain_cast_through_float32_is_wrong_somewhere(dtype: torch.dtype) -> None:
    """The oracle sees the double-rounding trap that a plain cast falls into, so the test
    above would catch a round_to that forgot it."""
    xs = tricky(dtype)
    plain = [b & 0xFFFF for b in torch.tensor(xs, dtype=torch.float64).to(dtype)
             .view(torch.int16).tolist()]
    assert any(oracle_bits(x, dtype) != p for x, p in zip(xs, plain, strict=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=64), min_size=1, max_size=40),
       st.sampled_from([torch.bfloat16, torch.float16]))
def test_any_float_rounds_once(xs: list[float], dtype: torch.dtype) -> None:
    assert ours_bits(xs, dtype) == [oracle_bits(x, dtype) for x in xs]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=64), min_size=1, max_size=40))
def test_float32_is_the_plain_cast(xs: list[float]) -> None:
    x = torch.tensor(xs, dtype=torch.float64)
    assert torch.equal(round_to(x, torch.float32).view(torch.int32),
                       x.to(torch.float32).view(torch.int32))


def test_nan_stays_nan_and_shapes_are_kept() -> None:
    x = torch.tensor([[math.nan, 1.0], [-math.nan, 2.0 ** -140]], dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        out = round_to(x, dtype)
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.isnan(out[:, 0]).all() and out[0, 1] == 1.0


def test_non_contiguous_input() -> None:
    x = torch.arange(40, dtype=torch.float64).reshape(5, 8).t() / 3.0
    assert torch.equal(round_to(x, torch.bfloat16), round_to(x.contiguous(), torch.bfloat16))


def test_nan_becomes_one_pattern_whatever_its_sign_and_payload() -> None:
    """torch's own float32 -> bfloat16 conversion gives 0x7FC0 in its scalar code and
    0xFFFF in its AVX-512 code, so a NaN's bytes would depend on where it falls in a
    tensor; ours are fixed: bfloat16 0x7FC0, float16 the sign and 0x7E00."""
    payloads = [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001,
                0xFFF0000000000001, 0x7FF4000000000123, 0x7FFFFFFFFFFFFFFF]
    x = torch.tensor([p - (1 << 64) if p >= 1 << 63 else p for p in payloads] * 700,
                     dtype=torch.int64).view(torch.float64)  # long enough for SIMD kernels
    bf = round_to(x, torch.bfloat16).view(torch.int16).tolist()
    assert {b & 0xFFFF for b in bf} == {0x7FC0}
    half = [b & 0xFFFF for b in round_to(x, torch.float16).view(torch.int16).tolist()]
    want = [(0x8000 if p >> 63 else 0) | 0x7E00 for p in payloads] * 700
    assert half == want


@pytest.mark.parametrize("name,dtype", [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_widening_stored_bits_is_exact_for_every_16_bit_pattern(name: str,
                                                                 dtype: torch.dtype) -> None:
    import numpy as np

    from crdt_merge.numeric import widen_raw

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = widen_raw(bits if name == "BF16" else bits.view(np.float16), name,
                     np.empty(1 << 16))
    theirs = torch.from_numpy(bits.view(np.int16).copy()).view(dtype).to(torch.float64).numpy()
    nan = np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.int64), theirs[~nan].view(np.int64))


def test_merge_raw_refuses_what_merge_refuses() -> None:
    import numpy as np

    from crdt_merge.errors import RecipeError, ShapeMismatch
    from crdt_merge.methods import get_method
    from crdt_merge.methods.base import Raw

    linear, ta = get_method("linear"), get_method("task_arithmetic")
    a, b = Raw(np.zeros(4, np.float32), "F32"), Raw(np.zeros(5, np.float32), "F32")
    out = Raw(np.zeros(4, np.uint16), "BF16")
    with pytest.raises(ShapeMismatch):
        linear.merge_raw("t", {}, [{"weight": 1}, {"weight": 1}], None, [a, b], out)
    with pytest.raises(TypeError):
        linear.merge_raw("t", {}, [{"weight": 1}], None, [Raw(np.zeros(4), "F32")], out)
    with pytest.raises(RecipeError):
        ta.merge_raw("t", {}, [{"weight": 1}], None, [a], out)
    linear.merge_raw("t", {}, [{"weight": 1}], None, [a], out)  # fine as it is


def test_a_tensor_longer_than_the_work_buffers_rounds_as_its_parts() -> None:
    """round_to works through long tensors in blocks (bounded temporaries): the bits are
    those of rounding each element alone."""
    from crdt_merge import numeric

    n = 3 * numeric._WORK_MAX + 17
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 1e3
    x[::97] = torch.tensor(tricky(torch.bfloat16)[:1], dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        whole = round_to(x, dtype).view(torch.int16)
        parts = torch.cat([round_to(p, dtype) for p in x.split(1000)]).view(torch.int16)
        assert torch.equal(whole, parts)
