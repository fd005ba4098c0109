"""execute: run a plan tensor by tensor and render the checkpoint folder.

Each tensor is one job: read the base and donor tensors from the store in their stored
dtype (pieces verified), let the method compute in float64 and round once to the output
dtype (streaming methods a block at a time), write the bytes at their place in the output
file and hash them into pieces. Jobs run on worker threads, each with one torch thread
(parallelism is across tensors, never inside an operation), so the output bytes do not
depend on the number of workers; memory is a few tensors per worker.

The checkpoint id is the id of the output manifest (tensor records + config + tokenizer),
never a hash of files.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import json
import multiprocessing
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crdt_merge import ENGINE
from crdt_merge.errors import PieceMissing, ShapeMismatch
from crdt_merge.hashing import digest, serial
from crdt_merge.lazy import torch
from crdt_merge.methods import TensorJob, get_method
from crdt_merge.methods.base import Raw
from crdt_merge.methods.params import resolve_param
from crdt_merge.numeric import NUMERIC_VERSION, RAW_DTYPES, widen_raw
from crdt_merge.resolve.plan import ANCHOR, MergePlan, slice_layout
from crdt_merge.store.local import LocalStore
from crdt_merge.store.manifests import Manifest, TensorRecord
from crdt_merge.store.objects import ObjectFiles
from crdt_merge.store.safetensors_io import iter_pieces
from crdt_merge.store.tensors import supported, torch_dtype

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class SliceInputs:
    """What a job of a sliced plan (``slices``) merges, beyond the plain job's fields.

    Attributes:
        inputs: per donor, its index in the plan's contributions, or ``ANCHOR`` (the anchor
            as one more input, for a method that ignores the base).
        sources: per donor, the name of its source tensor (per-model filters match it, as
            mergekit resolves an input's parameters under its own tensor name).
        delta_bases: per donor, the anchor tensor a delta contribution adds to (else None).
        params: the slice's ``parameters``; they win over the recipe's.
        layer: the tensor's offset in its slice; None outside the layers (``t = 0``).
        length: the slice's number of layers (None outside the layers).
    """

    inputs: tuple[int, ...]
    sources: tuple[str, ...]
    delta_bases: tuple[TensorRecord | None, ...]
    params: Mapping[str, Any]
    layer: int | None
    length: int | None


@dataclass(frozen=True)
class Job:
    """One output tensor: everything a worker needs, picklable."""

    name: str
    store: str
    plan_wire: Mapping[str, Any]
    plan_id: str
    base: TensorRecord | None
    donors: tuple[TensorRecord, ...]  # full weights or deltas, per contribution
    forms: tuple[str, ...]
    out_dtype: str
    shape: tuple[int, ...]
    path: str
    offset: int
    piece_size: int
    num_layers: int
    #: set for a sliced plan: then donors are per slice source, not per contribution
    sliced: SliceInputs | None = None


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def numeric_profile(method: str | None = None) -> dict[str, str]:
    """What the bytes of a checkpoint of ``method`` may depend on beyond the plan (DESIGN
    section 4): the engine, its numeric rules, torch and the CPU architecture, recorded for
    every method although elementwise work is exact everywhere; for a method whose bytes go
    through BLAS/LAPACK (``Method.blas``: cross_family's products and eigensolvers), also
    the BLAS build torch ships (MKL's version) and MKL's reproducibility mode (``MKL_CBWR``,
    set to COMPATIBLE by this package unless the user set it). Only that part imports
    torch (to ask it); ``method`` None is the profile of no plan."""
    import platform

    profile = {"engine": ENGINE, "numeric": NUMERIC_VERSION, "torch": _torch_version(),
               "arch": platform.machine()}
    if method is not None and get_method(method).blas:
        profile.update(blas="mkl" if torch.backends.mkl.is_available() else "none",
                       mkl=_mkl_version(), mkl_cbwr=os.environ.get("MKL_CBWR", ""))
    return profile


@functools.cache
def _torch_version() -> str:
    """torch's version (``2.13.0+cpu``) from its installed metadata: equal to
    ``torch.__version__``, without importing torch."""
    return importlib.metadata.version("torch")


@functools.cache
def _mkl_version() -> str:
    """MKL's version as torch reports it (``2024.2-Product Build 20240605``), or ``""``."""
    m = re.search(r"Math Kernel Library Version ([^ ]+(?: Build \d+)?)", torch.__config__.show())
    return m.group(1) if m else ""


_STORES: dict[str, LocalStore] = {}


def _store(path: str) -> LocalStore:
    if path not in _STORES:
        _STORES[path] = LocalStore.open(Path(path))
    return _STORES[path]


def _stream_key(seed: str, name: str, op_id: str) -> bytes:
    return bytes.fromhex(digest(b"crdt-merge/rng/v1\x00" + seed.encode() + b"\x00"
                                + name.encode() + b"\x00" + bytes.fromhex(op_id)))


def run_job(job: Job) -> tuple[str, list[str]]:
    """Compute one output tensor, write it into the output file, return its piece ids.

    Runs on a worker thread (or a worker process): it reads only object files, each piece
    verified against its id, never the replica's SQLite index (checked beforehand by
    :func:`require_pieces`). An elementwise method (one with a raw kernel) streams the
    tensor piece by piece in numpy (:func:`_run_streamed`); the others get whole input
    tensors in torch."""
    files = ObjectFiles(Path(job.store))
    wire = job.plan_wire
    contributions = wire["contributions"]
    if job.out_dtype not in _FLOATS:
        # integer buffers and the like are not merged: the base's (or first donor's) bytes
        source = job.base if job.base is not None else job.donors[0]
        if not supported(source.dtype):
            raise ShapeMismatch(f"dtype {source.dtype} is not supported in merges")
        data = read_record(files, source)
        return job.name, write_bytes(memoryview(data), job.path, job.offset, job.piece_size)
    method = get_method(wire["method"])
    sliced = job.sliced
    delta_bases = _delta_bases(job)
    if sliced is None:
        layer, length = layer_index(job.name), job.num_layers
        params = tuple(_resolved(c["params"], job.name, layer, length) for c in contributions)
        options = _resolved(wire["params"], job.name, layer, length)
        ids = [c["op_id"] for c in contributions]
    else:
        # mergekit's precedence: the contribution's own, the slice's, the recipe's
        layer, length = sliced.layer, sliced.length
        scopes = (sliced.params, wire["params"])
        per_model = {p.name for p in method.params if p.scope == "per_model"}
        own = [{} if i == ANCHOR else contributions[i]["params"] for i in sliced.inputs]
        params = tuple(_layered((mine, *scopes), source, layer, length, per_model)
                       for mine, source in zip(own, sliced.sources, strict=True))
        options = _layered(scopes, job.name, layer, length)
        ids = [wire["base"] if i == ANCHOR else contributions[i]["op_id"] for i in sliced.inputs]
    uses_base = method.base != "ignored"
    if _streamable(job):
        try:
            return job.name, _run_streamed(files, job, method, params, options, uses_base)
        except _Unaligned:
            pass  # pieces not cut at the profile's size: merge the whole tensor instead
    # inputs stay in their stored dtype: the method widens them (exactly) to float64,
    # a block at a time where it streams, and rounds its result once to the output dtype
    base = read_tensor(files, job.base) if job.base is not None else None
    donors = []
    for rec, form, under in zip(job.donors, job.forms, delta_bases, strict=True):
        t = read_tensor(files, rec)
        if form == "delta" and under is not None:
            b = base if under == job.base and base is not None else read_tensor(files, under)
            t = b.to(torch.float64) + t.to(torch.float64)
        donors.append(t)
    out = method.merge(TensorJob(
        name=job.name, base=base if uses_base else None, donors=tuple(donors), params=params,
        options=options,
        keys=tuple(_stream_key(wire["seed"] or job.plan_id, job.name, i) for i in ids),
        layer_index=layer, num_layers=length, out_dtype=torch_dtype(job.out_dtype)))
    return job.name, write_output(out, job.path, job.offset, job.piece_size)


_FLOATS = ("F16", "BF16", "F32", "F64")


def _delta_bases(job: Job) -> Sequence[TensorRecord | None]:
    """Per donor, the tensor a delta contribution adds to (the base, unless sliced)."""
    return job.sliced.delta_bases if job.sliced is not None else (job.base,) * len(job.donors)


def _shared_inputs(job: Job, uses_base: bool) -> list[TensorRecord]:
    """The base (when the method takes it) and the tensors deltas add to, each once."""
    shared: list[TensorRecord] = []
    for rec, form in zip(_delta_bases(job), job.forms, strict=True):
        if form == "delta" and rec is not None and rec not in shared:
            shared.append(rec)
    if uses_base and job.base is not None and job.base not in shared:
        shared.append(job.base)
    return shared


def _streamable(job: Job) -> bool:
    """Whether :func:`_run_streamed` can merge this job: a method with a raw kernel,
    float inputs of the output's shape, and a piece size every dtype's chunk divides."""
    method = get_method(job.plan_wire["method"])
    if method.raw_kernel is None or job.out_dtype not in _FLOATS:
        return False
    records = [*job.donors, *_shared_inputs(job, method.base != "ignored")]
    return (_numel(job.shape) > 0 and job.piece_size % 8 == 0 and bool(records)
            and all(r.dtype in _FLOATS and tuple(r.shape) == tuple(job.shape) for r in records))


def needs_torch(jobs: Sequence[Job]) -> bool:
    """Whether any job computes in torch (the others are numpy, or plain copies)."""
    return any(j.out_dtype in _FLOATS and not _streamable(j) for j in jobs)


class _Unaligned(Exception):
    """A stored tensor's pieces are not cut at the job's piece size."""


class _PieceReader:
    """One stored tensor's elements, range by range in increasing order, holding one
    verified piece in a reusable buffer. A range never crosses a piece boundary when
    pieces are cut at the profile's size and ranges at a multiple of ``piece_size / 8``
    elements (raises :class:`_Unaligned` otherwise)."""

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
                raise _Unaligned(self.record.pieces[max(self.index, 0)])
            self.index += 1
            got = self.files.read_into(self.record.pieces[self.index],
                                       memoryview(self.buf)[: self.record.nbytes - self.stop])
            self.start, self.stop = self.stop, self.stop + got
        if lo < self.start:
            raise _Unaligned(self.record.pieces[self.index])
        return Raw(self.buf[lo - self.start: hi - self.start].view(self.raw), self.record.dtype)


_SCRATCH = threading.local()


def _scratch(count: int, nbytes: int) -> list[np.ndarray]:
    """``count`` byte buffers of ``nbytes`` owned by this thread and reused across its
    jobs: a fresh multi-megabyte buffer per piece would page-fault on every use."""
    bufs = [b for b in getattr(_SCRATCH, "bufs", []) if b.size == nbytes]
    while len(bufs) < count:
        bufs.append(np.empty(nbytes, dtype=np.uint8))
    _SCRATCH.bufs = bufs
    return bufs[:count]


def _run_streamed(files: ObjectFiles, job: Job, method: Any, params: Sequence[Mapping[str, Any]],
                  options: Mapping[str, Any], uses_base: bool) -> list[str]:
    """Merge an elementwise job a chunk of ``piece_size / 8`` elements at a time with the
    method's raw kernel (numpy): each input's pieces are read (and verified) into this
    thread's buffers as the chunks reach them, each output piece is filled chunk by
    chunk, then hashed and written. Memory is one piece per input plus one, whatever the
    tensor's size; the bytes are those of the whole-tensor merge (the method is
    elementwise)."""
    n, size = _numel(job.shape), job.piece_size
    chunk = size // 8  # divides a piece of every float dtype, input or output
    shared = _shared_inputs(job, uses_base)
    bufs = _scratch(len(job.donors) + len(shared) + 1, size)
    readers = [_PieceReader(files, rec, buf) for rec, buf in zip(job.donors, bufs, strict=False)]
    others = {rec: _PieceReader(files, rec, buf)
              for rec, buf in zip(shared, bufs[len(readers):], strict=False)}
    raw_out = RAW_DTYPES[job.out_dtype]
    out_buf = bufs[-1]
    out_size = np.dtype(raw_out).itemsize
    inputs = list(zip(readers, job.forms, _delta_bases(job), strict=True))
    pieces: list[str] = []
    fd = os.open(job.path, os.O_WRONLY)
    try:
        filled = 0  # output bytes written so far
        for first in range(0, n, chunk):
            last = min(n, first + chunk)
            loaded = {rec: r.get(first, last) for rec, r in others.items()}
            donors = []
            for reader, form, under in inputs:
                t = reader.get(first, last)
                if form == "delta" and under is not None:
                    t = _add_delta(loaded[under], t)
                donors.append(t)
            lo = first * out_size - filled
            out = Raw(out_buf[lo: lo + (last - first) * out_size].view(raw_out), job.out_dtype)
            method.merge_raw(job.name, options, params,
                             loaded.get(job.base) if uses_base else None, donors, out)
            end = last * out_size
            if end - filled == size or last == n:
                pieces.append(_write_piece(fd, memoryview(out_buf)[: end - filled],
                                           job.offset + filled))
                filled = end
    finally:
        os.close(fd)
    return pieces


def _add_delta(base: Raw, delta: Raw) -> Raw:
    """The full float64 donor ``base + delta`` of a delta contribution (exact widening,
    one rounded add, as the tensor path does)."""
    total, scratch = np.empty(base.values.size), np.empty(base.values.size)
    np.add(widen_raw(base.values, base.dtype, total),
           widen_raw(delta.values, delta.dtype, scratch), out=total)
    return Raw(total, "F64")


def _write_piece(fd: int, data: memoryview, offset: int) -> str:
    """Write ``data`` at ``offset`` of the open file, start its writeback, return its id."""
    pos = 0
    while pos < len(data):
        pos += os.pwrite(fd, data[pos:], offset + pos)
    start_writeback(fd, offset, len(data))
    return digest(data)


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
        return [_write_piece(fd, piece, offset + k * piece_size)
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


def _resolved(params: Mapping[str, Any], name: str, layer: int | None,
              num_layers: int) -> dict[str, Any]:
    """Parameter values (scalars, layer gradients, filtered lists) evaluated for one
    tensor; a filtered value with no matching entry is left out (the default applies)."""
    out = {}
    for key, value in params.items():
        v = resolve_param(value, name, layer, num_layers)
        if v is not None:
            out[key] = v
    return out


def _layered(scopes: Sequence[Mapping[str, Any]], name: str, layer: int | None,
             length: int | None, keys: set[str] | None = None) -> dict[str, Any]:
    """Parameter values for one tensor from scopes of falling precedence: per key, the
    first scope whose value resolves (a filtered value with no match falls through, as in
    mergekit's ``resolve_parameter``). ``keys`` limits which keys are looked up."""
    out: dict[str, Any] = {}
    for scope in scopes:
        for key, value in scope.items():
            if key in out or (keys is not None and key not in keys):
                continue
            v = resolve_param(value, name, layer, length)
            if v is not None:
                out[key] = v
    return out


#: below this many output elements in all, a second worker costs more than it saves
IN_PROCESS_BELOW = 4 * 1024 * 1024


def run_jobs(jobs: Sequence[Any], workers: int | None = None,
             runner: Callable[[Any], tuple[str, list[str]]] | None = None) -> dict[str, list[str]]:
    """Run jobs, biggest first, on ``workers`` threads of this process (one: this thread),
    every job with one torch thread (torch is not even imported when every job streams in
    numpy). By default, one worker per core, or one for a small model. Where or when a job
    runs never changes its bytes.

    ``runner`` (default :func:`run_job`) is a module-level function of one job; another
    runner (the cross-family method's) runs in worker processes instead, each with its own
    torch and LAPACK state.
    """
    if workers is None:
        small = sum(_numel(j.shape) for j in jobs) < IN_PROCESS_BELOW
        workers = 1 if small else default_workers()
    order = sorted(jobs, key=lambda j: -_numel(j.shape))
    threads = None
    if runner is not None or needs_torch(jobs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # worker threads take it up too: one torch thread per job
    try:
        if workers <= 1 or len(jobs) <= 1:
            return dict((runner or run_job)(j) for j in order)
        if runner is None:
            with ThreadPoolExecutor(workers, thread_name_prefix="crdt-merge-job") as pool:
                return _schedule(pool, _run_job_serially, order, workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return _schedule(pool, runner, order, workers)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
        _SCRATCH.__dict__.clear()  # this thread's piece buffers (the pool's left with it)


def _run_job_serially(job: Job) -> tuple[str, list[str]]:
    """:func:`run_job` on a worker thread: one of several, so it hashes on itself alone."""
    with serial():
        return run_job(job)


def _schedule(pool: Executor, runner: Callable[[Any], tuple[str, list[str]]],
              order: list[Any], workers: int) -> dict[str, list[str]]:
    """Submit the jobs (biggest first) within a memory budget. The two biggest tensors
    (embeddings, lm_head) should not be in memory at once: a job starts only while the
    jobs running plus it stay within the biggest job's size times 1.25; meanwhile smaller
    jobs fill the other workers. A streamed job holds a few pieces whatever its size, so
    it counts as nothing."""
    weights = {id(j): _held(j) for j in order}
    budget = 1.25 * max(weights.values())
    results: dict[str, list[str]] = {}
    running: dict[Any, int] = {}
    queue = list(order)
    try:
        while queue or running:
            while queue and len(running) < workers:
                # the biggest waiting job that fits beside the running ones (a big job
                # waiting must not idle the other workers)
                room = budget - sum(running.values())
                pick = next((i for i, j in enumerate(queue)
                             if not running or weights[id(j)] <= room), None)
                if pick is None:
                    break
                job = queue.pop(pick)
                running[pool.submit(runner, job)] = weights[id(job)]
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                name, pieces = future.result()
                results[name] = pieces
    finally:
        for future in running:
            future.cancel()
    return results


def _held(job: Any) -> int:
    """What a job holds in memory at once, in elements, for scheduling."""
    return 0 if isinstance(job, Job) and _streamable(job) else _numel(job.shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def plan_jobs(plan: MergePlan, store: LocalStore, manifests: Mapping[str, Manifest],
              shards: Mapping[str, tuple[str, int]], piece_size: int,
              num_layers: int) -> list[Job]:
    wire = plan.to_wire()
    jobs = []
    if plan.slices is not None:
        for t, base, donors in _sliced_tensors(plan, manifests):
            first = base if base is not None else donors[0][1]
            path, offset = shards[t.name]
            jobs.append(Job(
                name=t.name, store=str(store.root), plan_wire=wire, plan_id=plan.id,
                base=base, donors=tuple(d[1] for d in donors),
                forms=tuple(d[2] for d in donors), out_dtype=_out_dtype(plan, first.dtype),
                shape=first.shape, path=path, offset=offset, piece_size=piece_size,
                num_layers=num_layers,
                sliced=SliceInputs(
                    inputs=tuple(d[0] for d in donors), sources=tuple(d[3] for d in donors),
                    delta_bases=tuple(d[4] for d in donors),
                    params=plan.slices[t.slice_index].get("parameters", {}),
                    layer=t.layer_index, length=t.num_layers),
            ))
        require_pieces(store, [r for j in jobs for r in (j.base, *j.donors, *j.sliced.delta_bases)])
        return jobs
    base = manifests[plan.base] if plan.base else None
    reference = base or manifests[plan.contributions[0].manifest]
    for name, rec in reference.tensors.items():
        out_dtype = _out_dtype(plan, rec.dtype)
        path, offset = shards[name]
        jobs.append(Job(
            name=name, store=str(store.root), plan_wire=wire, plan_id=plan.id,
            base=base.tensors[name] if base else None,
            donors=tuple(manifests[c.manifest].tensors[name] for c in plan.contributions),
            forms=tuple(c.form for c in plan.contributions), out_dtype=out_dtype,
            shape=rec.shape, path=path, offset=offset, piece_size=piece_size,
            num_layers=num_layers,
        ))
    require_pieces(store, [r for j in jobs for r in (j.base, *j.donors)])
    return jobs


def _out_dtype(plan: MergePlan, dtype: str) -> str:
    return plan.dtype if (plan.dtype and dtype in ("F16", "BF16", "F32", "F64")) else dtype


SlicedDonor = tuple[int, TensorRecord, str, str, TensorRecord | None]
"""(contribution index or ANCHOR, source record, form, source tensor name, delta base)"""


def _sliced_tensors(plan: MergePlan, manifests: Mapping[str, Manifest]) -> Iterable[
        tuple[Any, TensorRecord | None, list[SlicedDonor]]]:
    """Each output tensor of a sliced plan (in output order) with its base record (the
    anchor's source, for a method that takes a base) and its donors in canonical order
    (the anchor first, then by contribution op id; never the slice's listing order)."""
    layout = slice_layout(plan, manifests)
    uses_base = get_method(plan.method).base != "ignored"
    anchor = manifests[plan.base] if plan.base else None
    for t in layout.tensors.tensors:
        base = None
        donors: list[SlicedDonor] = []
        for model, source in sorted(t.sources):
            role = layout.inputs[model]
            rec = manifests[layout.models[model]].tensors[source]
            if role == ANCHOR and uses_base:
                base = rec
                continue
            form = "full" if role == ANCHOR else plan.contributions[role].form
            under = anchor.tensors[source] if form == "delta" and anchor is not None else None
            donors.append((role, rec, form, source, under))
        yield t, base, donors


def output_specs(plan: MergePlan, manifests: Mapping[str, Manifest]) -> list[tuple[str, str, tuple[int, ...]]]:
    if plan.slices is not None:  # each tensor as its first input (base, else first donor)
        out = []
        for t, base, donors in _sliced_tensors(plan, manifests):
            first = base if base is not None else donors[0][1]
            out.append((t.name, _out_dtype(plan, first.dtype), first.shape))
        return out
    reference = manifests[plan.base] if plan.base else manifests[plan.contributions[0].manifest]
    return [(name, _out_dtype(plan, rec.dtype), rec.shape) for name, rec in reference.tensors.items()]


def config_num_layers(config: Mapping[str, Any] | None, names: Sequence[str]) -> int:
    if config:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(config.get(key), int):
                return int(config[key])
    layers = [layer_index(n) for n in names]
    found = [i for i in layers if i is not None]
    return max(found) + 1 if found else 1


def dumps_json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
