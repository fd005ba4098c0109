"""Fused and transposed native tensors: exact splits into canonical parts and back.

Each op is a pure copy of elements (slicing, transposing, reshaping), so ``join(split(t))``
is ``t`` bit for bit, and the parts are new contiguous tensors that share no memory with
``t``. The layouts are in specs/families.md:

- ``rows``: the parts stacked along dim 0 (Phi-3 ``qkv_proj`` = [q; k; v] and
  ``gate_up_proj`` = [gate; up], fused biases, OPT/RoBERTa position rows = [offset; positions]).
- ``conv1d``: GPT-2's ``Conv1D`` stores (in, out) and applies ``x @ W``; the parts are the
  column blocks [q | k | v], each transposed to (out, in). One part is a plain transpose.
- ``heads``: GPT-NeoX ``query_key_value``: rows grouped per head, each head holding its
  q, k and v rows in turn: row ``(h * 3 + p) * d + i`` is row ``h * d + i`` of part ``p``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

from crdt_merge.errors import ModelImportError, ShapeMismatch
from crdt_merge.lazy import torch

OPS = ("rows", "conv1d", "heads")
REST = "*"


def sizes_of(op: Mapping[str, Any], dims: Mapping[str, int], total: int, name: str) -> list[int]:
    """The part sizes of a ``rows``/``conv1d`` op for a fused axis of length ``total``.

    A size is an integer, a dimension name from ``dims`` or ``"*"`` (at most one: whatever
    is left).

    Raises:
        ModelImportError: the sizes do not add up to ``total``.
    """
    resolved: list[int | None] = []
    for size in op["sizes"]:
        if size == REST:
            resolved.append(None)
        elif isinstance(size, int):
            resolved.append(size)
        else:
            resolved.append(dims[size])
    fixed = sum(s for s in resolved if s is not None)
    rest = total - fixed
    if (None in resolved and rest < 0) or (None not in resolved and rest != 0):
        spelled = " + ".join(
            f"{s}={dims[s]}" if isinstance(s, str) and s in dims else str(s) for s in op["sizes"]
        )
        raise ModelImportError(
            f"fused tensor {name} has {total} along its fused axis but the config implies "
            f"{spelled}; the checkpoint and its config.json disagree"
        )
    return [rest if s is None else s for s in resolved]


def split(op: Mapping[str, Any], name: str, tensor: Tensor, dims: Mapping[str, int]) -> list[Tensor]:
    """Split the native ``tensor`` called ``name`` into its canonical parts, in ``into`` order.

    Raises:
        ModelImportError: the tensor's shape does not fit the op and the config.
    """
    kind = op["op"]
    parts = len(op["into"])
    if kind == "rows":
        if tensor.dim() < 1:
            raise ModelImportError(f"fused tensor {name} is a scalar; expected rows to split")
        sizes = sizes_of(op, dims, tensor.shape[0], name)
        return [p.clone() for p in torch.split(tensor, sizes, dim=0)]
    if kind == "conv1d":
        if tensor.dim() != 2:
            raise ModelImportError(
                f"Conv1D tensor {name} has shape {tuple(tensor.shape)}; expected (in, out)"
            )
        if "sizes" in op:
            sizes = sizes_of(op, dims, tensor.shape[1], name)
        else:
            sizes = [tensor.shape[1]]
        return [p.t().clone(memory_format=torch.contiguous_format) for p in torch.split(tensor, sizes, dim=1)]
    if kind == "heads":
        heads = dims[op["heads"]]
        rows = tensor.shape[0] if tensor.dim() >= 1 else 0
        expected = dims[op["rows"]] if "rows" in op else rows
        if rows == 0 or rows != expected or rows % (heads * parts):
            raise ModelImportError(
                f"fused tensor {name} has {rows} rows; expected {expected}, a multiple of "
                f"{heads} heads x {parts} parts"
            )
        rest = tuple(tensor.shape[1:])
        grouped = tensor.reshape(heads, parts, rows // (heads * parts), *rest)
        return [
            grouped[:, p].reshape(rows // parts, *rest).clone() for p in range(parts)
        ]
    raise ValueError(f"unknown fused op {kind!r}")


def join(op: Mapping[str, Any], name: str, parts: Sequence[Tensor], dims: Mapping[str, int]) -> Tensor:
    """The native tensor ``name`` rebuilt from its canonical parts (inverse of :func:`split`).

    Raises:
        ShapeMismatch: the parts cannot form the native tensor (dtype, rank or shape).
    """
    kind = op["op"]
    if len({p.dtype for p in parts}) != 1:
        raise ShapeMismatch(f"the parts of {name} have different dtypes; cast them alike first")
    if kind == "rows":
        if len({tuple(p.shape[1:]) for p in parts}) != 1 or parts[0].dim() < 1:
            raise ShapeMismatch(_shapes_message(name, parts, "differ beyond dim 0"))
        return torch.cat(list(parts), dim=0)
    if kind == "conv1d":
        if any(p.dim() != 2 for p in parts) or len({p.shape[1] for p in parts}) != 1:
            raise ShapeMismatch(_shapes_message(name, parts, "are not (out, in) with one in"))
        if len(parts) == 1:
            return parts[0].t().clone(memory_format=torch.contiguous_format)
        return torch.cat([p.t() for p in parts], dim=1)
    if kind == "heads":
        heads = dims[op["heads"]]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1 or parts[0].dim() < 1 or parts[0].shape[0] % heads:
            raise ShapeMismatch(
                _shapes_message(name, parts, f"are not equal with rows a multiple of {heads} heads")
            )
        rows, rest = parts[0].shape[0], tuple(parts[0].shape[1:])
        stacked = torch.stack([p.reshape(heads, rows // heads, *rest) for p in parts], dim=1)
        return stacked.reshape(rows * len(parts), *rest)
    raise ValueError(f"unknown fused op {kind!r}")


def same_bits(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` have one dtype and shape and identical bytes (NaN == NaN,
    -0.0 != 0.0), which is what "lossless" means here."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        width = a.element_size()
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(width)
        if as_int is None:  # complex128: compare the two float64 halves
            return same_bits(torch.view_as_real(a), torch.view_as_real(b))
        return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))
    return torch.equal(a, b)


def _shapes_message(name: str, parts: Sequence[Tensor], problem: str) -> str:
    shapes = ", ".join(str(tuple(p.shape)) for p in parts)
    return f"cannot rebuild {name}: its parts {shapes} {problem}"
