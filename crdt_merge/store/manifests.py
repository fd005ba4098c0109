"""Manifests: a model or a delta as tensor records and files, content-addressed.

A manifest (specs/formats.md) is the canonical msgpack of::

    {"v": 1,
     "piece_size": 4096,
     "tensors": {name: {"dtype": "BF16", "shape": [4, 8], "pieces": [piece_id, ...]}},
     "files":   {"config.json": {"size": 613, "pieces": [piece_id]}},
     "meta":    {"family": "llama", ...}}

Each tensor's bytes are its raw little-endian data cut into ``piece_size`` pieces (the last
one shorter; an empty tensor has none). ``manifest_id = blake3(encoded manifest)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from crdt_merge import codec
from crdt_merge.dtypes import SIZES
from crdt_merge.errors import SchemaError
from crdt_merge.hashing import ManifestId, PieceId, digest, is_id

FORMAT_VERSION = 1

#: dtype name (as in safetensors headers) -> bytes per element (:mod:`crdt_merge.dtypes`)
DTYPE_SIZES: dict[str, int] = SIZES

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}")
MAX_TENSOR_NAME = 512


def piece_count(nbytes: int, piece_size: int) -> int:
    return math.ceil(nbytes / piece_size) if nbytes else 0


def piece_lengths(nbytes: int, piece_size: int) -> list[int]:
    """Lengths of the pieces ``nbytes`` bytes are cut into."""
    n = piece_count(nbytes, piece_size)
    return [piece_size] * (n - 1) + [nbytes - piece_size * (n - 1)] if n else []


@dataclass(frozen=True)
class TensorRecord:
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[PieceId, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "pieces": list(self.pieces)}


@dataclass(frozen=True)
class FileRecord:
    size: int
    pieces: tuple[PieceId, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"size": self.size, "pieces": list(self.pieces)}


@dataclass(frozen=True)
class Manifest:
    piece_size: int
    tensors: Mapping[str, TensorRecord]
    files: Mapping[str, FileRecord]
    meta: Mapping[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "piece_size": self.piece_size,
            "tensors": {k: t.to_wire() for k, t in self.tensors.items()},
            "files": {k: f.to_wire() for k, f in self.files.items()},
            "meta": dict(self.meta),
        }

    def encode(self) -> bytes:
        return codec.encode(self.to_wire())

    @property
    def id(self) -> ManifestId:
        return ManifestId(digest(self.encode()))

    def piece_sizes(self) -> dict[str, int]:
        """The exact length of each piece this manifest references, as it declares them
        (a download is cut off past it)."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out.update(zip(t.pieces, piece_lengths(t.nbytes, self.piece_size), strict=True))
        for f in self.files.values():
            out.update(zip(f.pieces, piece_lengths(f.size, self.piece_size), strict=True))
        return out

    def piece_ids(self) -> Iterator[PieceId]:
        """Every piece this manifest references, tensors first, in manifest order (with
        repeats: a piece shared by two tensors appears twice)."""
        for t in self.tensors.values():
            yield from t.pieces
        for f in self.files.values():
            yield from f.pieces


def _fail(msg: str) -> SchemaError:
    return SchemaError(f"invalid manifest: {msg}")


def _pieces(value: object, nbytes: int, piece_size: int, where: str) -> tuple[PieceId, ...]:
    if not isinstance(value, list) or not all(is_id(p) for p in value):
        raise _fail(f"{where}: pieces must be a list of 64-hex ids")
    if len(value) != piece_count(nbytes, piece_size):
        raise _fail(f"{where}: {nbytes} bytes need {piece_count(nbytes, piece_size)} pieces "
                    f"of {piece_size}, found {len(value)}")
    return tuple(PieceId(p) for p in value)


def from_wire(value: object) -> Manifest:
    """Check the structure of a decoded manifest and build it.

    Raises:
        SchemaError: a missing or extra field, an unknown dtype, a bad shape, a file name
            that is not a plain name, or a piece list of the wrong length.
    """
    if not isinstance(value, dict) or set(value) != {"v", "piece_size", "tensors", "files", "meta"}:
        raise _fail("expected exactly the fields v, piece_size, tensors, files, meta")
    if type(value["v"]) is not int or value["v"] != FORMAT_VERSION:  # not True: True == 1
        raise _fail(f"unsupported version {value['v']!r}")
    piece_size = value["piece_size"]
    if not isinstance(piece_size, int) or isinstance(piece_size, bool) or not 1 <= piece_size <= 2**31:
        raise _fail("piece_size must be a positive integer")
    tensors: dict[str, TensorRecord] = {}
    if not isinstance(value["tensors"], dict):
        raise _fail("tensors must be a map")
    for name, rec in value["tensors"].items():
        if not name or len(name) > MAX_TENSOR_NAME:
            raise _fail(f"tensor name {name[:40]!r} is empty or too long")
        if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "pieces"}:
            raise _fail(f"tensor {name}: expected fields dtype, shape, pieces")
        if not isinstance(rec["dtype"], str) or rec["dtype"] not in DTYPE_SIZES:
            raise _fail(f"tensor {name}: unknown dtype {rec['dtype']!r}")
        shape = rec["shape"]
        if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
        ):
            raise _fail(f"tensor {name}: shape must be a list of at most 8 non-negative ints")
        nbytes = math.prod(shape) * DTYPE_SIZES[rec["dtype"]]
        tensors[name] = TensorRecord(rec["dtype"], tuple(shape),
                                     _pieces(rec["pieces"], nbytes, piece_size, name))
    files: dict[str, FileRecord] = {}
    if not isinstance(value["files"], dict):
        raise _fail("files must be a map")
    for name, rec in value["files"].items():
        if not _FILE_NAME.fullmatch(name) or ".." in name:
            raise _fail(f"file name {name[:40]!r} is not a plain file name")
        if not isinstance(rec, dict) or set(rec) != {"size", "pieces"}:
            raise _fail(f"file {name}: expected fields size, pieces")
        size = rec["size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**40:
            raise _fail(f"file {name}: bad size")
        files[name] = FileRecord(size, _pieces(rec["pieces"], size, piece_size, name))
    if not isinstance(value["meta"], dict):
        raise _fail("meta must be a map")
    return Manifest(piece_size, tensors, files, value["meta"])


def decode(data: bytes) -> Manifest:
    """Decode and check manifest bytes (canonical msgpack).

    Raises:
        NonCanonicalEncoding, SchemaError.
    """
    return from_wire(codec.decode(data))
