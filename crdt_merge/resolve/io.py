"""io: the bytes of a resolve, in and out.

In: stored tensors read from object files only (each piece verified against its id, so
safe on any worker thread or process; the replica's SQLite index is consulted once,
beforehand, by :func:`require_pieces`), whole (:func:`read_record`, :func:`read_tensor`)
or a piece at a time into per-thread reusable buffers (:class:`PieceReader`,
:func:`scratch`). Out: bytes written at their offset in the output file, cut into pieces
and hashed as they go (:func:`write_bytes`, :func:`write_output`), with Linux asked to
start writing them back at once (:func:`start_writeback`, ``sync_file_range`` through
ctypes). :func:`open_store` keeps one open store per path per process (worker processes
open their own).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from crdt_merge.errors import PieceMissing, ShapeMismatch
from crdt_merge.hashing import digest
from crdt_merge.lazy import torch
from crdt_merge.methods.base import Raw
from crdt_merge.numeric import RAW_DTYPES
from crdt_merge.store.local import LocalStore
from crdt_merge.store.manifests import TensorRecord
from crdt_merge.store.objects import ObjectFiles
from crdt_merge.store.safetensors_io import iter_pieces
from crdt_merge.store.tensors import torch_dtype

__all__ = ["PieceReader", "Unaligned", "open_store", "read_record", "read_tensor",
           "release_scratch", "require_pieces", "scratch", "start_writeback", "write_bytes",
           "write_output", "write_piece"]

_STORES: dict[str, LocalStore] = {}


def open_store(path: str) -> LocalStore:
    """The store at ``path``, opened once per process (a worker process's own)."""
    if path not in _STORES:
        _STORES[path] = LocalStore.open(Path(path))
    return _STORES[path]


def read_record(files: ObjectFiles, record: TensorRecord) -> np.ndarray:
    """A stored tensor's bytes (``uint8``), each piece verified as it is read (object
    files only, so safe on any thread).

    Raises:
        PieceMissing, PieceCorrupt: a piece is gone or fails its hash (then quarantined).
        ShapeMismatch: the pieces do not add up to the record's size.
    """
    raw = np.empty(record.nbytes, dtype=np.uint8)
    view = memoryview(raw)
    pos = 0
    for piece_id in record.pieces:
        if pos >= record.nbytes:
            raise ShapeMismatch(f"more pieces than the record's {record.nbytes} bytes need")
        pos += files.read_into(piece_id, view[pos:])
    if pos != record.nbytes:
        raise ShapeMismatch(f"pieces hold {pos} bytes, the record says {record.nbytes}")
    return raw


def read_tensor(files: ObjectFiles, record: TensorRecord) -> torch.Tensor:
    """A stored tensor in its own dtype (:func:`read_record`, viewed by torch).

    Raises:
        PieceMissing, PieceCorrupt, ShapeMismatch: as :func:`read_record`, or an unknown
            dtype.
    """
    dtype = torch_dtype(record.dtype)
    if dtype is None:
        raise ShapeMismatch(f"dtype {record.dtype} is not supported in merges")
    return torch.from_numpy(read_record(files, record)).view(dtype).reshape(record.shape)


def require_pieces(store: LocalStore, records: Iterable[TensorRecord | None]) -> None:
    """Every piece the records name is in the replica's index.

    Raises:
        PieceMissing: one is not (all missing ones go on the wanted list for the next sync).
    """
    missing = store.missing({p for rec in records if rec is not None for p in rec.pieces})
    if missing:
        store.index.want(sorted(missing))
        raise PieceMissing(min(missing))


class Unaligned(Exception):
    """A stored tensor's pieces are not cut at the job's piece size."""


class PieceReader:
    """One stored tensor's elements, range by range in increasing order, holding one
    verified piece in a reusable buffer. A range never crosses a piece boundary when
    pieces are cut at the profile's size and ranges at a multiple of ``piece_size / 8``
    elements (raises :class:`Unaligned` otherwise)."""

    def __init__(self, files: ObjectFiles, record: TensorRecord, buf: np.ndarray) -> None:
        self.files, self.record, self.buf = files, record, buf
        self.raw = RAW_DTYPES[record.dtype]
        self.size = np.dtype(self.raw).itemsize
        self.index = -1  # the piece in buf, covering bytes [start, stop) of the tensor
        self.start = self.stop = 0

    def get(self, first: int, last: int) -> Raw:
        """Elements ``[first, last)`` (a view of the buffer: valid until the next call)."""
        lo, hi = first * self.size, last * self.size
        while hi > self.stop:
            if lo < self.stop or self.index + 1 >= len(self.record.pieces):
                raise Unaligned(self.record.pieces[max(self.index, 0)])
            self.index += 1
            got = self.files.read_into(self.record.pieces[self.index],
                                       memoryview(self.buf)[: self.record.nbytes - self.stop])
            self.start, self.stop = self.stop, self.stop + got
        if lo < self.start:
            raise Unaligned(self.record.pieces[self.index])
        return Raw(self.buf[lo - self.start: hi - self.start].view(self.raw), self.record.dtype)


_SCRATCH = threading.local()


def scratch(count: int, nbytes: int) -> list[np.ndarray]:
    """``count`` byte buffers of ``nbytes`` owned by this thread and reused across its
    jobs: a fresh multi-megabyte buffer per piece would page-fault on every use."""
    bufs = [b for b in getattr(_SCRATCH, "bufs", []) if b.size == nbytes]
    while len(bufs) < count:
        bufs.append(np.empty(nbytes, dtype=np.uint8))
    _SCRATCH.bufs = bufs
    return bufs[:count]


def scratch_held() -> int:
    """How many scratch buffers this thread holds (for tests and memory checks)."""
    return len(getattr(_SCRATCH, "bufs", []))


def release_scratch() -> None:
    """Let go of this thread's scratch buffers (a pool's threads take theirs with them)."""
    _SCRATCH.__dict__.clear()


def write_piece(fd: int, data: memoryview, offset: int) -> str:
    """Write ``data`` at ``offset`` of the open file, start its writeback, return its id."""
    pos = 0
    while pos < len(data):
        pos += os.pwrite(fd, data[pos:], offset + pos)
    start_writeback(fd, offset, len(data))
    return digest(data)


def write_output(out: torch.Tensor, path: str, offset: int, piece_size: int) -> list[str]:
    """Write a finished tensor's bytes at ``offset`` of the output file; return the ids of
    the pieces they cut into (for the checkpoint manifest)."""
    flat = out.contiguous().reshape(-1)
    data = (memoryview(flat.view(torch.uint8).numpy()).cast("B") if flat.numel()
            else memoryview(b""))
    return write_bytes(data, path, offset, piece_size)


def write_bytes(data: memoryview, path: str, offset: int, piece_size: int) -> list[str]:
    """Write ``data`` at ``offset`` of the output file, a piece at a time; return the
    pieces' ids."""
    fd = os.open(path, os.O_WRONLY)
    try:
        return [write_piece(fd, piece, offset + k * piece_size)
                for k, piece in enumerate(iter_pieces(data, piece_size))]
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask Linux to start writing a range of a file to disk now (``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``: asynchronous, no durability promise), so that the fsync of
    the finished checkpoint waits for less. A no-op where the call does not exist."""
    fn = _sync_file_range()
    if fn is not None and length:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@functools.cache
def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn
