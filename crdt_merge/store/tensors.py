"""Tensors out of the store: pieces joined, verified, viewed as torch tensors."""

from __future__ import annotations

import torch

from crdt_merge.errors import ShapeMismatch
from crdt_merge.store.local import LocalStore
from crdt_merge.store.manifests import TensorRecord

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


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
    dtype = TORCH_DTYPES.get(record.dtype)
    if dtype is None:
        raise ShapeMismatch(f"dtype {record.dtype} is not supported in merges")
    data = record_bytes(store, record)
    if record.nbytes == 0:
        t = torch.empty(record.shape, dtype=dtype)
    else:
        t = torch.frombuffer(data, dtype=dtype).reshape(record.shape)
    return t.to(as_dtype) if as_dtype is not None and as_dtype != dtype else t

