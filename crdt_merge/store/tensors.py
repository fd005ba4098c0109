"""Tensors out of the store: pieces joined, verified, viewed as torch tensors."""

from __future__ import annotations

from crdt_merge.dtypes import TORCH_NAMES
from crdt_merge.errors import ShapeMismatch
from crdt_merge.lazy import torch
from crdt_merge.store.local import LocalStore
from crdt_merge.store.manifests import TensorRecord

_TORCH_NAMES = TORCH_NAMES


def supported(name: str) -> bool:
    """Whether resolve handles tensors of this safetensors dtype (floats are merged, the
    integer and bool ones copied); float8 and unsigned 16/32/64-bit ones are not."""
    return name in _TORCH_NAMES


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name (``"BF16"``), or None if not supported."""
    attr = _TORCH_NAMES.get(name)
    return None if attr is None else getattr(torch, attr)


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    for name, attr in _TORCH_NAMES.items():
        if getattr(torch, attr) == dtype:
            return name
    raise KeyError(dtype)


def record_bytes(store: LocalStore, record: TensorRecord) -> bytearray:
    """The raw bytes of a tensor, each piece verified as it is read."""
    out = bytearray(record.nbytes)
    view = memoryview(out)
    pos = 0
    for piece_id in record.pieces:
        if pos >= len(out):
            raise ShapeMismatch(f"more pieces than the record's {record.nbytes} bytes need")
        pos += store.get_into(piece_id, view[pos:])
    view.release()
    if pos != record.nbytes:
        raise ShapeMismatch(f"pieces hold {pos} bytes, the record says {record.nbytes}")
    return out


def load_tensor(store: LocalStore, record: TensorRecord, as_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Read a tensor record; optionally convert (exactly, for widening) to ``as_dtype``."""
    dtype = torch_dtype(record.dtype)
    if dtype is None:
        raise ShapeMismatch(f"dtype {record.dtype} is not supported in merges")
    data = record_bytes(store, record)
    if record.nbytes == 0:
        t = torch.empty(record.shape, dtype=dtype)
    else:
        t = torch.frombuffer(data, dtype=dtype).reshape(record.shape)
    return t.to(as_dtype) if as_dtype is not None and as_dtype != dtype else t

