"""Reading and writing safetensors files ourselves.

Reading parses the header and memory-maps the file, so a tensor's bytes are touched only
when they are cut into pieces. Writing renders tensors with a header we build ourselves:
keys sorted, compact JSON, padded with spaces to a multiple of 8 bytes, data in key order.
The same tensors therefore always give the same file bytes (safetensors' own writer orders
header keys by a hash map).

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of UTF-8 JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
{str: str}}``, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from crdt_merge.errors import ModelImportError
from crdt_merge.store.manifests import DTYPE_SIZES, MAX_TENSOR_NAME

MAX_HEADER = 100 * 1024 * 1024
#: what a manifest can record (specs/formats.md section 4): dimensions and their sizes
MAX_DIMS = 8
MAX_DIM = 2**40


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are distinct (``json.loads`` would keep the last of a
    repeated key silently; two readers could then see two different tensors)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ModelImportError(f"the header names {key[:60]!r} twice")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: (tensors by name, ``__metadata__``).

    Raises:
        ModelImportError: the file is truncated, the header is not valid JSON of the right
            shape, a dtype is unknown, offsets disagree with shapes, overlap or run past
            the end of the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelImportError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ModelImportError(f"{path}: header length {n} does not fit the file "
                                   f"({size} bytes): truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except ModelImportError as exc:
        raise ModelImportError(f"{path}: {exc.detail}") from None
    # ValueError: not UTF-8, not JSON, or a number too long to read; RecursionError: nesting
    except (ValueError, RecursionError) as exc:
        raise ModelImportError(f"{path}: header is not JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise ModelImportError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelImportError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, rec in header.items():
        shown = repr(name[:60])
        try:
            name.encode()
        except UnicodeEncodeError:  # a lone surrogate, written "\ud800" in the JSON
            raise ModelImportError(f"{path}: tensor name {shown} is not valid Unicode") from None
        if not name or len(name) > MAX_TENSOR_NAME:
            raise ModelImportError(f"{path}: tensor name {shown} is empty or longer than "
                                   f"{MAX_TENSOR_NAME} characters")
        if (not isinstance(rec, dict) or not isinstance(rec.get("dtype"), str)
                or rec["dtype"] not in DTYPE_SIZES):
            raise ModelImportError(f"{path}: tensor {shown} has no known dtype")
        shape, offsets = rec.get("shape"), rec.get("data_offsets")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and 0 <= d < MAX_DIM for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets)):
            raise ModelImportError(f"{path}: tensor {shown} has a malformed shape or offsets "
                                   f"(at most {MAX_DIMS} dimensions, each below 2^40)")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_SIZES[rec["dtype"]] or begin < 0:
            raise ModelImportError(f"{path}: tensor {name!r}: offsets {offsets} do not match "
                                   f"shape {shape} of {rec['dtype']}")
        if data_start + end > size:
            raise ModelImportError(f"{path}: tensor {name!r} runs past the end of the file "
                                   "(truncated download?)")
        tensors[name] = TensorInfo(name, rec["dtype"], tuple(shape), data_start + begin,
                                   data_start + end)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.nbytes)
    for (_, e1, a), (b2, _, b) in zip(spans, spans[1:], strict=False):
        if b2 < e1:
            raise ModelImportError(f"{path}: tensors {a!r} and {b!r} overlap")
    return tensors, meta


class MappedFile:
    """A read-only memory map of a whole file (empty files map to b"")."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.view = memoryview(self._mm) if self._mm is not None else memoryview(b"")

    def close(self) -> None:
        self.view.release()
        if self._mm is not None:
            self._mm.close()
        self._f.close()

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- writing ----------------------------------------------------------------------------------


def header_bytes(specs: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The header for tensors ``(name, dtype, shape)`` laid out in sorted-name order.

    Returns the full prefix (length + JSON, padded to a multiple of 8) and each tensor's
    absolute offset in the file.
    """
    header: dict[str, object] = {}
    offsets: dict[str, int] = {}
    pos = 0
    for name, dtype, shape in sorted(specs):
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"data_offsets": [pos, pos + nbytes], "dtype": dtype, "shape": list(shape)}
        offsets[name] = pos
        pos += nbytes
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {k: v + len(prefix) for k, v in offsets.items()}


def iter_pieces(data: memoryview, piece_size: int) -> Iterator[memoryview]:
    for i in range(0, len(data), piece_size):
        yield data[i:i + piece_size]
