"""Which entries of a task vector survive: mergekit's four sparsifiers, made deterministic.

Each function returns which entries of the delta ``d = donor - base`` are kept, as a
:class:`Keep` that masks any block on its own (``None`` when everything is kept, i.e.
``density >= 1``, where mergekit returns the delta untouched and does not rescale). Counts
use Python's ``int(density * n)`` exactly as mergekit does.

* ``magnitude`` (TIES): keep the ``max(1, int(density*n))`` largest ``|d|``.
* ``magnitude_outliers`` (breadcrumbs): drop the ``int(gamma*n)`` largest and then the
  smallest, keeping ``int(density*n)``: in ascending order, positions
  ``[n_bot, n_bot + target)`` with ``n_bot = max(0, n - target - int(gamma*n))``.
* ``random`` (DARE): keep ``j`` iff ``u_j < density`` (``u`` from :mod:`.rng`).
* ``magprune`` (DELLA): within each row (the vectors along dim 1; a 1-D tensor is one
  row) rank ``|d|`` ascending from 1 to ``c``; keep ``j`` iff ``u_j < p_j`` with
  ``p_j = (rank_norm * 2) * epsilon + (density - epsilon)``,
  ``rank_norm = (rank - 1) / (c - 1)`` (``0.5`` when ``c == 1``).

Ranks and top-k use the total order of :mod:`.select` (equal magnitudes: lower flat index
ranks as larger). :func:`l1_rescale` is mergekit's ``rescale`` (match the L1 norm of the
kept entries to the whole delta's), with the sums taken by the fixed tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from crdt_merge.errors import BadParameter
from crdt_merge.lazy import torch
from crdt_merge.methods.reduce import block_size, blocks, tree_sum
from crdt_merge.methods.rng import Uniforms
from crdt_merge.methods.select import Band, Magnitudes, rank_band

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) the kept entries are not rescaled."""


class Keep(Protocol):
    """Which entries of one delta survive, block by block."""

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The block ``x`` (deltas or their magnitudes, from flat index ``start``) with the
        dropped entries set to zero; ``x`` may be modified in place."""
        ...


@dataclass(frozen=True)
class Stored:
    """A keep mask drawn once and stored (one byte per entry)."""

    mask: torch.Tensor

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return x.mul_(self.mask[start : start + x.numel()])


@dataclass(frozen=True)
class Ranked:
    """A magnitude band (see :class:`crdt_merge.methods.select.Band`); nothing stored."""

    band: Band

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        return self.band.apply(x, start)


def magnitude(mags: Magnitudes, n: int, density: float) -> Keep | None:
    """TIES trimming: the ``max(1, int(density * n))`` largest magnitudes."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return Ranked(Band(empty=True))
    k = max(1, int(density * n))
    return Ranked(rank_band(mags, n, 0, k))


def magnitude_outliers(mags: Magnitudes, n: int, density: float, gamma: float) -> Keep | None:
    """Breadcrumbs: drop the top ``gamma`` outliers and the small tail, keep ``density``."""
    if density >= 1:
        return None
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    # ascending positions [n_bot, n_bot + target) are descending ranks:
    return Ranked(rank_band(mags, n, n - n_bot - target, n - n_bot))


def random(key: bytes, n: int, density: float, block: int | None = None) -> Keep | None:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return None
    keep = torch.empty(n, dtype=torch.bool)
    stream = Uniforms(key)
    for s, e in blocks(n, block):
        torch.lt(stream.block(s, e), density, out=keep[s:e])
    return Stored(keep)


def check_magprune(density: float, epsilon: float, where: str) -> None:
    """DELLA's rule: with ``0 < density < 1``, ``density +- epsilon`` must lie in (0, 1)."""
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise BadParameter(
            f"{where}: epsilon {epsilon:g} with density {density:g} puts a keep probability "
            "outside (0, 1); choose epsilon < min(density, 1 - density)"
        )


def magprune(
    delta: torch.Tensor, key: bytes, density: float, epsilon: float, block: int | None = None
) -> Keep | None:
    """DELLA: keep probability rises linearly with the magnitude rank inside each row.

    Args:
        delta: the delta in its own shape (rows are the vectors along dim 1).
    """
    n = delta.numel()
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return Stored(torch.zeros(n, dtype=torch.bool))
    check_magprune(density, epsilon, "della")
    stream = Uniforms(key)
    if delta.dim() >= 3:
        # rows along dim 1 are not contiguous in flat order: work on the whole tensor
        moved = delta.abs().movedim(1, -1)
        shape = moved.shape
        probs = _row_probs(moved.reshape(-1, shape[-1]), density, epsilon)
        probs = probs.reshape(shape).movedim(-1, 1).reshape(-1)
        return Stored(stream.block(0, n) < probs)
    rows2d = delta.reshape(1, -1) if delta.dim() < 2 else delta
    cols = rows2d.shape[1]
    keep = torch.empty(n, dtype=torch.bool)
    per = max(1, (block or block_size()) // max(1, cols))
    for r0 in range(0, rows2d.shape[0], per):
        r1 = min(rows2d.shape[0], r0 + per)
        probs = _row_probs(rows2d[r0:r1].abs(), density, epsilon).reshape(-1)
        s = r0 * cols
        torch.lt(stream.block(s, s + probs.numel()), probs, out=keep[s : s + probs.numel()])
    return Stored(keep)


def _row_probs(mags: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities of each row's elements from their magnitude ranks."""
    rows, cols = mags.shape
    if cols == 1:
        rank_norm = torch.full_like(mags, 0.5)
    else:
        # stable descending sort: equal magnitudes keep flat order, lower index = larger
        order = torch.sort(mags, dim=1, descending=True, stable=True).indices
        position = torch.empty_like(order)
        position.scatter_(1, order, torch.arange(cols).expand(rows, cols))
        # ascending rank - 1 = cols - 1 - position
        rank_norm = (cols - 1 - position).to(torch.float64) / float(cols - 1)
    return (rank_norm * 2.0) * epsilon + (density - epsilon)


def l1_rescale(mags: Magnitudes, keep: Keep, n: int) -> float:
    """The factor ``||d||_1 / ||d * keep||_1`` (1.0 when either is below 1e-7)."""

    def kept(s: int, e: int) -> torch.Tensor:
        return keep.apply(mags(s, e), s)

    before = tree_sum(lambda s, e: mags(s, e), n)
    after = tree_sum(kept, n)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after
