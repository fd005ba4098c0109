"""Laws the methods obey, and TIES/breadcrumbs against a plain re-implementation of the spec.

The reference below is written from specs/methods.md with a full sort and exact rational
sign election, on inputs from a dyadic grid (so every float operation is exact and ties are
frequent): it checks the tie rules, not just the easy cases.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge.methods import METHODS, TensorJob, reduce
from crdt_merge.numeric import round_to
from tests.methods.helpers import keys, run, same_bits, tensor

GRID = [x / 4 for x in range(-4, 5)]  # -1 .. 1 in quarters: exact, tie-rich


def grid_tensors(draw, count: int, n: int) -> list[torch.Tensor]:
    return [
        torch.tensor(
            draw(st.lists(st.sampled_from(GRID), min_size=n, max_size=n)), dtype=torch.float64
        )
        for _ in range(count)
    ]


def reference_keep(d: list[float], r0: int, r1: int) -> list[bool]:
    order = sorted(range(len(d)), key=lambda i: (-abs(d[i]), i))
    keep = [False] * len(d)
    for r in range(max(r0, 0), min(r1, len(d))):
        keep[order[r]] = True
    return keep


def reference_merge(base, donors, weights, keeps, consensus, normalize, lam):
    """The generalized task-arithmetic merge with exact arithmetic (Fractions)."""
    n = len(base)
    out = []
    for j in range(n):
        vs = [
            Fraction(donors[i][j] - base[j]) * Fraction(weights[i]) if keeps[i][j] else Fraction(0)
            for i in range(len(donors))
        ]
        if consensus:
            positive = sum(vs) >= 0
            agree = [(v > 0) if positive else (v < 0) for v in vs]
            mixed = sum(v for v, a in zip(vs, agree, strict=True) if a)
            div = sum(Fraction(w) for w, a in zip(weights, agree, strict=True) if a) or Fraction(1)
        else:
            mixed = sum(vs)
            div = sum(Fraction(w) for w in weights)
            div = div if abs(div) >= Fraction(1, 10**8) else Fraction(1)
        if normalize:
            mixed = mixed / div
        out.append(float(Fraction(base[j]) + mixed * Fraction(lam)))
    return out


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_ties_matches_the_reference(data) -> None:
    n = data.draw(st.integers(1, 40))
    count = data.draw(st.integers(1, 4))
    base, *donors = grid_tensors(data.draw, count + 1, n)
    weights = data.draw(
        st.lists(st.sampled_from([0.5, 1.0, 1.5, -0.5]), min_size=count, max_size=count)
    )
    densities = data.draw(
        st.lists(st.sampled_from([0.1, 0.3, 0.5, 1.0]), min_size=count, max_size=count)
    )
    normalize = data.draw(st.booleans())
    lam = data.draw(st.sampled_from([1.0, 0.5]))
    keeps = []
    for x, p in zip(donors, densities, strict=True):
        d = (x - base).tolist()
        keeps.append([True] * n if p >= 1 else reference_keep(d, 0, max(1, int(p * n))))
    expected = reference_merge(
        base.tolist(), [x.tolist() for x in donors], weights, keeps, True, normalize, lam
    )
    got = run(
        "ties",
        base,
        donors,
        [{"weight": repr(w), "density": repr(p)} for w, p in zip(weights, densities, strict=True)],
        {"normalize": normalize, "lambda": repr(lam)},
    )
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_breadcrumbs_matches_the_reference(data) -> None:
    n = data.draw(st.integers(1, 40))
    count = data.draw(st.integers(1, 3))
    base, *donors = grid_tensors(data.draw, count + 1, n)
    density = data.draw(st.sampled_from([0.2, 0.5, 0.9]))
    gamma = data.draw(st.sampled_from([0.0, 0.1, 0.3]))
    consensus = data.draw(st.booleans())
    keeps = []
    for x in donors:
        target, n_top = int(density * n), int(gamma * n)
        n_bot = max(0, n - target - n_top)
        keeps.append(reference_keep((x - base).tolist(), n - n_bot - target, n - n_bot))
    weights = [1.0] * count
    expected = reference_merge(
        base.tolist(), [x.tolist() for x in donors], weights, keeps, consensus, False, 1.0
    )
    got = run(
        "breadcrumbs_ties" if consensus else "breadcrumbs",
        base,
        donors,
        [{"weight": "1", "density": repr(density), "gamma": repr(gamma)}] * count,
    )
    assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_ties_keeps_exactly_k_entries() -> None:
    base = tensor("b", (50, 20))
    donor = base + tensor("d", (50, 20))
    out = run("ties", base, [donor], [{"weight": "1", "density": "0.3"}])
    assert int((out != base).sum()) == 300


def test_sign_election_ignores_donor_order() -> None:
    base = tensor("b", (2000,))
    donors = [base + tensor(f"d{i}", (2000,)) for i in range(4)]
    params = [{"weight": repr(w), "density": "0.6"} for w in (0.4, 1.3, 0.7, 1.0)]
    a = run("ties", base, donors, params)
    perm = [2, 0, 3, 1]
    b = run("ties", base, [donors[i] for i in perm], [params[i] for i in perm])
    assert torch.equal(torch.sign(a - base), torch.sign(b - base))
    assert torch.allclose(a, b, rtol=1e-14, atol=1e-15)


def test_ties_with_density_one_and_agreeing_signs_is_task_arithmetic() -> None:
    base = tensor("b", (30, 7))
    mag = tensor("m", (30, 7)).abs() + 0.1
    sign = torch.sign(tensor("s", (30, 7)))
    donors = [base + sign * mag * k for k in (0.5, 1.0, 2.0)]
    params = [{"weight": w} for w in ("0.2", "0.5", "0.3")]
    ties = run("ties", base, donors, params)
    ta = run("task_arithmetic", base, donors, params, {"normalize": True})
    assert same_bits(ties, ta)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(["1", "0.5", "3", "-2"]))
def test_linear_with_one_donor_is_the_donor(seed, weight) -> None:
    x = tensor(f"x{seed}", (17, 3))
    out = run("linear", None, [x], [{"weight": weight}])
    if weight == "1":
        assert same_bits(out, x)
    assert torch.allclose(out, x, rtol=2**-52, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 10**6),
    st.sampled_from(
        ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "della"]
    ),
)
def test_lambda_zero_or_weight_zero_gives_the_base(seed, method) -> None:
    base = tensor(f"b{seed}", (9, 4))
    donors = [base + tensor(f"d{seed}/{i}", (9, 4)) for i in range(2)]
    params = [{"weight": "0.7", "density": "0.6"}, {"weight": "0.4", "density": "0.6"}]
    assert torch.equal(run(method, base, donors, params, {"lambda": "0"}), base)
    zero = [{"weight": "0", "density": "0.6"}] * 2
    assert torch.equal(run(method, base, donors, zero), base)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6))
def test_slerp_endpoints_are_exact(seed) -> None:
    a, b = tensor(f"a{seed}", (13, 5)), tensor(f"b{seed}", (13, 5))
    assert torch.equal(run("slerp", a, [b], options={"t": "0"}), a)
    assert torch.equal(run("slerp", a, [b], options={"t": "1"}), b)
    # unit vectors: the midpoint is a unit vector at equal angles to both
    ua, ub = a / a.norm(), b / b.norm()
    mid = run("slerp", ua, [ub], options={"t": "0.5"})
    assert mid.norm().item() == pytest.approx(1.0, rel=1e-12)
    assert (mid * ua).sum().item() == pytest.approx((mid * ub).sum().item(), rel=1e-12)


def test_slerp_of_parallel_vectors_is_lerp() -> None:
    a = tensor("p", (40,))
    out = run("slerp", a, [a * 2.0], options={"t": "0.25"})
    assert torch.allclose(out, a * 1.25, rtol=1e-15, atol=0)


def test_nuslerp_laws() -> None:
    a, b, z = tensor("na", (12, 6)), tensor("nb", (12, 6)), tensor("nz", (12, 6))
    w = [{"weight": "1"}, {"weight": "0"}]
    for opts in (
        {},
        {"nuslerp_flatten": False},
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    ):
        assert torch.allclose(run("nuslerp", None, [a, b], w, opts), a, rtol=1e-14, atol=1e-15)
        assert torch.allclose(run("nuslerp", z, [a, b], w, opts), a, rtol=1e-14, atol=1e-15)
    # equal weights and a flattened tensor: the same as slerp at t = 0.5
    assert torch.allclose(
        run("nuslerp", None, [a, b], [{"weight": "1"}] * 2),
        run("slerp", a, [b], options={"t": "0.5"}),
        rtol=1e-14,
        atol=1e-15,
    )


def test_multislerp_karcher_model_stock_laws() -> None:
    a, b, z = tensor("ma", (10, 4)), tensor("mb", (10, 4)), tensor("mz", (10, 4))
    assert same_bits(run("multislerp", z, [a], [{"weight": "0.3"}]), a)
    both = [{"weight": "1"}, {"weight": "1"}]
    assert torch.allclose(run("multislerp", None, [a, a * 3], both), a * 2, rtol=1e-12)
    # two vectors, equal weights: direction halfway, norm the mean of the norms
    m = run("multislerp", None, [a, b], both)
    assert m.norm().item() == pytest.approx((a.norm().item() + b.norm().item()) / 2, rel=1e-9)
    assert torch.allclose(run("karcher", None, [a, a, a], [{}] * 3), a, rtol=1e-12)
    k = run("karcher", None, [a, b], [{}] * 2)
    assert (k / k.norm()).sub(m / m.norm()).abs().max().item() < 1e-9  # same geodesic midpoint
    stock = run("model_stock", z, [a, a], [{}, {}])  # colinear offsets: t = 1, the average
    assert torch.allclose(stock, a, rtol=1e-12)
    for opts in ({}, {"filter_wise": True}):
        opposed = run("model_stock", z, [z + (a - z), z - (a - z)], [{}, {}], opts)
        assert torch.allclose(opposed, z, rtol=0, atol=1e-15)  # cos = -1: t = -inf -> 0


def test_passthrough_copies_and_scales() -> None:
    x = tensor("x", (6, 2))
    out = run("passthrough", None, [x])
    assert same_bits(out, x) and out.data_ptr() != x.data_ptr()
    assert same_bits(run("passthrough", None, [x], [{"scale": "0.5"}]), x * 0.5)


def test_random_methods_at_density_one_are_their_deterministic_twins() -> None:
    base = tensor("b", (25, 8))
    donors = [base + tensor(f"d{i}", (25, 8)) for i in range(3)]
    params = [{"weight": w, "density": "1"} for w in ("0.3", "0.9", "0.5")]
    ta = run("task_arithmetic", base, donors, params)
    ties = run("ties", base, donors, params, {"normalize": False})
    assert same_bits(run("dare_linear", base, donors, params), ta)
    assert same_bits(run("della_linear", base, donors, params), ta)
    assert same_bits(run("dare_ties", base, donors, params), ties)
    assert same_bits(run("della", base, donors, params, {"normalize": False}), ties)


DONORS = {"slerp": 1, "passthrough": 1, "nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}
"""Donor counts of the methods that do not take three."""
OPTIONS = {"slerp": {"t": "0.4"}, "nearswap": {"t": "0.05"}, "clipped": {"then": "ties"}}
"""Required global parameters."""


def test_every_method_is_repeatable() -> None:
    base = tensor("b", (31, 9))
    donors = [base + tensor(f"d{i}", (31, 9)) * 0.1 for i in range(3)]
    for name, m in sorted(METHODS.items()):
        count = DONORS.get(name, 3)
        names = {p.name for p in m.params}
        params = [
            {k: v for k, v in (("weight", "0.6"), ("density", "0.5")) if k in names}
            for _ in range(count)
        ]
        options = dict(OPTIONS.get(name, {}))
        first = run(name, base, donors[:count], params, options)
        assert same_bits(first, run(name, base, donors[:count], params, options)), name


@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 0), (2, 1, 3)])
def test_every_method_handles_odd_shapes(shape) -> None:
    base = torch.full(shape, 0.5, dtype=torch.float64)
    donors = [base + 0.1 * (i + 1) for i in range(3)]
    for name, m in sorted(METHODS.items()):
        count = DONORS.get(name, 3)
        names = {p.name for p in m.params}
        params = [
            {k: v for k, v in (("weight", "0.6"), ("density", "0.5")) if k in names}
            for _ in range(count)
        ]
        modes = [dict(OPTIONS.get(name, {}))]
        modes += [{"nuslerp_flatten": False}] if name == "nuslerp" else []
        modes += [{"filter_wise": True}] if name == "model_stock" else []
        for options in modes:
            out = run(name, None if m.base == "ignored" else base, donors[:count], params, options)
            assert out.shape == base.shape and out.dtype == torch.float64, (name, options)
            assert bool(torch.isfinite(out).all()), (name, options)


@pytest.mark.parametrize("stored, out", [(torch.bfloat16, torch.bfloat16),
                                         (torch.float16, torch.float32),
                                         (torch.float32, torch.float16)])
def test_inputs_in_their_stored_dtype_and_rounding_inside_change_no_bit(
        stored: torch.dtype, out: torch.dtype, monkeypatch) -> None:
    """Every method given inputs in their stored dtype and an output dtype (streaming
    methods widen and round a block at a time) gives the bits of widening to float64 first
    and rounding the float64 result once afterwards, whatever the block size."""
    base64 = tensor("b", (37, 11), 0.05).to(stored).to(torch.float64)
    donors64 = [(base64 + tensor(f"d{i}", (37, 11), 0.01)).to(stored).to(torch.float64)
                for i in range(3)]
    for name, m in sorted(METHODS.items()):
        count = DONORS.get(name, 3)
        names = {p.name for p in m.params}
        params = [
            {k: v for k, v in (("weight", str(0.3 + 0.2 * i)), ("density", "0.6"))
             if k in names} for i in range(count)
        ]
        options = dict(OPTIONS.get(name, {}))
        base = None if m.base == "ignored" else base64
        want = round_to(run(name, base, donors64[:count], params, options), out)
        for block in (8, 1 << 16):
            monkeypatch.setattr(reduce, "BLOCK", block)
            job = TensorJob(
                name="model.layers.0.mlp.weight",
                base=None if base is None else base.to(stored),
                donors=[d.to(stored) for d in donors64[:count]], params=params,
                options=options, keys=keys(count) if m.random else [], out_dtype=out)
            got = m.merge(job)
            assert got.dtype == out, name
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (name, block)
