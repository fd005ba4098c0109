"""The alignment maths of crdt_merge.families.align: laws as Hypothesis properties."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt_merge.families.align import (
    INVERSE_MAX,
    NOISE_FLOOR,
    depth_map,
    merge_matrix,
    procrustes,
    single_thread,
    singular_values,
    spectral_delta,
    top_k,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gaussian(seed: int, *shape: int) -> torch.Tensor:
    """Fixed float64 values from an explicit generator (never the global RNG)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthonormal_columns(seed: int, rows: int, cols: int) -> torch.Tensor:
    """A (rows x cols) matrix with orthonormal columns (rows >= cols), from a QR."""
    q, r = torch.linalg.qr(gaussian(seed, rows, cols))
    return q * torch.sign(torch.diagonal(r))[None, :]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int64), b.view(torch.int64))


def dims() -> st.SearchStrategy[int]:
    return st.integers(min_value=1, max_value=24)


# -- depth map ------------------------------------------------------------------------------


@given(st.integers(1, 80), st.integers(1, 80))
def test_depth_map_is_round_half_up_of_the_proportional_layer(la: int, ld: int) -> None:
    pi = depth_map(la, ld)
    assert len(pi) == la and pi[0] == 0
    assert all(0 <= p < ld for p in pi) and pi == sorted(pi)
    if la > 1:
        assert pi[-1] == ld - 1
        for layer, p in enumerate(pi):
            exact = Fraction(layer * (ld - 1), la - 1)
            assert p == int(exact + Fraction(1, 2))  # round half up, in exact rationals


def test_depth_map_examples() -> None:
    assert depth_map(30, 18)[:6] == [0, 1, 1, 2, 2, 3] and depth_map(30, 18)[-1] == 17
    assert depth_map(18, 30)[:4] == [0, 2, 3, 5]
    assert depth_map(4, 4) == [0, 1, 2, 3] and depth_map(1, 7) == [0] and depth_map(3, 1) == [0] * 3
    with pytest.raises(ValueError):
        depth_map(0, 3)


# -- Procrustes -----------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), p=st.integers(2, 12), extra=st.integers(0, 6),
       n=st.integers(16, 40))
def test_procrustes_recovers_a_planted_rotation(seed: int, p: int, extra: int, n: int) -> None:
    source = gaussian(seed, p, n)
    rotation = orthonormal_columns(seed + 1, p + extra, p)  # square, or into a wider space
    found = procrustes(source, rotation @ source)
    assert found.shape == rotation.shape
    assert float((found - rotation).abs().max()) < 1e-10


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), m=dims(), n=dims(), grow_m=st.integers(0, 5),
       grow_n=st.integers(0, 5))
def test_an_anchor_rotated_on_both_sides_aligns_to_zero_delta(seed, m, n, grow_m, grow_n) -> None:
    """A donor R A Q^T of other (wider) shapes has the anchor's spectrum: its delta is 0, and
    the merge leaves the anchor's bits, although widths differ."""
    a = gaussian(seed, m, n)
    donor = orthonormal_columns(seed + 1, m + grow_m, m) @ a @ orthonormal_columns(seed + 2, n + grow_n, n).T
    spectrum = spectral_delta(singular_values(a), singular_values(donor))
    assert abs(spectrum.scale - 1) < 1e-12
    assert not spectrum.delta.any()
    merged = merge_matrix(a, [donor], [1.0], tau=0.5, k=4, beta=0.0)
    assert same_bits(merged.out, a) and merged.kept == ()


# -- the merge's laws -----------------------------------------------------------------------


@st.composite
def merge_cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    m, n = draw(dims()), draw(dims())
    count = draw(st.integers(1, 3))
    shapes = [(draw(dims()), draw(dims())) for _ in range(count)]
    donors = [gaussian(seed + 1 + j, *shape) * draw(st.floats(0.1, 10)) for j, shape in enumerate(shapes)]
    weights = [draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])) for _ in shapes]
    anchor = gaussian(seed, m, n)
    condition = draw(st.sampled_from([None, 1e4, 1e8]))
    if condition is not None:  # a planted, log-spaced spectrum: where squaring costs most
        r = min(m, n)
        spectrum = torch.logspace(0, -math.log10(condition), r, dtype=torch.float64)
        anchor = (orthonormal_columns(seed + 5, m, r) * spectrum) @ orthonormal_columns(seed + 6, n, r).T
    return (anchor, donors, weights, draw(st.sampled_from([0.0, 0.01, 0.05, 0.2, 1.0, 10.0])),
            draw(st.integers(0, 6)), draw(st.sampled_from([0.0, 0.3, 0.6, 0.9, 1.0])))


@SETTINGS
@given(merge_cases())
def test_rank_trust_region_and_spectrum(case) -> None:
    a, donors, weights, tau, k, beta = case
    result = merge_matrix(a, donors, weights, tau=tau, k=k, beta=beta)
    update = result.out - a
    assert len(result.kept) <= k
    if not result.kept:
        assert same_bits(result.out, a)
        return
    # out - A is the rank <= k update plus one rounding of each entry of A + update
    noise = 1e-12 * float(torch.linalg.matrix_norm(a, ord=2))
    assert int(torch.linalg.matrix_rank(update, atol=noise, rtol=0)) <= k
    bound = (1 - beta) * tau * float(torch.linalg.matrix_norm(a))
    assert float(torch.linalg.matrix_norm(update)) <= bound * (1 + 1e-9) + 1e-300
    # the output keeps the anchor's singular vectors: its spectrum is sigma + g, all >= 0
    # (checked against LAPACK's SVD, not against the Gram route under test)
    sigma = torch.linalg.svdvals(a)
    expected = sigma.clone()
    for i, g in zip(result.kept, result.gains, strict=True):
        expected[i] = expected[i] + g
    assert bool((expected >= -1e-12 * float(sigma[0])).all())
    got = torch.linalg.svdvals(result.out)
    assert torch.allclose(got, expected.sort(descending=True).values, atol=1e-9 * float(sigma[0]))


@SETTINGS
@given(merge_cases())
def test_a_donor_equal_to_the_anchor_or_beta_one_leaves_the_anchor(case) -> None:
    a, donors, weights, tau, k, _ = case
    assert same_bits(merge_matrix(a, [a.clone()], [1.0], tau=tau, k=k, beta=0.0).out, a)
    assert same_bits(merge_matrix(a, donors, weights, tau=tau, k=k, beta=1.0).out, a)
    assert same_bits(merge_matrix(a, [torch.zeros(3, 5, dtype=torch.float64)], [1.0],
                                  tau=tau, k=k, beta=0.0).out, a)


@SETTINGS
@given(merge_cases())
def test_thread_count_does_not_change_a_bit(case) -> None:
    a, donors, weights, tau, k, beta = case
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge_matrix(a, donors, weights, tau=tau, k=k, beta=beta).out
        torch.set_num_threads(2)
        two = merge_matrix(a, donors, weights, tau=tau, k=k, beta=beta).out
        assert torch.get_num_threads() == 2  # single_thread restored the caller's count
    finally:
        torch.set_num_threads(before)
    assert same_bits(one, two)


def test_single_thread_makes_lapack_ignore_the_callers_thread_count() -> None:
    """MKL's bits follow the thread count (measured: see the module docstring of
    crdt_merge.families.align), so every BLAS and LAPACK call runs inside single_thread()."""
    a = gaussian(7, 300, 200)
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with single_thread():
                assert torch.get_num_threads() == 1
                runs[threads] = torch.linalg.eigvalsh(a.T @ a)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert same_bits(runs[1], runs[2])


@pytest.mark.parametrize("k", [3, INVERSE_MAX + 2])
def test_a_matrix_large_enough_for_mkl_threads_gives_the_same_bits(k: int) -> None:
    """Several Gram blocks, LAPACK sizes where MKL would use two threads, and both ways of
    finding the kept vectors (inverse iteration, eigh): the caller's thread count never
    shows in the bits."""
    a, w = gaussian(11, 700, 560), gaussian(12, 900, 600) * 1.5
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            runs.append(merge_matrix(a, [w], [1.0], tau=0.2, k=k, beta=0.3))
    finally:
        torch.set_num_threads(before)
    assert runs[0].vectors == ("inverse" if k <= INVERSE_MAX else "eigh")
    assert len(runs[0].kept) == k
    for other in runs[1:]:
        assert other.kept == runs[0].kept and other.gains == runs[0].gains
        assert same_bits(other.out, runs[0].out)


def test_donor_scale_does_not_matter_and_a_zero_donor_counts_as_no_change() -> None:
    a, w = gaussian(1, 12, 9), gaussian(2, 20, 11)
    one = merge_matrix(a, [w], [1.0], tau=0.3, k=3, beta=0.2)
    scaled = merge_matrix(a, [w * 37.5], [1.0], tau=0.3, k=3, beta=0.2)
    assert one.kept == scaled.kept and torch.allclose(one.out, scaled.out, rtol=0, atol=1e-12)
    zero = torch.zeros(20, 11, dtype=torch.float64)
    half = merge_matrix(a, [w, zero], [1.0, 1.0], tau=10.0, k=3, beta=0.0)
    assert half.gains == pytest.approx([g / 2 for g in merge_matrix(
        a, [w], [1.0], tau=10.0, k=3, beta=0.0).gains], rel=1e-12)


def test_top_k_ties_go_to_the_lower_index_and_zeros_are_never_kept() -> None:
    d = torch.tensor([0.0, -2.0, 2.0, 1.0, -1.0, 0.0], dtype=torch.float64)
    assert top_k(d, 1) == [1] and top_k(d, 3) == [1, 2, 3] and top_k(d, 10) == [1, 2, 3, 4]


def test_the_noise_floor_applies_to_squares_relative_to_the_largest() -> None:
    """``d_i = 0`` where ``|d_i| (rho_i + sigma_i) <= 2^-40 sigma_0^2`` (noise of the squared
    route) or ``sigma_i^2 <= 2^-40 sigma_0^2`` (a direction the anchor does not resolve),
    each operation rounded as the spec writes it."""
    sigma = torch.tensor([4.0, 2.0, 0.125, 2.0**-30], dtype=torch.float64)
    omega = [4.0, 2.0 + 2.0**-44, 0.125, 2.0**-16]
    spectrum = spectral_delta(sigma, torch.tensor(omega, dtype=torch.float64))
    s = spectrum.scale
    exact = (sum(Fraction(a) * Fraction(b) for a, b in zip(sigma.tolist(), omega, strict=True))
             / sum(Fraction(b) ** 2 for b in omega))
    assert abs(Fraction(s) - exact) <= exact * Fraction(2) ** -50
    floor = NOISE_FLOOR * (4.0 * 4.0)
    expected = []
    for x, w in zip(sigma.tolist(), omega, strict=True):
        rho = w * s
        d = rho - x
        expected.append(0.0 if abs(d) * (rho + x) <= floor or x * x <= floor else d)
    assert spectrum.delta.tolist() == expected
    # index 2 is noise (|rho^2 - sigma^2| tiny); index 3 differs a lot, but sigma_3^2 = 2^-60
    # is below the floor: the anchor has no resolved direction there to change
    assert expected[0] != 0 and expected[1] != 0 and expected[2] == 0 and expected[3] == 0
    assert abs(omega[3] * s - 2.0**-30) * (omega[3] * s + 2.0**-30) > floor


def test_bad_input_is_refused() -> None:
    a = gaussian(0, 3, 3)
    with pytest.raises(TypeError):
        merge_matrix(a.float(), [a], [1.0], tau=0.1, k=1, beta=0.5)
    with pytest.raises(ValueError):
        merge_matrix(a, [a], [1.0, 2.0], tau=0.1, k=1, beta=0.5)
    with pytest.raises(ValueError):
        merge_matrix(a, [a], [-1.0], tau=0.1, k=1, beta=0.5)
    with pytest.raises(ValueError):
        merge_matrix(a, [a], [1.0], tau=0.1, k=1, beta=1.5)
