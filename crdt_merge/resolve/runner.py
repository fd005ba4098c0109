"""runner: jobs computed on worker threads (or processes), within a memory budget.

Each per-tensor job reads the base and donor tensors from the store in their stored dtype
(pieces verified), lets the method compute in float64 and round once to the output dtype,
writes the bytes at their place in the output file and hashes them into pieces. An
elementwise method (one with a raw kernel) streams the tensor a chunk at a time in numpy
(:func:`stream_merge`); the others get whole input tensors in torch (:func:`run_job`).
Jobs run biggest first on worker threads, each with one torch thread (parallelism is
across tensors, never inside an operation), so the output bytes do not depend on the
number of workers; memory is a few tensors per worker (:func:`run_jobs`).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from pathlib import Path
from typing import Any

import numpy as np

from crdt_merge import testpoints
from crdt_merge.dtypes import FLOATS
from crdt_merge.errors import ShapeMismatch
from crdt_merge.hashing import digest, serial
from crdt_merge.lazy import torch
from crdt_merge.methods import TensorJob, get_method
from crdt_merge.methods.base import Method, Raw
from crdt_merge.methods.params import resolve_param
from crdt_merge.numeric import RAW_DTYPES, widen_raw
from crdt_merge.resolve.io import (
    PieceReader,
    Unaligned,
    read_record,
    read_tensor,
    release_scratch,
    scratch,
    write_bytes,
    write_output,
    write_piece,
)
from crdt_merge.resolve.jobs import (
    Job,
    LoraInput,
    OutputJob,
    delta_bases,
    layer_index,
    numel,
    shared_inputs,
    streamable,
)
from crdt_merge.resolve.merge_plan import ANCHOR
from crdt_merge.store.manifests import TensorRecord
from crdt_merge.store.objects import ObjectFiles
from crdt_merge.store.tensors import supported, torch_dtype

__all__ = ["IN_PROCESS_BELOW", "default_workers", "needs_torch", "run_job", "run_jobs", "stream_key",
           "stream_merge"]

Runner = Callable[[Any], tuple[str, list[str]]]


def stream_key(seed: str, name: str, op_id: str) -> bytes:
    """The 32-byte key of one donor's random stream for one tensor (specs/methods.md): the
    recipe's seed (else the plan id), the tensor name and the contribution's op id."""
    return bytes.fromhex(digest(b"crdt-merge/rng/v1\x00" + seed.encode() + b"\x00"
                                + name.encode() + b"\x00" + bytes.fromhex(op_id)))


def run_job(job: Job) -> tuple[str, list[str]]:
    """Compute one output tensor, write it into the output file, return its piece ids.

    Runs on a worker thread (or a worker process): it reads only object files, each piece
    verified against its id, never the replica's SQLite index (checked beforehand by
    :func:`~crdt_merge.resolve.io.require_pieces`)."""
    files = ObjectFiles(Path(job.store))
    plan = job.plan
    contributions = plan.contributions
    if job.out_dtype not in FLOATS:
        # integer buffers and the like are not merged: the base's (or first donor's) bytes
        source = job.base if job.base is not None else job.donors[0]
        if not supported(source.dtype):
            raise ShapeMismatch(f"dtype {source.dtype} is not supported in merges")
        data = read_record(files, source)
        return job.name, write_bytes(memoryview(data), job.path, job.offset, job.piece_size)
    method = get_method(plan.method)
    sliced = job.sliced
    under = delta_bases(job)
    if sliced is None:
        layer, length = layer_index(job.name), job.num_layers
        params = tuple(_resolved(c.params, job.name, layer, length) for c in contributions)
        options = _resolved(plan.params, job.name, layer, length)
        ids = [c.op_id for c in contributions]
    else:
        # mergekit's precedence: the contribution's own, the slice's, the recipe's
        layer, length = sliced.layer, sliced.length
        scopes = (sliced.params, plan.params)
        per_model = {p.name for p in method.params if p.scope == "per_model"}
        own = [{} if i == ANCHOR else contributions[i].params for i in sliced.inputs]
        params = tuple(_layered((mine, *scopes), source, layer, length, per_model)
                       for mine, source in zip(own, sliced.sources, strict=True))
        options = _layered(scopes, job.name, layer, length)
        ids = [plan.base or "" if i == ANCHOR else contributions[i].op_id
               for i in sliced.inputs]
    uses_base = method.base != "ignored"
    if streamable(job):
        try:
            return job.name, stream_merge(files, job, method, params, options, uses_base)
        except Unaligned:
            pass  # pieces not cut at the profile's size: merge the whole tensor instead
    # inputs stay in their stored dtype: the method widens them (exactly) to float64,
    # a block at a time where it streams, and rounds its result once to the output dtype
    base = read_tensor(files, job.base) if job.base is not None else None
    donors = []
    for i, (rec, form, below) in enumerate(zip(job.donors, job.forms, under, strict=True)):
        t = read_tensor(files, rec)
        lora = job.lora[i] if job.lora is not None else None
        if form == "lora" and lora is not None:
            t = _lora_donor(files, t, lora)
        elif form == "delta" and below is not None:
            b = base if below == job.base and base is not None else read_tensor(files, below)
            t = b.to(torch.float64) + t.to(torch.float64)
        donors.append(t)
    out = method.merge(TensorJob(
        name=job.name, base=base if uses_base else None, donors=tuple(donors), params=params,
        options=options,
        keys=tuple(stream_key(plan.seed or job.plan_id, job.name, i) for i in ids),
        layer_index=layer, num_layers=length, out_dtype=torch_dtype(job.out_dtype)))
    return job.name, write_output(out, job.path, job.offset, job.piece_size)


def _lora_donor(files: ObjectFiles, under: torch.Tensor, lora: LoraInput) -> torch.Tensor:
    """``under + delta`` in float64, the delta materialised from the adapter's factors
    (exact widening, :func:`crdt_merge.methods.lora.lora_delta`: fixed order, no BLAS)."""
    from crdt_merge.methods.lora import lora_delta, lora_scale

    def wide(rec: TensorRecord) -> np.ndarray:
        raw = read_record(files, rec).view(RAW_DTYPES[rec.dtype])
        return widen_raw(raw, rec.dtype, np.empty(raw.size, dtype=np.float64)).reshape(rec.shape)

    delta = lora_delta(wide(lora.a), wide(lora.b), lora_scale(lora.alpha, lora.rank, lora.rslora),
                       lora.transpose)
    return under.to(torch.float64) + torch.from_numpy(delta)


def stream_merge(files: ObjectFiles, job: Job, method: Method,
                 params: Sequence[Mapping[str, Any]], options: Mapping[str, Any],
                 uses_base: bool) -> list[str]:
    """Merge an elementwise job a chunk of ``piece_size / 8`` elements at a time with the
    method's raw kernel (numpy): each input's pieces are read (and verified) into this
    thread's buffers as the chunks reach them, each output piece is filled chunk by
    chunk, then hashed and written. Memory is one piece per input plus one, whatever the
    tensor's size; the bytes are those of the whole-tensor merge (the method is
    elementwise).

    Raises:
        Unaligned: an input's pieces are not cut at the job's piece size.
    """
    n, size = numel(job.shape), job.piece_size
    chunk = size // 8  # divides a piece of every float dtype, input or output
    shared = shared_inputs(job, uses_base)
    bufs = scratch(len(job.donors) + len(shared) + 1, size)
    readers = [PieceReader(files, rec, buf) for rec, buf in zip(job.donors, bufs, strict=False)]
    others = {rec: PieceReader(files, rec, buf)
              for rec, buf in zip(shared, bufs[len(readers):], strict=False)}
    raw_out = RAW_DTYPES[job.out_dtype]
    out_buf = bufs[-1]
    out_size = np.dtype(raw_out).itemsize
    inputs = list(zip(readers, job.forms, delta_bases(job), strict=True))
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
                pieces.append(write_piece(fd, memoryview(out_buf)[: end - filled],
                                          job.offset + filled))
                filled = end
    finally:
        os.close(fd)
    return pieces


def _add_delta(base: Raw, delta: Raw) -> Raw:
    """The full float64 donor ``base + delta`` of a delta contribution (exact widening,
    one rounded add, as the tensor path does)."""
    total, spare = np.empty(base.values.size), np.empty(base.values.size)
    np.add(widen_raw(base.values, base.dtype, total),
           widen_raw(delta.values, delta.dtype, spare), out=total)
    return Raw(total, "F64")


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


def needs_torch(jobs: Sequence[OutputJob]) -> bool:
    """Whether any job computes in torch (the others are numpy, or plain copies)."""
    return any(not isinstance(j, Job) or (j.out_dtype in FLOATS and not streamable(j))
               for j in jobs)


#: below this many output elements in all, a second worker costs more than it saves
IN_PROCESS_BELOW = 4 * 1024 * 1024


def run_jobs(jobs: Sequence[OutputJob], workers: int | None = None, runner: Runner | None = None,
             processes: bool = False) -> dict[str, list[str]]:
    """Run jobs, biggest first, on ``workers`` threads of this process (one: this thread),
    every job with one torch thread (torch is not even imported when every job streams in
    numpy). By default, one worker per core, or one for a small model. Where or when a job
    runs never changes its bytes.

    ``runner`` (default :func:`run_job`) is a module-level function of one job (a
    whole-model method's); with ``processes`` it runs in worker processes instead, each
    with its own torch and LAPACK state.
    """
    if workers is None:
        small = sum(numel(j.shape) for j in jobs) < IN_PROCESS_BELOW
        workers = 1 if small else default_workers()
    order = sorted(jobs, key=lambda j: -numel(j.shape))
    threads = None
    if needs_torch(jobs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # worker threads take it up too: one torch thread per job
    try:
        if workers <= 1 or len(jobs) <= 1:
            results = {}
            for job in order:
                name, pieces = (runner or run_job)(job)
                results[name] = pieces
                if len(results) < len(order):
                    testpoints.pause("resolve.job")
            return results
        if processes:
            with ProcessPoolExecutor(workers,
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                return _schedule(pool, runner or run_job, order, workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="crdt-merge-job") as pool:
            return _schedule(pool, _serially(runner or run_job), order, workers)
    finally:
        if threads is not None:
            torch.set_num_threads(threads)
        release_scratch()  # this thread's piece buffers (the pool's left with it)


def _serially(runner: Runner) -> Runner:
    """``runner`` on a worker thread: one of several, so it hashes on itself alone."""
    def run(job: Any) -> tuple[str, list[str]]:
        with serial():
            return runner(job)
    return run


def _schedule(pool: Executor, runner: Runner, order: list[OutputJob],
              workers: int) -> dict[str, list[str]]:
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
                if queue or running:
                    testpoints.pause("resolve.job")
    finally:
        for future in running:
            future.cancel()
    return results


def _held(job: OutputJob) -> int:
    """What a job holds in memory at once, in elements, for scheduling."""
    return 0 if isinstance(job, Job) and streamable(job) else numel(job.shape)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
