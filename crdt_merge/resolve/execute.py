"""execute: run a plan tensor by tensor and render the checkpoint folder.

Each tensor is one job: read the base and donor tensors from the store (pieces verified),
widen to float64, call the method, round once to the output dtype, write the bytes at their
place in the output file and hash them into pieces. Jobs run in worker processes with one
torch thread each (parallelism is across tensors, never inside a reduction), so the output
bytes do not depend on the number of workers; memory is a few tensors per worker.

The checkpoint id is the id of the output manifest (tensor records + config + tokenizer),
never a hash of files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crdt_merge import ENGINE
from crdt_merge.hashing import digest
from crdt_merge.methods import TensorJob, get_method
from crdt_merge.methods.params import resolve_param
from crdt_merge.numeric import NUMERIC_VERSION, round_to
from crdt_merge.resolve.plan import MergePlan
from crdt_merge.store.local import LocalStore
from crdt_merge.store.manifests import Manifest, TensorRecord
from crdt_merge.store.safetensors_io import iter_pieces
from crdt_merge.store.tensors import TORCH_DTYPES, load_tensor

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


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


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def numeric_profile() -> dict[str, str]:
    """What the bytes of a checkpoint may depend on beyond the plan (DESIGN section 4)."""
    import platform

    return {"engine": ENGINE, "numeric": NUMERIC_VERSION, "torch": torch.__version__,
            "blas": "mkl" if torch.backends.mkl.is_available() else "none",
            "arch": platform.machine()}


_STORES: dict[str, LocalStore] = {}


def _store(path: str) -> LocalStore:
    if path not in _STORES:
        _STORES[path] = LocalStore.open(Path(path))
    return _STORES[path]


def _stream_key(seed: str, name: str, op_id: str) -> bytes:
    return bytes.fromhex(digest(b"crdt-merge/rng/v1\x00" + seed.encode() + b"\x00"
                                + name.encode() + b"\x00" + bytes.fromhex(op_id)))


def run_job(job: Job) -> tuple[str, list[str]]:
    """Compute one output tensor, write it into the output file, return its piece ids."""
    torch.set_num_threads(1)
    store = _store(job.store)
    wire = job.plan_wire
    contributions = wire["contributions"]
    if job.out_dtype not in ("F16", "BF16", "F32", "F64"):
        # integer buffers and the like are not merged: the base's (or first donor's) bytes
        out = load_tensor(store, job.base if job.base is not None else job.donors[0])
    else:
        method = get_method(wire["method"])
        layer = layer_index(job.name)
        params = tuple(_resolved(c["params"], job.name, layer, job.num_layers)
                       for c in contributions)
        options = _resolved(wire["params"], job.name, layer, job.num_layers)
        # inputs stay in their stored dtype; float64 copies are made a block at a time
        # where the method is elementwise, else for the whole tensor
        base_raw = load_tensor(store, job.base) if job.base is not None else None
        donors_raw = [load_tensor(store, rec) for rec in job.donors]
        n = _numel(job.shape)
        step = BLOCK if _elementwise(wire["method"], params, options) else max(n, 1)
        out = torch.empty(job.shape, dtype=TORCH_DTYPES[job.out_dtype]).reshape(-1)
        for s in range(0, n, step):
            e = min(n, s + step)
            base = base_raw.reshape(-1)[s:e].to(torch.float64) if base_raw is not None else None
            donors = []
            for raw, form in zip(donors_raw, job.forms, strict=True):
                t = raw.reshape(-1)[s:e].to(torch.float64)
                donors.append(base + t if form == "delta" and base is not None else t)
            shape = job.shape if step >= n else (e - s,)
            merged = method.merge(TensorJob(
                name=job.name, base=None if method.base == "ignored" else _shaped(base, shape),
                donors=tuple(d.reshape(shape) for d in donors), params=params, options=options,
                keys=tuple(_stream_key(wire["seed"] or job.plan_id, job.name, c["op_id"])
                           for c in contributions),
                layer_index=layer, num_layers=job.num_layers,
            ))
            out[s:e] = round_to(merged, out.dtype).reshape(-1)
        out = out.reshape(job.shape)
    return job.name, write_output(out, job.path, job.offset, job.piece_size)


def write_output(out: torch.Tensor, path: str, offset: int, piece_size: int) -> list[str]:
    """Write a finished tensor's bytes at ``offset`` of the output file; return the ids of
    the pieces they cut into (for the checkpoint manifest)."""
    data = out.contiguous().view(torch.uint8).numpy().tobytes() if out.numel() else b""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            pos += os.pwrite(fd, view[pos:], offset + pos)
    finally:
        os.close(fd)
    return [digest(p) for p in iter_pieces(memoryview(data), piece_size)]


#: elements per block for elementwise methods (32 MiB of float64 per input)
BLOCK = 1 << 22


def _shaped(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    return None if t is None else t.reshape(shape)


def _elementwise(method: str, params: Sequence[Mapping[str, Any]],
                 options: Mapping[str, Any]) -> bool:
    """Whether output element i depends on input elements i only, so the tensor may be
    merged block by block with the same bytes: linear always; task arithmetic when
    nothing is sparsified (a density below 1 ranks magnitudes over the whole tensor)."""
    if method == "linear":
        return True
    if method == "task_arithmetic":
        densities = [p.get("density", options.get("density", 1.0)) for p in params]
        return all(isinstance(d, (int, float)) and float(d) >= 1.0 for d in densities)
    return False


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


#: below this many output elements in all, starting worker processes costs more than it saves
IN_PROCESS_BELOW = 4 * 1024 * 1024


def run_jobs(jobs: Sequence[Any], workers: int | None = None,
             runner: Callable[[Any], tuple[str, list[str]]] | None = None) -> dict[str, list[str]]:
    """Run jobs, biggest first, on ``workers`` processes (one: in this process). By default,
    one worker per core, or this process alone for a small model. Where a job runs never
    changes its bytes. ``runner`` (default :func:`run_job`) is a module-level function of
    one job, such as the cross-family method's."""
    runner = runner or run_job
    if workers is None:
        small = sum(_numel(j.shape) for j in jobs) < IN_PROCESS_BELOW
        workers = 1 if small else default_workers()
    order = sorted(jobs, key=lambda j: -_numel(j.shape))
    if workers <= 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        try:
            return dict(runner(j) for j in order)
        finally:
            torch.set_num_threads(threads)
    # The two biggest tensors (embeddings, lm_head) should not be in memory at once: a job
    # starts only while the jobs running plus it stay within the biggest job's size
    # (times 1.25, so small jobs still fill the other workers).
    budget = 1.25 * _numel(order[0].shape)
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, list[str]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        running: dict[Any, int] = {}
        queue = list(order)
        while queue or running:
            while queue and len(running) < workers and (
                    not running or sum(running.values()) + _numel(queue[0].shape) <= budget):
                job = queue.pop(0)
                running[pool.submit(runner, job)] = _numel(job.shape)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                name, pieces = future.result()
                results[name] = pieces
    return results


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
    base = manifests[plan.base] if plan.base else None
    reference = base or manifests[plan.contributions[0].manifest]
    wire = plan.to_wire()
    jobs = []
    for name, rec in reference.tensors.items():
        out_dtype = plan.dtype if (plan.dtype and rec.dtype in ("F16", "BF16", "F32", "F64")) else rec.dtype
        path, offset = shards[name]
        jobs.append(Job(
            name=name, store=str(store.root), plan_wire=wire, plan_id=plan.id,
            base=base.tensors[name] if base else None,
            donors=tuple(manifests[c.manifest].tensors[name] for c in plan.contributions),
            forms=tuple(c.form for c in plan.contributions), out_dtype=out_dtype,
            shape=rec.shape, path=path, offset=offset, piece_size=piece_size,
            num_layers=num_layers,
        ))
    return jobs


def output_specs(plan: MergePlan, manifests: Mapping[str, Manifest]) -> list[tuple[str, str, tuple[int, ...]]]:
    reference = manifests[plan.base] if plan.base else manifests[plan.contributions[0].manifest]
    return [(name, plan.dtype if (plan.dtype and rec.dtype in ("F16", "BF16", "F32", "F64"))
             else rec.dtype, rec.shape) for name, rec in reference.tensors.items()]


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
