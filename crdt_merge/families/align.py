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

Determinism: LAPACK's SVD (MKL in torch's CPU wheels) gives different bits with 1 and 2
threads even under ``MKL_CBWR=COMPATIBLE`` (measured, torch 2.13, MKL 2024.2), and different
bits under another ``MKL_CBWR`` mode; with one thread and ``COMPATIBLE`` it is repeatable
across processes and ignores ``ATEN_CPU_CAPABILITY``. Every SVD here therefore runs with
one torch thread (:func:`single_thread`), whatever the caller set. Everything after the
SVD is correctly rounded elementwise arithmetic or :mod:`crdt_merge.numeric`'s fixed-order
reductions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from crdt_merge.numeric import fixed_dot, fixed_norm

#: spectral differences at or below ``NOISE_FLOOR * sigma_1`` are float64 round-off (an
#: anchor rotated on both sides has the same singular values up to ~1e-15 sigma_1) and are
#: set to zero, so such a donor leaves the anchor's bytes alone
NOISE_FLOOR = 2.0**-40


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


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """All singular values of ``x``, descending (LAPACK, one thread, float64).

    The one routine that computes every spectrum compared here: the anchor's and the
    donors' come from the same call, so a donor bit-identical to the anchor has a
    bit-identical spectrum."""
    _check_matrix(x, "x")
    with single_thread():
        return torch.linalg.svdvals(x)


def singular_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, Vh)`` of the economy SVD ``x = U diag(S) Vh`` (one thread, float64)."""
    _check_matrix(x, "x")
    with single_thread():
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u, vh


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
        delta: ``d_j`` with one entry per anchor singular value (zero past ``r_j`` and
            wherever ``|d_j,i| <= NOISE_FLOOR * sigma_1``).
    """

    scale: float
    delta: torch.Tensor


def spectral_delta(sigma: torch.Tensor, omega: torch.Tensor) -> Spectrum:
    """Donor spectrum ``omega`` against the anchor's ``sigma`` (both descending).

    ``r = min(len(sigma), len(omega))``; ``s = fixed_dot(sigma_r, omega_r) /
    fixed_dot(omega_r, omega_r)`` (``0`` when the donor is zero); ``d_i = s * omega_i -
    sigma_i`` for ``i < r`` and ``0`` beyond; then ``d_i = 0`` where ``|d_i| <= NOISE_FLOOR *
    sigma_0``.
    """
    r = min(sigma.numel(), omega.numel())
    delta = torch.zeros_like(sigma)
    den = float(fixed_dot(omega[:r], omega[:r]))
    if r == 0 or den == 0.0:
        return Spectrum(0.0, delta)
    scale = float(fixed_dot(sigma[:r], omega[:r])) / den
    d = omega[:r] * scale - sigma[:r]
    floor = NOISE_FLOOR * float(sigma[0])
    delta[:r] = torch.where(d.abs() <= floor, torch.zeros_like(d), d)
    return Spectrum(scale, delta)


def top_k(delta: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest ``|delta_i|`` among the non-zero ones, ties to the lower
    index, returned in ascending order."""
    values = [abs(float(x)) for x in delta.tolist()]
    ranked = sorted((i for i, v in enumerate(values) if v != 0.0), key=lambda i: (-values[i], i))
    return sorted(ranked[:k])


@dataclass(frozen=True)
class MatrixMerge:
    """What :func:`merge_matrix` did to one matrix (for tests, benchmarks and reports).

    Attributes:
        out: the merged matrix (float64; the anchor's own values wherever unchanged).
        kept: the singular indices of the update, ascending (at most ``k``).
        gains: the change of each kept singular value, ``g_i``.
        trust: the trust-region factor ``c`` in ``[0, 1]``.
        scales: each donor's Procrustes scale ``s_j``.
    """

    out: torch.Tensor
    kept: tuple[int, ...]
    gains: tuple[float, ...]
    trust: float
    scales: tuple[float, ...]


def merge_matrix(anchor: torch.Tensor, donors: Sequence[torch.Tensor],
                 weights: Sequence[float], *, tau: float, k: int, beta: float) -> MatrixMerge:
    """Merge donor matrices of any shapes into ``anchor`` (specs/cross-family.md, section 4).

    1. ``sigma = singular_values(A)``; per donor ``d_j = spectral_delta(sigma,
       singular_values(W_j)).delta``;
    2. ``dbar = (((0 + d_0 * w_0) + d_1 * w_1) + ...) / W`` with ``W = ((0 + w_0) + w_1) +
       ...``, donors in the order given (canonical); ``W == 0`` leaves the anchor;
    3. ``K`` = :func:`top_k` of ``dbar``; ``c = min(1, tau * ||sigma||_2 / ||dbar_K||_2)``;
    4. ``g_i = ((1 - beta) * c) * dbar_i`` for ``i`` in ``K``;
    5. ``D = sum over i in K, ascending, of outer(g_i * u_i, v_i)``, from ``+0``;
    6. ``out = A + D`` where ``D != 0``, ``A`` elsewhere.

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
        ValueError: mismatched donors and weights, or a parameter out of range.
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
    unchanged = MatrixMerge(anchor, (), (), 0.0, ())
    if beta == 1.0 or k == 0 or tau == 0.0 or not donors or anchor.numel() == 0:
        return unchanged
    sigma = singular_values(anchor)
    total = 0.0
    for w in weights:
        total = total + w
    scales = []
    dbar = torch.zeros_like(sigma)
    for donor, w in zip(donors, weights, strict=True):
        _check_matrix(donor, "donor")
        spectrum = spectral_delta(sigma, singular_values(donor))
        scales.append(spectrum.scale)
        dbar = dbar + spectrum.delta * w
    if total == 0.0:
        return MatrixMerge(anchor, (), (), 0.0, tuple(scales))
    dbar = dbar / total
    kept = top_k(dbar, k)
    if not kept:
        return MatrixMerge(anchor, (), (), 0.0, tuple(scales))
    index = torch.tensor(kept, dtype=torch.long)
    radius = tau * float(fixed_norm(sigma))
    size = float(fixed_norm(dbar[index]))
    trust = min(1.0, radius / size)
    factor = (1.0 - beta) * trust
    gains = [factor * float(dbar[i]) for i in kept]
    if all(g == 0.0 for g in gains):
        return MatrixMerge(anchor, (), (), trust, tuple(scales))
    u, vh = singular_vectors(anchor)
    update = torch.zeros_like(anchor)
    for i, g in zip(kept, gains, strict=True):
        update = update + (u[:, i] * g)[:, None] * vh[i][None, :]
    out = torch.where(update != 0, anchor + update, anchor)
    return MatrixMerge(out, tuple(kept), tuple(gains), trust, tuple(scales))
