"""Cross-family alignment: depth maps and the spectral Procrustes merge of one matrix.

Pure float64 tensor maths, no store and no families data (specs/cross-family.md is
normative; every formula below is written there with its rounding order).

An anchor matrix ``A`` (m x n) and donor matrices ``W_j`` (any shapes: widths, head counts
and GQA groups may differ) share no coordinate system. The orthogonal Procrustes problem
with a scale, over partial isometries ``P`` (m x m_j) and ``Q`` (n x n_j) of rank
``r_j = min(m, n, m_j, n_j)``::

    min over s >= 0, P, Q of  || A - s P W_j Q^T ||_F

is solved by ``P W_j Q^T = U_r diag(omega_r) V_r^T`` (von Neumann's trace inequality; ``U, V``
the anchor's singular vectors, ``omega`` the donor's singular values) and the least-squares
scale ``s_j = <sigma_r, omega_r> / <omega_r, omega_r>``. So the aligned donor lives in the
anchor's singular frame and differs from ``A`` only in its spectrum: ``P`` and ``Q`` are
never formed, and the donor's rotations, signs, head order and GQA grouping cannot matter.

:func:`merge_matrix` turns the donors' spectral differences into a rank <= k update of ``A``
inside a trust region, blended with the anchor by ``beta``.

The Gram route (``ALIGN_VERSION`` 2). No SVD is taken: every spectrum is the square root of
the eigenvalues of the matrix's smaller Gram matrix (:func:`gram`, blockwise BLAS products
of its lower triangle, then LAPACK's ``syevd`` without vectors), and only the ``k`` kept
singular directions of the anchor are computed, by shifted inverse iteration on the same
Gram matrix (one ``sytrf`` factorisation each; one ``eigh`` when more than
``INVERSE_MAX`` are kept), the other side by one matrix-vector product. At 7B widths this
is several times cheaper than two SVDs (docs/benchmarks.md). Squaring costs the small
singular values accuracy (absolute error about ``eps sigma_0^2 / sigma_i`` instead of
``eps sigma_0``), so the noise floor is applied to squares: differences with
``|rho_i^2 - sigma_i^2| <= 2^-40 sigma_0^2`` are noise, and anchor directions with
``sigma_i^2 <= 2^-40 sigma_0^2`` (not resolved by the anchor) never change.

Determinism: MKL's results depend on the thread count even under ``MKL_CBWR=COMPATIBLE``
(measured, torch 2.13, MKL 2024.2) and on the ``MKL_CBWR`` mode; with one thread and
``COMPATIBLE`` they are repeatable across processes and ignore ``ATEN_CPU_CAPABILITY``.
Every BLAS and LAPACK call here therefore runs with one torch thread
(:func:`single_thread`), whatever the caller set. Everything else is correctly rounded
elementwise arithmetic or :mod:`crdt_merge.numeric`'s fixed-order reductions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from crdt_merge.lazy import torch
from crdt_merge.numeric import fixed_dot, fixed_norm

#: squared spectral differences at or below ``NOISE_FLOOR * sigma_0^2`` are float64
#: round-off of the Gram route (an anchor rotated on both sides has the same squared
#: singular values up to ~1e-15 sigma_0^2) and are set to zero, so such a donor leaves the
#: anchor's bytes alone; anchor directions with ``sigma_i^2`` at or below it are not resolved
NOISE_FLOOR = 2.0**-40
#: columns per block of :func:`gram` (the blocks are separate BLAS calls, so the block size
#: is part of the numeric profile)
GRAM_BLOCK = 512
#: solves per kept direction in the inverse iteration
INVERSE_STEPS = 3
#: kept directions beyond this many come from one full ``eigh`` instead
INVERSE_MAX = 8
#: the inverse iteration's shift past the eigenvalue, relative to the largest eigenvalue: a
#: few ulps, so that it converges as fast as the eigenvalue's own accuracy allows
SHIFT = 2.0**-50
#: the start vector of the inverse iteration: ``((A * t + C) mod 2^32) / 2^32 - 1/2``
START_MUL, START_ADD = 2654435761, 1013904223


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the body with one torch (and MKL) thread, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_matrix(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float64 or x.dim() != 2:
        raise TypeError(f"{what} must be a 2-D float64 tensor")


def _tall(x: torch.Tensor) -> torch.Tensor:
    """``x`` if it has at least as many rows as columns, else its transpose (a view)."""
    return x if x.shape[0] >= x.shape[1] else x.T


def gram(x: torch.Tensor) -> torch.Tensor:
    """The lower triangle of the smaller Gram matrix of ``x`` (float64, one thread).

    With ``y = x`` when ``x`` has at least as many rows as columns and ``y = x^T`` otherwise
    (``y`` is p x r with p >= r), ``G = y^T y`` (r x r). Blocks of ``GRAM_BLOCK`` columns:
    for each pair of block indices ``J <= I`` (row-major order), ``G[I, J] = y[:, I]^T
    y[:, J]`` by one ``torch.matmul``. Entries above the diagonal outside the diagonal
    blocks stay 0; nothing reads above the diagonal.

    Raises:
        ValueError: the Gram matrix overflows (entries of ``x`` beyond about 1e150).
    """
    _check_matrix(x, "x")
    y = _tall(x)
    r = y.shape[1]
    g = torch.zeros(r, r, dtype=torch.float64)
    with single_thread():
        for i in range(0, r, GRAM_BLOCK):
            for j in range(0, i + 1, GRAM_BLOCK):
                g[i:i + GRAM_BLOCK, j:j + GRAM_BLOCK] = torch.matmul(
                    y[:, i:i + GRAM_BLOCK].T, y[:, j:j + GRAM_BLOCK])
    if not bool(torch.isfinite(g).all()):
        raise ValueError("the matrix's Gram matrix overflows float64 (entries beyond ~1e150)")
    return g


def eigenvalues(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric ``g`` from its lower triangle, ascending (LAPACK
    ``syevd`` without vectors, one thread)."""
    if g.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    with single_thread():
        return torch.linalg.eigvalsh(g)


def from_eigenvalues(lam: torch.Tensor) -> torch.Tensor:
    """Singular values, descending, from ascending Gram eigenvalues: ``sqrt(lam)`` where
    ``lam > 0``, else ``+0``."""
    lam = lam.flip(0)
    return torch.where(lam > 0, torch.sqrt(lam.clamp(min=0.0)), torch.zeros_like(lam))


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """All ``min(m, n)`` singular values of ``x``, descending, by the Gram route.

    The one routine that computes every spectrum compared here: the anchor's and the
    donors' come from the same calls, so a donor bit-identical to the anchor has a
    bit-identical spectrum."""
    return from_eigenvalues(eigenvalues(gram(x)))


def depth_map(anchor_layers: int, donor_layers: int) -> list[int]:
    """The donor layer each anchor layer reads: ``pi(l) = round_half_up(l (L_d-1)/(L_a-1))``.

    In integers: ``pi(l) = floor((2 l (L_d - 1) + L_a - 1) / (2 (L_a - 1)))``, with
    ``pi(0) = 0`` when the anchor has one layer. First maps to first, last to last, and
    the map is monotone.

    Raises:
        ValueError: a layer count below 1.
    """
    if anchor_layers < 1 or donor_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got {anchor_layers} and {donor_layers}")
    if anchor_layers == 1:
        return [0]
    den = 2 * (anchor_layers - 1)
    return [(2 * layer * (donor_layers - 1) + anchor_layers - 1) // den
            for layer in range(anchor_layers)]


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The one-sided orthogonal Procrustes solution ``R = argmin ||R source - target||_F``.

    ``source`` is (p x n), ``target`` (q x n); ``R`` (q x p) has orthonormal rows or columns
    (a partial isometry when ``p != q``): ``R = U Vh`` from the SVD ``target source^T =
    U diag(S) Vh``. Used to check the alignment against planted rotations; the merge itself
    never forms ``R`` (see the module docstring).
    """
    _check_matrix(source, "source")
    _check_matrix(target, "target")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} "
                         "must have the same number of columns")
    with single_thread():
        u, _, vh = torch.linalg.svd(target @ source.T, full_matrices=False)
        return u @ vh


@dataclass(frozen=True)
class Spectrum:
    """One donor's spectral difference from the anchor, before combination.

    Attributes:
        scale: the least-squares Procrustes scale ``s_j`` (0.0 for a zero donor).
        delta: ``d_j`` with one entry per anchor singular value (zero past ``r_j``, where
            the squared difference is at the noise floor, and where the anchor's own
            squared singular value is).
    """

    scale: float
    delta: torch.Tensor


def spectral_delta(sigma: torch.Tensor, omega: torch.Tensor) -> Spectrum:
    """Donor spectrum ``omega`` against the anchor's ``sigma`` (both descending).

    ``r = min(len(sigma), len(omega))``; ``s = fixed_dot(sigma_r, omega_r) /
    fixed_dot(omega_r, omega_r)`` (``0`` when the donor is zero); ``rho_i = omega_i * s``,
    ``d_i = rho_i - sigma_i`` for ``i < r`` and ``0`` beyond; with ``f = NOISE_FLOOR *
    (sigma_0 * sigma_0)``, ``d_i = 0`` where ``|d_i| * (rho_i + sigma_i) <= f`` (noise) or
    ``sigma_i * sigma_i <= f`` (a direction the anchor does not resolve).
    """
    r = min(sigma.numel(), omega.numel())
    delta = torch.zeros_like(sigma)
    den = float(fixed_dot(omega[:r], omega[:r]))
    if r == 0 or den == 0.0:
        return Spectrum(0.0, delta)
    scale = float(fixed_dot(sigma[:r], omega[:r])) / den
    rho = omega[:r] * scale
    d = rho - sigma[:r]
    top = float(sigma[0])
    floor = NOISE_FLOOR * (top * top)
    noise = (d.abs() * (rho + sigma[:r]) <= floor) | (sigma[:r] * sigma[:r] <= floor)
    delta[:r] = torch.where(noise, torch.zeros_like(d), d)
    return Spectrum(scale, delta)


def top_k(delta: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest ``|delta_i|`` among the non-zero ones, ties to the lower
    index, returned in ascending order."""
    values = [abs(float(x)) for x in delta.tolist()]
    ranked = sorted((i for i, v in enumerate(values) if v != 0.0), key=lambda i: (-values[i], i))
    return sorted(ranked[:k])


@dataclass(frozen=True)
class Update:
    """The spectral part of a merge (steps 2 to 6 of specs/cross-family.md section 3).

    Attributes:
        scales: each donor's Procrustes scale ``s_j``.
        kept: the singular indices that change, ascending (at most ``k``).
        gains: the change of each kept singular value, ``g_i``.
        trust: the trust-region factor ``c`` in ``[0, 1]`` (0.0 when nothing is kept).
    """

    scales: tuple[float, ...]
    kept: tuple[int, ...]
    gains: tuple[float, ...]
    trust: float


def plan_update(sigma: torch.Tensor, omegas: Sequence[torch.Tensor], weights: Sequence[float],
                *, tau: float, k: int, beta: float) -> Update:
    """The kept indices and gains from the anchor's spectrum and the donors' (no matrix).

    ``dbar = (((0 + d_0 * w_0) + d_1 * w_1) + ...) / W`` with ``W = ((0 + w_0) + w_1) + ...``
    (``W == 0``: nothing changes); ``K`` = :func:`top_k` of ``dbar``; ``c = min(1, (tau *
    ||sigma||_2) / ||dbar_K||_2)``; ``g_i = ((1 - beta) * c) * dbar_i`` for ``i`` in ``K``.
    """
    total = 0.0
    for w in weights:
        total = total + w
    scales = []
    dbar = torch.zeros_like(sigma)
    for omega, w in zip(omegas, weights, strict=True):
        spectrum = spectral_delta(sigma, omega)
        scales.append(spectrum.scale)
        dbar = dbar + spectrum.delta * w
    if total == 0.0:
        return Update(tuple(scales), (), (), 0.0)
    dbar = dbar / total
    kept = top_k(dbar, k)
    if not kept:
        return Update(tuple(scales), (), (), 0.0)
    index = torch.tensor(kept, dtype=torch.long)
    radius = tau * float(fixed_norm(sigma))
    size = float(fixed_norm(dbar[index]))
    trust = min(1.0, radius / size)
    factor = (1.0 - beta) * trust
    gains = tuple(factor * float(dbar[i]) for i in kept)
    return Update(tuple(scales), tuple(kept), gains, trust)


def start_vector(r: int) -> torch.Tensor:
    """The inverse iteration's fixed start: ``b_t = ((2654435761 t + 1013904223) mod 2^32)
    / 2^32 - 1/2`` for ``t = 0 .. r-1`` (exact in float64)."""
    t = torch.arange(r, dtype=torch.int64)
    h = (t * START_MUL + START_ADD) & 0xFFFFFFFF
    return h.to(torch.float64) / 2.0**32 - 0.5


def _inverse_iteration(g: torch.Tensor, lam: torch.Tensor,
                       columns: Sequence[int]) -> torch.Tensor | None:
    """Eigenvectors of ``g`` for the ascending eigenvalue positions ``columns`` (in that
    order), or None when a factorisation is singular or a vector is not finite."""
    r = g.shape[0]
    shift = SHIFT * float(lam[-1])
    start = start_vector(r)
    found: list[torch.Tensor] = []
    for a in columns:
        shifted = g.clone()
        shifted.diagonal().sub_(float(lam[a]) + shift)
        with single_thread():
            ld, pivots, info = torch.linalg.ldl_factor_ex(shifted)
        del shifted
        if int(info) != 0:
            return None
        x = start
        for _ in range(INVERSE_STEPS):
            with single_thread():
                x = torch.linalg.ldl_solve(ld, pivots, x[:, None])[:, 0]
            for w in found:
                x = x - w * fixed_dot(w, x)
            norm = float(fixed_norm(x))
            if not (math.isfinite(norm) and norm > 0.0):
                return None
            x = x / norm
        found.append(x)
    return torch.stack(found, dim=1)


def kept_vectors(g: torch.Tensor, lam: torch.Tensor,
                 kept: Sequence[int]) -> tuple[torch.Tensor, str]:
    """Unit eigenvectors of the Gram matrix ``g`` for the descending singular indices
    ``kept`` (one column each, in that order) and how they were found.

    Up to ``INVERSE_MAX`` indices: shifted inverse iteration (``"inverse"``); more, or when
    the iteration fails: the columns of one ``eigh`` of ``g`` (``"eigh"``)."""
    r = g.shape[0]
    columns = [r - 1 - i for i in kept]
    if len(columns) <= INVERSE_MAX:
        found = _inverse_iteration(g, lam, columns)
        if found is not None:
            return found, "inverse"
    with single_thread():
        vectors = torch.linalg.eigh(g).eigenvectors
    return vectors[:, columns], "eigh"


@dataclass(frozen=True)
class MatrixMerge:
    """What :func:`merge_matrix` did to one matrix (for tests, benchmarks and reports).

    Attributes:
        out: the merged matrix (float64; the anchor's own values wherever unchanged).
        kept: the singular indices of the update, ascending (at most ``k``).
        gains: the change of each kept singular value, ``g_i``.
        trust: the trust-region factor ``c`` in ``[0, 1]``.
        scales: each donor's Procrustes scale ``s_j``.
        vectors: how the kept singular vectors were found: ``"inverse"``, ``"eigh"``, or
            ``""`` when none were needed.
    """

    out: torch.Tensor
    kept: tuple[int, ...]
    gains: tuple[float, ...]
    trust: float
    scales: tuple[float, ...]
    vectors: str = ""


def merge_matrix(anchor: torch.Tensor, donors: Sequence[torch.Tensor],
                 weights: Sequence[float], *, tau: float, k: int, beta: float) -> MatrixMerge:
    """Merge donor matrices of any shapes into ``anchor`` (specs/cross-family.md, section 3).

    1. ``G = gram(A)``, ``lam = eigenvalues(G)``, ``sigma = from_eigenvalues(lam)``; per
       donor ``omega_j = singular_values(W_j)``;
    2. :func:`plan_update` gives the kept indices ``K`` and gains ``g_i``;
    3. :func:`kept_vectors` gives the small-side singular vector ``e_i`` of each kept index;
       the other side is ``f_i = y e_i / ||y e_i||`` (``y`` the tall one of ``A``, ``A^T``);
       ``(u_i, v_i) = (f_i, e_i)`` when ``A`` is tall (m >= n), else ``(e_i, f_i)``;
    4. ``D = sum over i in K, ascending, of outer(g_i * u_i, v_i)``, from ``+0``;
    5. ``out = A + D`` where ``D != 0``, ``A`` elsewhere.

    Properties (tested): a donor equal to ``A``, or to ``A`` rotated on both sides, and
    ``beta = 1`` leave ``A`` unchanged bit for bit; ``rank(out - A) <= k``;
    ``||out - A||_F <= (1 - beta) tau ||A||_F`` (up to float64 rounding); ``out``'s singular
    values are ``sigma_i + g_i >= 0``, between the anchor's and the donors' mean aligned
    spectrum.

    Args:
        anchor: the anchor matrix, float64 (m x n).
        donors: donor matrices, float64, any shapes, in canonical order.
        weights: one non-negative weight per donor.
        tau: the trust radius, relative to ``||A||_F`` (>= 0).
        k: the most singular directions changed (>= 0).
        beta: the anchor blend in ``[0, 1]``; 1 keeps the anchor.

    Raises:
        ValueError: mismatched donors and weights, a parameter out of range, or a matrix
            whose Gram matrix overflows.
        TypeError: a tensor that is not a 2-D float64 matrix.
    """
    _check_matrix(anchor, "anchor")
    if len(donors) != len(weights):
        raise ValueError(f"{len(donors)} donors but {len(weights)} weights")
    for w in weights:
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"donor weights must be finite and >= 0, got {w}")
    if not (math.isfinite(tau) and tau >= 0) or k < 0 or not 0 <= beta <= 1:
        raise ValueError(f"need tau >= 0, k >= 0 and 0 <= beta <= 1 (got {tau}, {k}, {beta})")
    for donor in donors:
        _check_matrix(donor, "donor")
    if beta == 1.0 or k == 0 or tau == 0.0 or not donors or anchor.numel() == 0:
        return MatrixMerge(anchor, (), (), 0.0, ())
    g = gram(anchor)
    lam = eigenvalues(g)
    sigma = from_eigenvalues(lam)
    update = plan_update(sigma, [singular_values(d) for d in donors], weights,
                         tau=tau, k=k, beta=beta)
    if all(x == 0.0 for x in update.gains):
        return MatrixMerge(anchor, (), (), update.trust, update.scales)
    small, how = kept_vectors(g, lam, update.kept)
    del g
    y = _tall(anchor)
    tall = y is anchor
    delta = torch.zeros_like(anchor)
    for column, gain in enumerate(update.gains):
        e = small[:, column]
        with single_thread():
            f = torch.mv(y, e)
        norm = float(fixed_norm(f))
        if norm == 0.0:
            continue
        f = f / norm
        u, v = (f, e) if tall else (e, f)
        delta.add_((u * gain)[:, None] * v[None, :])
    unchanged = delta == 0
    delta.add_(anchor)  # fl(D + A) == fl(A + D)
    delta[unchanged] = anchor[unchanged]
    return MatrixMerge(delta, update.kept, update.gains, update.trust, update.scales, how)
