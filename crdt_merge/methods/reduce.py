"""Blockwise work and deterministic reductions over large flat tensors.

Methods walk a tensor in blocks of :data:`BLOCK` elements so that temporaries stay small
(and come from the allocator's reused memory rather than fresh, page-faulting mappings).
Elementwise float64 arithmetic gives the same bits whatever the block size.

Reductions must too. :func:`tree_sum` evaluates exactly the fixed pairwise tree of
:func:`crdt_merge.numeric.fixed_sum` (pad to a power of two with ``+0.0``, add the second half
onto the first until one element is left) while holding only ``O(BLOCK log n)`` elements:
the first levels of that tree add block ``j`` to block ``j + M/2`` (``M`` blocks), so the
tree over blocks is evaluated depth first in bit-reversed block order, and the last levels
are ``fixed_sum`` of the one remaining block. The result is bit-identical to
``fixed_sum`` of the whole vector, for every block size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from crdt_merge.lazy import torch
from crdt_merge.numeric import fixed_sum, round_to

BLOCK = 1 << 16
"""Elements per block (512 KiB of float64): measured fastest here, and no temporary ever
comes from a fresh page-faulting mapping."""

Values = Callable[[int, int], "torch.Tensor"]
"""``values(start, stop)``: float64 elements ``[start, stop)`` of a virtual flat vector."""


def block_size() -> int:
    """The current block size (a module global, so tests can shrink it)."""
    return BLOCK


def blocks(n: int, block: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each block of ``range(n)``, in order."""
    block = block or BLOCK
    for start in range(0, n, block):
        yield start, min(n, start + block)


def map_blocks(n: int, fn: Values, block: int | None = None,
               dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """A flat tensor of ``n`` elements whose block ``[s, e)`` is ``fn(s, e)`` (float64)
    rounded once to ``dtype`` (default float64): ``out`` (flat, of that dtype) when given,
    else a new one."""
    if out is None:
        out = torch.empty(n, dtype=torch.float64 if dtype is None else dtype)
    for s, e in blocks(n, block):
        put(out, s, fn(s, e))
    return out


def f64(x: torch.Tensor, start: int, stop: int, step: int = 1) -> torch.Tensor:
    """Elements ``[start:stop:step]`` of the flat tensor ``x`` widened (exactly) to float64.

    A float64 ``x`` gives a view, not a copy: never modify the result in place."""
    block = x[start:stop:step]
    return block if block.dtype == torch.float64 else block.to(torch.float64)


def put(out: torch.Tensor, start: int, value: torch.Tensor) -> None:
    """Write the float64 block ``value`` at ``out[start:]``, rounded once to ``out``'s dtype
    (rounding is elementwise, so block by block gives the bits of the whole)."""
    stop = start + value.numel()
    out[start:stop] = value if out.dtype == torch.float64 else round_to(value, out.dtype)


def tree_sum(values: Values, n: int, block: int | None = None) -> float:
    """``float(fixed_sum(v))`` of the virtual vector ``v`` of ``n`` elements, blockwise.

    Args:
        values: gives the float64 elements ``[start, stop)``; called once per block.
        n: the vector's length.
        block: a power of two; the result does not depend on it.
    """
    block = block or BLOCK
    if block & (block - 1) or block < 1:
        raise ValueError(f"block must be a power of two, got {block}")
    if n == 0:
        return 0.0
    size = 1 << (n - 1).bit_length()
    if size <= block:
        return float(fixed_sum(values(0, n)))
    count = size // block
    zeros = torch.zeros(block, dtype=torch.float64)

    def leaf(j: int) -> torch.Tensor:
        s = j * block
        if s >= n:
            return zeros
        e = min(n, s + block)
        v = values(s, e)
        if e - s < block:
            v = torch.cat([v, zeros[: block - (e - s)]])
        return v

    def node(offset: int, stride: int) -> torch.Tensor:
        # the halving tree over blocks {offset + k*stride}: its last add joins the two
        # residue classes of the next bit, its first adds join blocks M/2 apart
        if stride == count:
            return leaf(offset)
        return node(offset, 2 * stride) + node(offset + stride, 2 * stride)

    return float(fixed_sum(node(0, 1)))


def tree_dot(a: torch.Tensor, b: torch.Tensor, block: int | None = None) -> float:
    """``fixed_dot(a, b)`` as a float, blockwise (flat views of equal length)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return tree_sum(lambda s, e: fa[s:e] * fb[s:e], fa.numel(), block)


def squares(values: Values) -> Values:
    """``values`` squared elementwise (each block computed once)."""

    def sq(s: int, e: int) -> torch.Tensor:
        v = values(s, e)
        return v * v

    return sq


def norm(values: Values, n: int) -> float:
    """``sqrt(fixed_sum(v * v))``: the Euclidean norm, bit-identical to ``fixed_norm``."""
    return math.sqrt(tree_sum(squares(values), n))


def tree_sum_rows(x: torch.Tensor) -> torch.Tensor:
    """``fixed_sum`` of each row of a 2-D float64 tensor (the same tree, row by row)."""
    rows, cols = x.shape
    if cols == 0:
        return torch.zeros(rows, dtype=x.dtype)
    size = 1 << (cols - 1).bit_length()
    if size != cols:
        x = torch.cat([x, torch.zeros(rows, size - cols, dtype=x.dtype)], dim=1)
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = x[:, :half] + x[:, half:]
    return x.reshape(rows)


def ordered_sum(terms: list[torch.Tensor] | list[float]) -> torch.Tensor | float:
    """``((0 + t0) + t1) + ...``: the one way this package adds across donors."""
    acc: torch.Tensor | float = 0.0
    for t in terms:
        acc = acc + t
    return acc
