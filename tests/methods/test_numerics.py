"""The building blocks: blockwise fixed-tree sums, deterministic trig, selection, uniforms."""

from __future__ import annotations

import math
import struct

import blake3
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crdt_merge.methods.reduce as reduce
import crdt_merge.methods.select as select
from crdt_merge.methods import trig
from crdt_merge.methods.reduce import tree_sum, tree_sum_rows
from crdt_merge.methods.rng import DOMAIN, Uniforms
from crdt_merge.numeric import fixed_sum
from tests.methods.helpers import tensor

# -- tree_sum is numeric.fixed_sum, blockwise ---------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5000), st.sampled_from([1, 2, 8, 64, 1024, 1 << 18]), st.integers(0, 99))
def test_tree_sum_is_bit_identical_to_fixed_sum(n, block, seed) -> None:
    # wildly mixed magnitudes so that any change of association changes the bits
    x = tensor(f"t{seed}", (n,)) * torch.pow(10.0, (tensor(f"e{seed}", (n,)) * 8).round())
    got = tree_sum(lambda s, e: x[s:e], n, block)
    assert struct.pack("<d", got) == struct.pack("<d", float(fixed_sum(x)))


def test_tree_sum_keeps_the_padding_semantics() -> None:
    x = torch.tensor([-0.0, -0.0, -0.0], dtype=torch.float64)  # padded with +0.0: sum is +0.0
    assert math.copysign(1.0, tree_sum(lambda s, e: x[s:e], 3, 1)) == 1.0
    assert math.copysign(1.0, float(fixed_sum(x))) == 1.0


def test_tree_sum_rows_is_fixed_sum_per_row() -> None:
    x = tensor("rows", (7, 13)) * torch.pow(10.0, (tensor("re", (7, 13)) * 6).round())
    got = tree_sum_rows(x)
    for i in range(7):
        assert got[i].item() == fixed_sum(x[i]).item()


# -- trig: accurate and built from correctly rounded ops ----------------------------------------


def test_trig_is_accurate() -> None:
    xs = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    for got, x in zip(trig.acos_t(xs).tolist(), xs.tolist(), strict=True):
        assert abs(got - math.acos(x)) <= 4 * math.ulp(math.acos(x)) + 1e-300
    angles = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    for s, c, a in zip(
        trig.sin_t(angles).tolist(), trig.cos_t(angles).tolist(), angles.tolist(), strict=True
    ):
        assert abs(s - math.sin(a)) <= 2.3e-16 and abs(c - math.cos(a)) <= 2.3e-16


def test_trig_exact_points() -> None:
    assert trig.acos(1.0) == 0.0 and trig.acos(-1.0) == math.pi
    assert trig.sin(0.0) == 0.0 and trig.cos(0.0) == 1.0
    assert math.copysign(1.0, trig.sin(-0.0)) == -1.0
    assert abs(trig.acos(0.0) - math.pi / 2) <= math.ulp(math.pi / 2)


def test_trig_scalar_equals_vector() -> None:
    xs = tensor("ang", (50,), 3.0)
    assert trig.sin_t(xs).tolist() == [trig.sin(x) for x in xs.tolist()]
    assert trig.acos_t(xs / 3).tolist() == [trig.acos(x / 3) for x in xs.tolist()]


# -- selection ---------------------------------------------------------------------------------


def reference_band(values: list[float], r0: int, r1: int) -> list[bool]:
    """Keep descending ranks [r0, r1) under (magnitude desc, index asc), by a plain sort."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    keep = [False] * len(values)
    for r in range(max(r0, 0), min(r1, len(values))):
        keep[order[r]] = True
    return keep


def band_mask(x: torch.Tensor, r0: int, r1: int) -> list[bool]:
    def mags(s, e, st=1):
        return x[s:e:st]

    return select.rank_band(mags, x.numel(), r0, r1).mask(mags, x.numel()).tolist()


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from([0.0, 0.25, 1.0]), st.floats(0, 1)), min_size=1, max_size=600
    ),
    st.data(),
)
def test_rank_band_matches_a_sort(values, data) -> None:
    n = len(values)
    r0 = data.draw(st.integers(0, n))
    r1 = data.draw(st.integers(r0, n + 1))
    block = data.draw(st.sampled_from([4, 32, 1024]))
    x = torch.tensor(values, dtype=torch.float64)
    old = select._SAMPLE, reduce.BLOCK
    select._SAMPLE, reduce.BLOCK = 16, block  # exercise the sampled path on small inputs
    try:
        got = band_mask(x, r0, r1)
    finally:
        select._SAMPLE, reduce.BLOCK = old
    assert got == reference_band(values, r0, r1)


def test_rank_band_on_a_large_tensor_with_heavy_ties() -> None:
    x = (tensor("ties", (300_000,)) * 8).round().abs()  # only 9 distinct values
    ordered = np.lexsort((np.arange(x.numel()), -x.numpy())).tolist()  # magnitude desc, index asc
    for r in (0, 1, 12345, 150_000, 299_999):
        keep = band_mask(x, r, r + 1)
        assert [i for i, k in enumerate(keep) if k] == [ordered[r]]
    got = torch.tensor(band_mask(x, 1000, 200_000))
    expected = torch.zeros(x.numel(), dtype=torch.bool)
    expected[torch.tensor(ordered[1000:200_000])] = True
    assert torch.equal(got, expected)


def test_ties_at_the_threshold_keep_the_lowest_index() -> None:
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5], dtype=torch.float64)
    assert band_mask(x, 0, 4) == [False, True, True, True, True, False, False]
    assert band_mask(x, 1, 4) == [False, False, True, True, True, False, False]


# -- uniforms ----------------------------------------------------------------------------------


def test_uniforms_follow_the_spec() -> None:
    key = bytes(range(32))
    xof = blake3.blake3(DOMAIN + key).digest(length=40)
    expected = [struct.unpack_from("<I", xof, 4 * j)[0] / 2**32 for j in range(10)]
    u = Uniforms(key)
    assert u.block(0, 10).tolist() == expected
    assert u.block(3, 7).tolist() == expected[3:7]  # seekable: any block, any order
    # golden values, so that another implementation can check itself (specs/methods.md)
    assert xof[:12].hex() == "ab32d3b617e176da52ba66bc"
    assert u.block(0, 3).tolist() == [0.7141601245384663, 0.8533764535095543, 0.735942502040416]
    with pytest.raises(ValueError):
        Uniforms(b"short")


def test_band_apply_is_exact_at_the_boundary() -> None:
    lo = 0.1  # not a float32 value: a threshold rounded to float32 would drop it
    below = math.nextafter(lo, 0.0)
    x = torch.tensor([lo, -lo, below, -below, 0.3, 0.0], dtype=torch.float64)
    keep_all_equal = select.Band(lo=lo, lo_cut=10)
    assert keep_all_equal.apply(x.clone(), 0).tolist() == [lo, -lo, 0.0, 0.0, 0.3, 0.0]
    keep_none_equal = select.Band(lo=lo, lo_cut=0)
    assert keep_none_equal.apply(x.clone(), 0).tolist() == [0.0, 0.0, 0.0, 0.0, 0.3, 0.0]
    first_equal = select.Band(lo=lo, lo_cut=1)
    assert first_equal.apply(x.clone(), 0).tolist() == [lo, 0.0, 0.0, 0.0, 0.3, 0.0]
    band = select.Band(lo=lo, lo_cut=10, hi=0.3, hi_cut=10)  # equal-to-hi all dropped
    assert band.apply(x.clone(), 0).tolist() == [lo, -lo, 0.0, 0.0, 0.0, 0.0]
