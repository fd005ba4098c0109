"""The Gram route of crdt_merge.families.align against LAPACK's SVD: spectra within the
noise floor, the kept singular vectors, and the identity cases on ill-conditioned and
rank-deficient matrices (where squaring loses the most)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt_merge.families.align import (
    GRAM_BLOCK,
    INVERSE_MAX,
    NOISE_FLOOR,
    eigenvalues,
    from_eigenvalues,
    gram,
    kept_vectors,
    merge_matrix,
    singular_values,
    start_vector,
)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gaussian(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthonormal(seed: int, rows: int, cols: int) -> torch.Tensor:
    q, r = torch.linalg.qr(gaussian(seed, rows, cols))
    return q * torch.sign(torch.diagonal(r))[None, :]


def planted(seed: int, m: int, n: int, spectrum: torch.Tensor) -> torch.Tensor:
    """``U diag(spectrum) V^T`` with random orthonormal ``U`` (m x r), ``V`` (n x r)."""
    r = spectrum.numel()
    return (orthonormal(seed, m, r) * spectrum[None, :]) @ orthonormal(seed + 1, n, r).T


def decaying(r: int, condition: float, zeros: int = 0) -> torch.Tensor:
    """``r`` singular values from 1 down to ``1 / condition`` (log-spaced), the last
    ``zeros`` of them exactly 0."""
    s = torch.logspace(0.0, -torch.log10(torch.tensor(condition)).item(), r, dtype=torch.float64)
    if zeros:
        s[-zeros:] = 0.0
    return s


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int64), b.view(torch.int64))


MATRICES = {
    "gaussian 64x64": lambda: gaussian(1, 64, 64),
    "gaussian 300x120": lambda: gaussian(2, 300, 120),
    "gaussian 90x700": lambda: gaussian(3, 90, 700),
    "planted 1e3 200x150": lambda: planted(4, 200, 150, decaying(150, 1e3)),
    "planted 1e6 150x200": lambda: planted(6, 150, 200, decaying(150, 1e6)),
    "planted 1e12 120x120": lambda: planted(8, 120, 120, decaying(120, 1e12)),
    "rank 40 of 100": lambda: planted(10, 100, 130, decaying(100, 1e2, zeros=60)),
    "power law 256x688": lambda: planted(12, 256, 688, 1.0 / torch.arange(1, 257,
                                                                             dtype=torch.float64)),
}


@pytest.mark.parametrize("name", MATRICES)
def test_squared_spectra_match_lapack_svd_within_the_noise_floor(name: str) -> None:
    """The Gram route's spectrum against ``torch.linalg.svdvals``: the squares agree to
    within the noise floor ``2^-40 sigma_0^2`` (so the floor hides the route's own error), and
    each singular value to the relative error squaring predicts, ``64 eps (sigma_0/sigma_i)^2``."""
    a = MATRICES[name]()
    ours, ref = singular_values(a), torch.linalg.svdvals(a)
    assert ours.shape == ref.shape and bool((ours[:-1] >= ours[1:]).all())
    top = float(ref[0])
    squared = (ours * ours - ref * ref).abs().max()
    assert float(squared) <= NOISE_FLOOR * top * top
    big = ref >= 1e-6 * top
    relative = (ours - ref).abs()[big] / ref[big]
    assert bool((relative <= 64 * 2.0**-52 * (top / ref[big]) ** 2).all())


def test_gram_is_the_lower_triangle_of_the_smaller_gram_matrix_in_blocks() -> None:
    for shape in ((GRAM_BLOCK + 100, GRAM_BLOCK + 30), (40, GRAM_BLOCK * 2 + 7), (9, 4)):
        x = gaussian(sum(shape), *shape)
        g = gram(x)
        y = x if shape[0] >= shape[1] else x.T
        r = min(shape)
        assert g.shape == (r, r)
        exact = y.T @ y
        low = torch.tril(torch.ones(r, r, dtype=torch.bool))
        assert torch.allclose(g[low], exact[low], rtol=0, atol=1e-12 * float(exact.abs().max()))
        for i in range(0, r, GRAM_BLOCK):
            assert not g[i:i + GRAM_BLOCK, i + GRAM_BLOCK:].any()  # never computed, never read
    with pytest.raises(ValueError, match="overflows"):
        gram(torch.full((3, 2), 1e200, dtype=torch.float64))


def test_eigenvalues_below_zero_give_zero_singular_values() -> None:
    lam = torch.tensor([-1e-20, -0.0, 0.0, 4.0, 9.0], dtype=torch.float64)
    got = from_eigenvalues(lam)
    assert got.tolist() == [3.0, 2.0, 0.0, 0.0, 0.0]
    assert not torch.signbit(got).any()


def test_the_start_vector_is_a_fixed_counter_stream() -> None:
    b = start_vector(5)
    expected = [((2654435761 * t + 1013904223) % 2**32) / 2**32 - 0.5 for t in range(5)]
    assert b.tolist() == expected and bool((b.abs() <= 0.5).all())


@pytest.mark.parametrize("name", ["gaussian 300x120", "planted 1e6 150x200", "power law 256x688"])
def test_kept_vectors_are_the_svds_singular_vectors(name: str) -> None:
    a = MATRICES[name]()
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    small_side = vh if a.shape[0] >= a.shape[1] else u.T  # the Gram's eigenvectors, as rows
    g = gram(a)
    lam = eigenvalues(g)
    r = min(a.shape)
    kept = [0, 1, r // 2, r - 2, r - 1]
    for ask in (kept, list(range(INVERSE_MAX + 1))):
        vectors, how = kept_vectors(g, lam, ask)
        assert how == ("inverse" if len(ask) <= INVERSE_MAX else "eigh")
        gram_of_found = vectors.T @ vectors
        assert torch.allclose(gram_of_found, torch.eye(len(ask), dtype=torch.float64),
                              atol=1e-13)
        for column, i in enumerate(ask):
            # sin of the angle to the SVD's vector, against the eigenvector's error bound
            # eps ||G|| / gap (the gap in squared singular values to the nearest neighbour)
            gaps = (s * s - s[i] * s[i]).abs()
            gaps[i] = float("inf")
            bound = 64 * 2.0**-52 * float(s[0]) ** 2 / float(gaps.min())
            x, y = vectors[:, column], small_side[i]
            sine = min(float((x - y).norm()), float((x + y).norm()))
            assert sine <= max(bound, 1e-13), (i, sine, bound)


def test_a_singular_shift_falls_back_to_eigh() -> None:
    """Gram eigenvalues 2^50, 5 and 4 exactly: the shift for index 2 is 4 + 2^-50 * 2^50
    = 5, an eigenvalue, so the factorisation is singular and the vectors come from eigh."""
    a = torch.zeros(4, 3, dtype=torch.float64)
    a[0, 0] = 2.0**25
    a[1, 1], a[2, 1] = 1.0, 2.0
    a[3, 2] = 2.0
    g = gram(a)
    lam = eigenvalues(g)
    assert lam.tolist() == [4.0, 5.0, 2.0**50]
    vectors, how = kept_vectors(g, lam, [2])
    assert how == "eigh" and vectors[:, 0].abs().tolist() == [0.0, 0.0, 1.0]
    vectors, how = kept_vectors(g, lam, [0])
    assert how == "inverse"
    assert torch.allclose(vectors[:, 0].abs(), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                          rtol=0, atol=1e-30)


def test_clustered_kept_values_get_orthonormal_vectors_of_the_cluster() -> None:
    """Three equal singular values and two within 1e-13: the kept vectors are orthonormal
    and lie in the cluster's singular subspace, so the update still has norm ||g||."""
    spectrum = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0 + 1e-13, 1.0, 0.5], dtype=torch.float64)
    a = planted(20, 40, 7, spectrum)
    g = gram(a)
    lam = eigenvalues(g)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    vectors, how = kept_vectors(g, lam, [1, 2, 4, 5])
    assert how == "inverse"
    assert torch.allclose(vectors.T @ vectors, torch.eye(4, dtype=torch.float64), atol=1e-12)
    for cols, rows in (([0, 1], [1, 2, 3]), ([2, 3], [4, 5])):
        inside = vh[rows] @ vectors[:, cols]  # components in the cluster's subspace
        assert torch.allclose((inside * inside).sum(0), torch.ones(2, dtype=torch.float64),
                              atol=1e-12)


@st.composite
def ill_conditioned(draw):
    seed = draw(st.integers(0, 2**31))
    m, n = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    r = min(m, n)
    zeros = draw(st.integers(0, r - 1))
    condition = draw(st.sampled_from([1e2, 1e6, 1e10, 1e14]))
    scale = draw(st.sampled_from([1e-3, 1.0, 37.0]))
    return seed, m, n, decaying(r, condition, zeros) * scale


@SETTINGS
@given(ill_conditioned(), st.integers(0, 6), st.integers(0, 6))
def test_an_ill_conditioned_anchor_rotated_on_both_sides_is_left_alone(case, grow_m, grow_n):
    """Where squaring loses most (condition up to 1e14, exact zeros), a donor with the
    anchor's spectrum in other coordinates and wider shapes still changes no bit."""
    seed, m, n, spectrum = case
    a = planted(seed, m, n, spectrum)
    donor = orthonormal(seed + 7, m + grow_m, m) @ a @ orthonormal(seed + 9, n + grow_n, n).T
    for k in (1, 4, INVERSE_MAX + 1):
        merged = merge_matrix(a, [donor], [1.0], tau=1.0, k=k, beta=0.0)
        assert same_bits(merged.out, a) and merged.kept == ()
    assert same_bits(merge_matrix(a, [a.clone()], [1.0], tau=1.0, k=3, beta=0.0).out, a)


def test_directions_the_anchor_does_not_resolve_never_change() -> None:
    """A rank-3 anchor and a full-rank donor: only the anchor's three resolved directions
    may change (its null space has no singular vectors the anchor determines)."""
    a = planted(30, 12, 9, torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    donor = planted(31, 12, 9, torch.tensor([1.0] * 9, dtype=torch.float64) * 3)
    merged = merge_matrix(a, [donor], [1.0], tau=10.0, k=9, beta=0.0)
    assert merged.kept and set(merged.kept) <= {0, 1, 2}
    s = torch.linalg.svdvals(merged.out)
    assert float(s[3:].max()) <= 1e-12 * float(s[0])  # still rank 3
