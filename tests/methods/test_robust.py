"""Robust methods (median, trimmed_mean, clipped): laws, float64 references, poisoning.

The references here are written independently of the code under test: exact rationals
(``fractions.Fraction``) rounded once, or the plain formulas in float64 on whole tensors.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge.errors import BadParameter
from crdt_merge.methods import TensorJob, get_method
from tests.methods.helpers import run, same_bits, tensor

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _donors(seed: int, count: int, shape=(7, 9), dtype=torch.float32, ties: bool = False):
    base = tensor(f"r{seed}/base", shape, 1.0).to(dtype)
    out = []
    for i in range(count):
        d = tensor(f"r{seed}/d{i}", shape, 0.05)
        if ties:  # few distinct values: equal deltas across donors, and zeros
            d = torch.round(d * 40) / 40
        out.append((base.double() + d).to(dtype))
    return base, out


def _exact_median(vals: list[Fraction]) -> Fraction:
    v = sorted(vals)
    k = len(v)
    return v[k // 2] if k % 2 else (v[k // 2 - 1] + v[k // 2]) / 2


def _exact_trimmed(vals: list[Fraction], weights: list[Fraction], trim: int) -> Fraction:
    pairs = sorted(zip(vals, weights, strict=True))[trim: len(vals) - trim]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def _reference(method, base, donors, weights, trim) -> torch.Tensor:
    b = base.double().reshape(-1).tolist()
    ds = [x.double().reshape(-1).tolist() for x in donors]
    out = []
    for k, bk in enumerate(b):
        vals = [Fraction(d[k]) - Fraction(bk) for d in ds]
        if method == "median":
            m = _exact_median(vals)
        else:
            m = _exact_trimmed(vals, [Fraction(w) for w in weights], trim)
        out.append(float(Fraction(bk) + m))  # one rounding to float64
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def _within_one_rounding(ours: torch.Tensor, exact64: torch.Tensor) -> bool:
    """Each element is a neighbour of the (float64) exact value in the output dtype."""
    up = torch.nextafter(ours, torch.full_like(ours, math.inf)).double()
    down = torch.nextafter(ours, torch.full_like(ours, -math.inf)).double()
    return bool(((exact64 >= down) & (exact64 <= up)).all())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), count=st.integers(1, 6), dtype=st.sampled_from(DTYPES),
       ties=st.booleans(), data=st.data())
def test_median_and_trimmed_mean_are_exact_and_order_free(seed, count, dtype, ties, data) -> None:
    base, donors = _donors(seed, count, dtype=dtype, ties=ties)
    trim = data.draw(st.integers(0, (count - 1) // 2))
    weights = data.draw(st.lists(st.sampled_from([0.25, 0.5, 1.0, 3.0]), min_size=count,
                                 max_size=count))
    perm = data.draw(st.permutations(range(count)))
    for method, params, options in (
        ("median", [{}] * count, {}),
        ("trimmed_mean", [{"weight": repr(w)} for w in weights], {"trim": trim}),
    ):
        out = run(method, base, donors, params, options)
        ref = _reference(method, base, donors, weights, trim)
        if dtype == torch.float64:  # float64 inputs: the deltas themselves round
            assert torch.allclose(out, ref, rtol=0, atol=4e-16), method  # |b| <= 1
        else:  # narrower inputs: the float64 work is exact enough for one rounding
            assert _within_one_rounding(round_to(out, dtype), ref), method
        # donor order never changes a byte
        shuffled = run(method, base, [donors[i] for i in perm], [params[i] for i in perm], options)
        assert same_bits(out, shuffled), method


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from crdt_merge.numeric import round_to as r

    return r(x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_identical_donors_give_that_donor(dtype, count) -> None:
    base, (donor,) = _donors(3, 1, dtype=dtype)
    donors = [donor.clone() for _ in range(count)]
    for method, options in (("median", {}), ("trimmed_mean", {"trim": (count - 1) // 2})):
        m = get_method(method)

        out = m.merge(TensorJob("t", base, donors, [{}] * count, options, out_dtype=dtype))
        assert out.dtype == dtype and torch.equal(out, donor), (method, count)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), count=st.integers(1, 6),
       dtype=st.sampled_from(DTYPES[:3]))
def test_krum_kernels_are_the_mean_task_vector_within_one_rounding(seed, count, dtype) -> None:
    """krum / multi_krum merge the donors the plan kept: ``b + mean(d_i)``, against exact
    rationals rounded once (the selection itself: tests/resolve/test_robust_resolve.py)."""
    base, donors = _donors(seed, count, dtype=dtype)
    b = base.double().reshape(-1).tolist()
    ds = [x.double().reshape(-1).tolist() for x in donors]
    ref = torch.tensor([float(Fraction(bk) + sum(Fraction(d[k]) - Fraction(bk) for d in ds)
                              / count) for k, bk in enumerate(b)],
                       dtype=torch.float64).reshape(base.shape)
    for method, options in (("krum", {"f": 0}), ("multi_krum", {"f": 0, "m": count})):
        out = run(method, base, donors, [{}] * count, options)
        assert _within_one_rounding(round_to(out, dtype), ref), method
    # identical donors: that donor
    same = run("multi_krum", base, [donors[0].clone() for _ in range(count)], [{}] * count,
               {"f": 0, "m": count})
    assert torch.equal(round_to(same, dtype), donors[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), count=st.integers(2, 6), dtype=st.sampled_from(DTYPES[:3]),
       clip=st.sampled_from(["0.5", "1", "2"]), data=st.data())
def test_clipped_is_its_formula_within_one_rounding(seed, count, dtype, clip, data) -> None:
    """clipped (then=linear, per-tensor norms) against the formula of specs/methods.md in
    exact rationals, with the norms and clip factors as plain float64 (math.sqrt): within
    one rounding of the output dtype (order and duplication of the ops:
    tests/resolve/test_robust_resolve.py)."""
    base, donors = _donors(seed, count, dtype=dtype)
    scale = data.draw(st.lists(st.sampled_from([0.5, 1.0, 4.0, 30.0]), min_size=count,
                               max_size=count))  # some task vectors much longer
    donors = [(base.double() + (x.double() - base.double()) * f).to(dtype)
              for x, f in zip(donors, scale, strict=True)]
    weights = data.draw(st.lists(st.sampled_from(["0.5", "1", "3"]), min_size=count,
                                 max_size=count))
    b = [Fraction(v) for v in base.double().reshape(-1).tolist()]
    ds = [[Fraction(v) - bk for v, bk in zip(x.double().reshape(-1).tolist(), b, strict=True)]
          for x in donors]
    norms = [math.sqrt(float(sum(v * v for v in d))) for d in ds]
    srt = sorted(norms)
    med = srt[count // 2] if count % 2 else (srt[count // 2 - 1] + srt[count // 2]) / 2
    cap = float(clip) * med
    factors = [Fraction(cap / n) if n > cap else Fraction(1) for n in norms]
    w = [Fraction(x) for x in weights]
    ref = torch.tensor([float(sum(wi * (bk + d[k] * f) for wi, d, f in zip(w, ds, factors,
                                                                          strict=True)) / sum(w))
                        for k, bk in enumerate(b)], dtype=torch.float64).reshape(base.shape)
    params = [{"weight": x} for x in weights]
    options = {"then": "linear", "clip": clip}
    out = run("clipped", base, donors, params, options)
    assert _within_one_rounding(round_to(out, dtype), ref)


def test_trim_must_leave_a_value() -> None:
    base, donors = _donors(1, 4)
    with pytest.raises(BadParameter, match="trim=2"):
        run("trimmed_mean", base, donors, [{}] * 4, {"trim": 2})


def test_weighted_ties_are_broken_by_weight_not_order() -> None:
    # three equal deltas with different weights and one outlier: which "1" is trimmed must
    # not depend on the order (value first, then weight decides)
    base = torch.zeros(1, dtype=torch.float64)
    donors = [torch.tensor([v], dtype=torch.float64) for v in (1.0, 1.0, 1.0, 9.0, -5.0)]
    weights = ["1", "3", "2", "1", "1"]
    a = run("trimmed_mean", base, donors, [{"weight": w} for w in weights], {"trim": 1})
    order = [3, 2, 4, 0, 1]
    b = run("trimmed_mean", base, [donors[i] for i in order],
            [{"weight": weights[i]} for i in order], {"trim": 1})
    assert same_bits(a, b) and a.item() == 1.0


def test_clipped_scales_long_task_vectors_to_clip_times_the_median_norm() -> None:
    base = tensor("c/base", (30,), 1.0)
    deltas = [tensor(f"c/d{i}", (30,), 0.1) for i in range(3)]
    deltas.append(tensor("c/d3", (30,), 0.1) * 50)
    norms = [float(np.sqrt(np.sum(d.numpy() ** 2))) for d in deltas]
    lo, hi = sorted(norms)[1:3]
    cap = 1.5 * (lo + hi) / 2
    out = run("clipped", base, [base + d for d in deltas], [{"weight": "1"}] * 4,
              {"then": "task_arithmetic", "clip": "1.5"})
    ref = base.clone()
    for d, n in zip(deltas, norms, strict=True):
        ref = ref + (d * (cap / n) if n > cap else d)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    # clip large enough: plain task arithmetic
    plain = run("task_arithmetic", base, [base + d for d in deltas], [{"weight": "1"}] * 4, {})
    same = run("clipped", base, [base + d for d in deltas], [{"weight": "1"}] * 4,
               {"then": "task_arithmetic", "clip": "1000"})
    assert torch.allclose(plain, same, rtol=0, atol=1e-12)


def test_clipped_checks_then_and_its_parameters() -> None:
    m = get_method("clipped")
    with pytest.raises(BadParameter, match="then"):
        m.validate_recipe({"clip": "1"})
    with pytest.raises(BadParameter, match="then"):
        m.validate_recipe({"then": "slerp"})
    with pytest.raises(BadParameter, match="density"):
        m.validate({"then": "ties"}, [{"weight": "1", "density": "2"}])
    with pytest.raises(BadParameter, match="weight"):
        m.validate({"then": "ties"}, [{}])  # ties requires a weight
    m.validate({"then": "ties", "clip": "2"}, [{"weight": "1", "density": "0.5"}])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**6), perm=st.permutations(range(4)))
def test_clipped_median_is_order_free(seed, perm) -> None:
    base, donors = _donors(seed, 4, dtype=torch.bfloat16)
    out = run("clipped", base, donors, [{}] * 4, {"then": "median", "clip": "1"})
    again = run("clipped", base, [donors[i] for i in perm], [{}] * 4,
                {"then": "median", "clip": "1"})
    assert same_bits(out, again)


# -- poisoning ---------------------------------------------------------------------------------

SHAPE = (64, 48)
ROBUST_BOUND = 0.15  # |merge - honest mean| / |honest mean delta|
BROKEN_BOUND = 0.25


def _poisoned(kind: str):
    base = tensor("p/base", SHAPE, 1.0)
    signal = tensor("p/s", SHAPE, 0.05)
    honest = [base + signal + tensor(f"p/n{i}", SHAPE, 0.01) for i in range(4)]
    own = signal + tensor("p/n4", SHAPE, 0.01)  # what the fifth site should have sent
    noise = tensor("p/noise", SHAPE, 1.0)
    poison = {
        "x100": base + own * 100,
        "flip": base - own,
        "noise": base + noise * (float(own.norm()) / float(noise.norm())),
    }[kind]
    mean = base + ((((honest[0] - base) + (honest[1] - base)) + (honest[2] - base))
                   + (honest[3] - base)) / 4
    return base, honest, poison, mean


def _distance(out, mean, base) -> float:
    return float((out - mean).norm()) / float((mean - base).norm())


ROBUST = {
    "median": ({}, {}),
    "trimmed_mean": ({}, {"trim": 1}),
    "clipped/trimmed_mean": ({}, {"then": "trimmed_mean", "trim": 1}),
}


@pytest.mark.parametrize("kind", ["x100", "flip", "noise"])
def test_one_poisoned_donor_of_five(kind) -> None:
    base, honest, poison, mean = _poisoned(kind)
    for position in (0, 4):  # wherever the poisoned donor sits
        donors = list(honest)
        donors.insert(position, poison)
        for name, (params, options) in ROBUST.items():
            method = name.split("/")[0]
            out = run(method, base, donors, [params] * 5, options)
            assert _distance(out, mean, base) <= ROBUST_BOUND, (name, kind)
        linear = run("linear", None, donors, [{"weight": "1"}] * 5)
        assert _distance(linear, mean, base) > BROKEN_BOUND, ("linear", kind)
        ties = run("ties", base, donors, [{"weight": "1"}] * 5)
        if kind == "flip":  # one flipped donor loses the sign election: TIES resists it
            assert _distance(ties, mean, base) <= ROBUST_BOUND
        else:
            assert _distance(ties, mean, base) > BROKEN_BOUND, ("ties", kind)
        # clipping alone answers a scaled delta (not a same-norm one)
        clipped_ties = run("clipped", base, donors, [{"weight": "1"}] * 5, {"then": "ties"})
        if kind == "x100":
            assert _distance(clipped_ties, mean, base) <= ROBUST_BOUND
