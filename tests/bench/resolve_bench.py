"""Import and resolve benchmark: crdt-merge against its floors and mergekit (issues 3 and 5).

Run from the repository root (15 to 25 minutes on 2 cores; about 6 GB free under ``--out``)::

    .venv/bin/python tests/bench/resolve_bench.py --out /tmp/bench

Optional: ``--methods linear,ties`` (a subset of linear, ties, dare_ties, slerp, median,
trimmed_mean; the last two are crdt-merge's own, issue 16, timed beside linear: put linear
first),
``--skip-mergekit``, ``--profile import,ties,linear`` (after the measurements, run our
resolve of those merges once more in one process, ``--workers 1``, under cProfile, and write
the top functions to ``OUT/profile-METHOD.txt``; ``import`` profiles the first import of the
base model), ``--keep-outputs``, ``--mergekit PATH``.

In one run it:

1. Builds four synthetic Llama models (transformers ``LlamaConfig``, 169.9M parameters,
   bf16, untied embeddings): ``base`` (seeded normal weights) and ``ft1..ft3`` (base plus
   small seeded noise). Every tensor comes from its own ``torch.Generator`` seeded by the
   model and tensor name, and the safetensors files are written here with a sorted header,
   so the bytes are the same on every run. They are cached in ``OUT/models`` (a
   ``.complete`` file holds the spec they were built from).
2. Measures the floors over the same bytes, page cache warm: an fsync'd copy of the four
   files (read + write in 16 MiB chunks, fsync each file and the folder) and BLAKE3 over
   the tensors cut into 16 MiB pieces exactly as the import cuts them, with the threading
   of ``crdt_merge.hashing.digest`` (``max_threads=AUTO`` from 1 MiB up).
3. Imports the four models with ``import_model`` into a fresh v1-profile replica (16 MiB
   pieces). Floors and first import run twice, interleaved (copy, hash, import), and the
   faster run of each counts (this disk's speed drifts by 2x between minutes; the paired
   ratios are kept too). Then it imports them again twice into the last replica (nothing
   new is written; the faster counts).
   Targets (issue 3): first import <= 1.3x the slower floor; re-import speed >= 70% of
   BLAKE3's.
4. For linear (issue 3) and ties (density 0.5), dare_ties (density 0.5) and slerp (t 0.5)
   (issue 5): a copy of the imported replica (objects hard-linked, index copied with
   SQLite's backup API, so every resolve starts as a user's first one would), the
   contributions and the recipe made through the CLI, then ``python -m crdt_merge resolve``
   and ``mergekit-yaml`` on the equivalent YAML, each as its own child process. For each:
   wall time, CPU time (user + sys of the child and the children it reaped, from
   ``os.wait4``), ``ru_maxrss`` (the largest single process of the tree) and the peak of the
   summed RSS and PSS of the whole process tree, sampled from /proc every 0.1 s. "Peak RSS"
   below is the larger of ``ru_maxrss`` and the sampled tree sum, so worker processes count.
   Targets: linear <= 0.3x mergekit's wall time with peak RSS below mergekit's (issue 3);
   ties <= 0.3x wall and <= 0.5x peak RSS (issue 5). The outputs are compared tensor by
   tensor (bit-identical share, largest absolute difference) to show the merges match.
5. Prints a table and writes ``OUT/results.json``. Ratios are ours / reference: the
   machines these run on are shared and noisy, the ratios travel better than seconds.

mergekit is run as ``mergekit-yaml CONFIG OUT --lazy-unpickle --no-copy-tokenizer`` (its CPU
path; the other options at their defaults; ``--lazy-unpickle`` only affects pickled
checkpoints, and the synthetic models have no tokenizer, which mergekit would otherwise try
and fail to copy), with ``HF_HUB_OFFLINE=1``. Generated data stays under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import resource
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3
import torch

from crdt_merge.store.objects import fsync_dir

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: `tests.bench.machine` is found from the root
DEFAULT_MERGEKIT = ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"
MERGEKIT_OPTIONS = ("--lazy-unpickle", "--no-copy-tokenizer")

#: the synthetic architecture: 169.9M parameters, 340 MB in bf16
ARCH = {"vocab_size": 32768, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 16}
MODELS = ("base", "ft1", "ft2", "ft3")
BASE_STD = 0.02
FINETUNE_STD = 0.002
SPEC = {"version": 1, "arch": ARCH, "models": MODELS, "base_std": BASE_STD,
        "finetune_std": FINETUNE_STD, "torch": torch.__version__.split("+")[0]}

PIECE_SIZE = 16 * 1024 * 1024
THREADED_FROM = 1 << 20  # as crdt_merge.hashing.digest
SAMPLE_INTERVAL = 0.1
FLOOR_REPEATS = 2


# -- models -------------------------------------------------------------------------------------


def _seed(model: str, tensor: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{model}/{tensor}".encode()).digest()[:8], "little") >> 1


def _normal(model: str, name: str, shape: Sequence[int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed(model, name))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def _header(specs: Sequence[tuple[str, tuple[int, ...]]]) -> bytes:
    """A safetensors header for bf16 tensors laid out in sorted-name order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in sorted(specs):
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def build_models(folder: Path) -> dict[str, Path]:
    """The four model folders under ``folder``, built unless a complete build of this spec
    is there. One pass over the tensor names writes all four files, a few tensors in memory."""
    marker = folder / ".complete"
    paths = {m: folder / m for m in MODELS}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(SPEC)):
        return paths
    from transformers import LlamaConfig, LlamaForCausalLM

    print("building the synthetic models (cached for the next runs) ...", flush=True)
    config = LlamaConfig(**ARCH, tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        specs = sorted((n, tuple(t.shape)) for n, t in LlamaForCausalLM(config).state_dict().items())
    if marker.exists():
        marker.unlink()
    header = _header(specs)
    tmp = {m: folder / f"{m}.partial" for m in MODELS}
    files = {}
    for m in MODELS:
        if tmp[m].exists():
            shutil.rmtree(tmp[m])
        tmp[m].mkdir(parents=True)
        config.to_json_file(str(tmp[m] / "config.json"))
        files[m] = open(tmp[m] / "model.safetensors", "wb")  # noqa: SIM115 - closed below
        files[m].write(header)
    try:
        for name, shape in specs:
            base = _normal("base", name, shape) * BASE_STD
            if len(shape) == 1:  # RMSNorm weights sit around one
                base += 1.0
            for m in MODELS:
                t = base if m == "base" else base + _normal(m, name, shape) * FINETUNE_STD
                files[m].write(t.to(torch.bfloat16).view(torch.uint8).numpy().data)
    finally:
        for f in files.values():
            f.close()
    for m in MODELS:
        if paths[m].exists():
            shutil.rmtree(paths[m])
        tmp[m].rename(paths[m])
    from safetensors import safe_open

    with safe_open(str(paths["ft3"] / "model.safetensors"), "pt") as f:
        if sorted(f.keys()) != [n for n, _ in specs]:
            raise RuntimeError("the written safetensors file does not list the expected tensors")
    marker.write_text(json.dumps(SPEC))
    return paths


def weight_files(paths: dict[str, Path]) -> list[Path]:
    return [paths[m] / "model.safetensors" for m in MODELS]


def parameter_count(path: Path) -> int:
    total = 0
    for info in _tensor_spans(path):
        total += (info[2] - info[1]) // 2
    return total


def _tensor_spans(path: Path) -> list[tuple[str, int, int]]:
    """(name, begin, end) of each tensor in a safetensors file, absolute offsets, by name."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sorted((k, 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                  for k, v in header.items())


# -- floors -------------------------------------------------------------------------------------


def warm(files: Sequence[Path]) -> None:
    """Read every file once so all measurements start with the page cache warm."""
    buf = bytearray(PIECE_SIZE)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def copy_floor(files: Sequence[Path], dest: Path) -> float:
    """Seconds to copy ``files`` into ``dest`` in 16 MiB chunks, each file fsync'd."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    buf = bytearray(PIECE_SIZE)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for i, src in enumerate(files):
        with open(src, "rb", buffering=0) as fi, open(dest / f"{i}.bin", "wb", buffering=0) as fo:
            while n := fi.readinto(buf):
                pos = 0
                while pos < n:
                    pos += fo.write(view[pos:n])
            os.fsync(fo.fileno())
    fsync_dir(dest)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dest)
    return seconds


def _pieces(path: Path) -> Iterator[memoryview]:
    """The tensor bytes of a safetensors file cut as the import cuts them."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            for _, begin, end in _tensor_spans(path):
                for pos in range(begin, end, PIECE_SIZE):
                    piece = view[pos:min(end, pos + PIECE_SIZE)]
                    yield piece
                    piece.release()
        finally:
            view.release()


def blake3_floor(files: Sequence[Path]) -> float:
    """Seconds to BLAKE3 every piece of ``files`` (the threading of hashing.digest)."""
    t0 = time.perf_counter()
    for path in files:
        for piece in _pieces(path):
            if len(piece) >= THREADED_FROM:
                blake3.blake3(piece, max_threads=blake3.blake3.AUTO).digest()
            else:
                blake3.blake3(piece).digest()
    return time.perf_counter() - t0


# -- measured child processes ----------------------------------------------------------------


@dataclass
class Run:
    """One child process: what it cost."""

    argv: list[str]
    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    maxrss_mb: float = 0.0  # ru_maxrss: the largest single process of the tree
    tree_rss_mb: float = 0.0  # sampled peak of the summed RSS of the process tree
    tree_pss_mb: float = 0.0  # sampled peak of the summed PSS of the process tree
    max_procs: int = 0
    returncode: int = 0
    stdout: str = ""

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def peak_rss_mb(self) -> float:
        return max(self.maxrss_mb, self.tree_rss_mb)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("stdout")
        out["cpu_s"] = self.cpu_s
        out["peak_rss_mb"] = self.peak_rss_mb
        return out


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children[ppid].append(int(entry.name))
    return children


def _tree(root: int) -> list[int]:
    children = _parents()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _kb(path: str, key: bytes) -> int:
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``argv`` as a child (stdout to ``log``.out, stderr to ``log``.err) and measure it.

    CPU time comes from ``os.wait4`` on the child, so it covers it and the descendants it
    reaped; the tree's summed RSS/PSS is sampled from /proc meanwhile. The peak RSS is
    GNU time's ``%M`` where /usr/bin/time exists: Linux gives a child started by
    ``posix_spawn`` (vfork) from this big process a ``ru_maxrss`` of at least this
    process's own RSS (exec records the high-water mark of the memory it shared with us),
    while a child of the small ``time`` process starts clean.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    hwm = log.with_suffix(".maxrss")
    timer = Path("/usr/bin/time")
    if timer.exists():
        argv = [str(timer), "-f", "%M", "-o", str(hwm), *argv]
    run = Run(list(argv))
    actions = [(os.POSIX_SPAWN_OPEN, 1, str(out), flags, 0o644),
               (os.POSIX_SPAWN_OPEN, 2, str(err), flags, 0o644)]
    done = threading.Event()
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], list(argv), env if env is not None else dict(os.environ),
                         file_actions=actions)

    def sample() -> None:
        while not done.is_set():
            pids = _tree(pid)
            rss = sum(_kb(f"/proc/{p}/status", b"VmRSS:") for p in pids)
            pss = sum(_kb(f"/proc/{p}/smaps_rollup", b"Pss:") for p in pids)
            run.tree_rss_mb = max(run.tree_rss_mb, rss / 1024)
            run.tree_pss_mb = max(run.tree_pss_mb, pss / 1024)
            run.max_procs = max(run.max_procs, len(pids))
            done.wait(SAMPLE_INTERVAL)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(pid, 0)
    run.wall_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    run.returncode = os.waitstatus_to_exitcode(status)
    run.user_s, run.sys_s = usage.ru_utime, usage.ru_stime
    run.maxrss_mb = (int(hwm.read_text().split()[-1]) if timer.exists() and hwm.exists()
                     else usage.ru_maxrss) / 1024
    run.stdout = out.read_text()
    if run.returncode != 0:
        tail = err.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(argv)} exited {run.returncode}:\n{tail}")
    return run


def cli(*args: str) -> dict[str, Any]:
    """Run one ``crdt-merge`` command (unmeasured) and return its JSON."""
    proc = subprocess.run([sys.executable, "-m", "crdt_merge", "--json", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"crdt-merge {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return json.loads(proc.stdout)


# -- the merges ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One merge, written for both tools."""

    method: str
    donors: tuple[tuple[str, float | None], ...]  # (model, weight or None)
    base: str | None = None
    params: dict[str, float] = field(default_factory=dict)
    issue: int = 5
    wall_limit: float | None = None
    rss_limit: float | None = None  # ours / mergekit peak RSS must be below this
    rss_strict: bool = False  # "below" rather than "at most"
    in_mergekit: bool = True  # False: crdt-merge's own method, compared with linear instead

    def mergekit_yaml(self, paths: dict[str, Path]) -> str:
        lines = [f"merge_method: {self.method}"]
        if self.base:
            lines.append(f"base_model: {paths[self.base]}")
        lines.append("models:")
        if self.method == "slerp" and self.base:
            lines.append(f"  - model: {paths[self.base]}")
        for model, weight in self.donors:
            lines.append(f"  - model: {paths[model]}")
            if weight is not None:
                lines += ["    parameters:", f"      weight: {weight}"]
        if self.params:
            lines.append("parameters:")
            lines += [f"  {k}: {v}" for k, v in self.params.items()]
        lines.append("dtype: bfloat16")
        return "\n".join(lines) + "\n"


CASES = {
    "linear": Case("linear", (("base", 0.4), ("ft1", 0.2), ("ft2", 0.2), ("ft3", 0.2)),
                   issue=3, wall_limit=0.3, rss_limit=1.0, rss_strict=True),
    "ties": Case("ties", (("ft1", 1.0), ("ft2", 1.0), ("ft3", 1.0)), base="base",
                 params={"density": 0.5}, wall_limit=0.3, rss_limit=0.5),
    "dare_ties": Case("dare_ties", (("ft1", 1.0), ("ft2", 1.0), ("ft3", 1.0)), base="base",
                      params={"density": 0.5}),
    "slerp": Case("slerp", (("ft1", None),), base="base", params={"t": 0.5}),
    # issue 16: robust methods over the same four inputs as linear (the base contributed as
    # a fourth donor, so four task vectors), no mergekit equivalent: ratios against linear
    # (the merge alone: outlier_report false; median_report: with the plan's outlier report)
    "median": Case("median", (("base", None), ("ft1", None), ("ft2", None), ("ft3", None)),
                   base="base", params={"outlier_report": "false"}, issue=16,
                   in_mergekit=False),
    "trimmed_mean": Case("trimmed_mean", (("base", None), ("ft1", None), ("ft2", None),
                                          ("ft3", None)),
                         base="base", params={"trim": 1, "outlier_report": "false"}, issue=16,
                         in_mergekit=False),
    "median_report": Case("median", (("base", None), ("ft1", None), ("ft2", None),
                                     ("ft3", None)),
                          base="base", issue=16, in_mergekit=False),
}


def clone_replica(src: Path, dest: Path) -> None:
    """A copy of a closed replica: object files hard-linked (they are immutable and named by
    their hash), the SQLite index copied with the backup API, the site key copied."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(src / "objects", dest / "objects", copy_function=os.link)
    for sub in ("tmp", "quarantine"):
        (dest / sub).mkdir()
    shutil.copy2(src / "site.key", dest / "site.key")
    with sqlite3.connect(src / "replica.sqlite") as a, sqlite3.connect(dest / "replica.sqlite") as b:
        a.backup(b)
    a.close()
    b.close()


def prepare(case: Case, paths: dict[str, Path], imported: Path, dest: Path) -> list[float]:
    """A replica holding the case's contributions and recipe; returns each CLI step's seconds."""
    clone_replica(imported, dest)
    steps = []
    for model, weight in case.donors:
        args = ["contribute", str(dest), str(paths[model]), "--label", model]
        if weight is not None:
            args += ["--weight", str(weight)]
        t0 = time.perf_counter()
        cli(*args)
        steps.append(time.perf_counter() - t0)
    args = ["recipe", str(dest), "--method", case.method, "--param", "dtype=bfloat16"]
    args += [a for k, v in case.params.items() for a in ("--param", f"{k}={v}")]
    if case.base:
        args += ["--anchor", str(paths[case.base])]
    t0 = time.perf_counter()
    cli(*args)
    steps.append(time.perf_counter() - t0)
    return steps


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def compare_outputs(ours: Path, theirs: Path) -> dict[str, Any]:
    """Tensor by tensor: the share of bit-identical values and the largest |difference|."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for path in _safetensors_files(folder):
            with safe_open(str(path), "pt") as f:
                out.update(dict.fromkeys(f.keys(), path))
        return out

    a_idx, b_idx = index(ours), index(theirs)
    same = total = 0
    max_abs = 0.0
    missing = sorted(set(a_idx) ^ set(b_idx))
    for name in sorted(set(a_idx) & set(b_idx)):
        with safe_open(str(a_idx[name]), "pt") as fa, safe_open(str(b_idx[name]), "pt") as fb:
            a, b = fa.get_tensor(name), fb.get_tensor(name)
        if a.dtype != b.dtype or a.shape != b.shape:
            missing.append(f"{name} ({a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)})")
            continue
        same += int((a.view(torch.int16) == b.view(torch.int16)).sum()) if a.dtype == torch.bfloat16 \
            else int((a == b).sum())
        total += a.numel()
        max_abs = max(max_abs, float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
    return {"bit_identical_share": same / total if total else None, "max_abs_diff": max_abs,
            "values": total, "unmatched": missing}


# -- machine and report -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from tests.bench.machine import describe

    m = describe(("crdt-model-merge", "torch", "blake3", "numpy", "safetensors"))
    m["torch"], m["blake3"] = torch.__version__, blake3.__version__  # as the results had them
    return m


def mergekit_version(mergekit: Path) -> str:
    py = mergekit.parent / "python"
    proc = subprocess.run([str(py), "-c", "import importlib.metadata as m, torch; "
                           "print(m.version('mergekit'), torch.__version__)"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def target(results: list[dict[str, Any]], name: str, value: float, op: str, limit: float) -> None:
    met = {"<=": value <= limit, "<": value < limit, ">=": value >= limit}[op]
    results.append({"target": name, "value": round(value, 3), "op": op, "limit": limit, "met": met})


def print_table(res: dict[str, Any]) -> None:
    f, imp = res["floors"], res["import"]
    gb = f["bytes"] / 1e9
    print(f"\n== floors and import: {gb:.2f} GB of tensors in 4 files ==")
    rows = [("fsync'd copy", f["copy_s"]), ("BLAKE3 (16 MiB pieces)", f["blake3_s"]),
            ("first import (import_model)", imp["first_s"]), ("re-import (nothing new)", imp["reimport_s"])]
    for label, s in rows:
        print(f"  {label:<30} {s:8.2f} s  {gb / s:6.2f} GB/s")
    print(f"  first import / slower floor   {imp['first_vs_slower_floor']:.2f}x   "
          f"(CPU {imp['first_cpu_s']:.1f} s)")
    print(f"  re-import speed / BLAKE3      {imp['reimport_speed_vs_blake3']:.2f}")
    print(f"  CLI start-up (status)         {res['cli_startup_s']:.2f} s")
    if res["resolve"]:
        print("\n== resolve: ours / mergekit ==")
        print(f"  {'method':<10} {'wall s ours/mk':>17} {'ratio':>6} {'CPU s ours/mk':>17} {'ratio':>6}"
              f" {'peak RSS MB ours/mk':>21} {'ratio':>6} {'PSS ratio':>9}  bit-identical")
        for method, r in res["resolve"].items():
            o, m = r["ours"], r.get("mergekit")
            if m is None:
                vs = r.get("vs_linear")
                extra = (f"  (vs linear: wall {vs['wall']:.2f}x, peak RSS {vs['peak_rss']:.2f}x)"
                         if vs else "")
                print(f"  {method:<10} {o['wall_s']:8.1f} {'-':>8}  CPU {o['cpu_s']:.1f} s, "
                      f"peak RSS {o['peak_rss_mb']:.0f} MB{extra}")
                continue
            rt = r["ratios"]
            cmp = r.get("compare") or {}
            share = cmp.get("bit_identical_share")
            print(f"  {method:<10} {o['wall_s']:8.1f}/{m['wall_s']:<8.1f} {rt['wall']:6.2f}"
                  f" {o['cpu_s']:8.1f}/{m['cpu_s']:<8.1f} {rt['cpu']:6.2f}"
                  f" {o['peak_rss_mb']:10.0f}/{m['peak_rss_mb']:<10.0f} {rt['peak_rss']:6.2f}"
                  f" {rt['tree_pss']:9.2f}  {'' if share is None else f'{share:.4f}'}")
    print("\n== targets ==")
    for t in res["targets"]:
        print(f"  {'MET   ' if t['met'] else 'MISSED'} {t['target']:<44} {t['value']:.3f} {t['op']} {t['limit']}")


# -- profile ------------------------------------------------------------------------------------


def profile(case: Case, paths: dict[str, Path], imported: Path, work: Path, out: Path) -> dict[str, Any]:
    """Our resolve of ``case`` in one process (``--workers 1``) under cProfile."""
    import pstats

    dest = work / f"profile-{case.method}"
    prepare(case, paths, imported, dest)
    prof = out / f"profile-{case.method}.prof"
    run = measure([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "crdt_merge", "--json",
                   "resolve", str(dest), "--out", str(work / f"profile-out-{case.method}"),
                   "--workers", "1"], out / f"profile-{case.method}")
    text = out / f"profile-{case.method}.txt"
    with open(text, "w") as f:
        stats = pstats.Stats(str(prof), stream=f)
        f.write(f"wall {run.wall_s:.2f} s, CPU {run.cpu_s:.2f} s, one process\n")
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
    shutil.rmtree(work / f"profile-out-{case.method}", ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    print(f"profile of {case.method}: {text}")
    return {"wall_s": run.wall_s, "cpu_s": run.cpu_s, "report": str(text)}


def profile_import(path: Path, work: Path, out: Path) -> dict[str, Any]:
    """The first import of one model into a fresh replica, under cProfile."""
    import cProfile
    import pstats

    from crdt_merge.replica import Replica
    from crdt_merge.store.importer import import_model

    dest = work / "profile-import"
    if dest.exists():
        shutil.rmtree(dest)
    replica = Replica.create(dest, site="bench", profile="v1")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(import_model, replica.store, str(path), replica.piece_size)
    wall = time.perf_counter() - t0
    replica.close()
    text = out / "profile-import.txt"
    with open(text, "w") as f:
        f.write(f"first import of {path}: wall {wall:.2f} s (under cProfile)\n")
        stats = pstats.Stats(prof, stream=f)
        stats.sort_stats("tottime").print_stats(25)
    shutil.rmtree(dest, ignore_errors=True)
    print(f"profile of the import: {text}")
    return {"wall_s": wall, "report": str(text)}


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="working folder (models cached here)")
    p.add_argument("--methods", default=",".join(CASES), help="comma-separated subset of "
                   + ", ".join(CASES))
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT, help="mergekit-yaml to run")
    p.add_argument("--profile", default="", help="methods to profile afterwards (comma-separated)")
    p.add_argument("--keep-outputs", action="store_true")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted((set(methods) - set(CASES))
                     | {m for m in args.profile.split(",") if m} - {*CASES, "import"})
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(CASES)}")
    from crdt_merge.replica import Replica
    from crdt_merge.store.importer import import_model

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    res: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                           "machine": machine(), "spec": SPEC, "notes": []}
    paths = build_models(out / "models")
    files = weight_files(paths)
    res["model"] = {"parameters": parameter_count(files[0]),
                    "file_bytes": sum(f.stat().st_size for f in files) // len(files)}

    # floors and first import: each measured FLOOR_REPEATS times, interleaved (a copy, a
    # hash, a first import into a fresh replica), the fastest of each kept: this disk's
    # speed drifts by 2x from minute to minute, so one import against the best of two
    # floors would compare a typical run with a lucky one
    warm(files)
    tensor_bytes = sum(e - b for f in files for _, b, e in _tensor_spans(f))
    copies, hashes, firsts, first_cpus = [], [], [], []
    imported = work / "imported"
    for round_ in range(FLOOR_REPEATS):
        copies.append(copy_floor(files, work / "copy"))
        hashes.append(blake3_floor(files))
        if imported.exists():
            shutil.rmtree(imported)
        replica = Replica.create(imported, site="bench", profile="v1")
        if replica.piece_size != PIECE_SIZE:
            raise RuntimeError(f"v1 piece size is {replica.piece_size}, the floors assume {PIECE_SIZE}")
        new = []
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for m in MODELS:
            new.append(import_model(replica.store, str(paths[m]), replica.piece_size).new_pieces)
        firsts.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        first_cpus.append((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime))
        if round_ < FLOOR_REPEATS - 1:
            replica.close()  # the last round's replica is re-imported into, then resolved
    res["floors"] = {"bytes": tensor_bytes, "copy_s": min(copies), "blake3_s": min(hashes),
                     "copy_samples_s": copies, "blake3_samples_s": hashes}
    first_s = min(firsts)
    again, reimports = [], []
    for _ in range(FLOOR_REPEATS):
        t0 = time.perf_counter()
        for m in MODELS:
            again.append(import_model(replica.store, str(paths[m]), replica.piece_size).new_pieces)
        reimports.append(time.perf_counter() - t0)
    reimport_s = min(reimports)
    r2 = resource.getrusage(resource.RUSAGE_SELF)
    replica.close()
    if any(again):
        raise RuntimeError(f"re-import wrote new pieces: {again}")
    fl = res["floors"]
    res["import"] = {
        "first_s": first_s, "first_samples_s": firsts,
        "first_vs_copy_paired": [f / c for f, c in zip(firsts, copies, strict=True)],
        "reimport_s": reimport_s, "reimport_samples_s": reimports,
        "new_pieces_first": new, "new_pieces_reimport": again,
        "first_cpu_s": min(first_cpus),
        "reimport_cpu_s": ((r2.ru_utime + r2.ru_stime) - (r1.ru_utime + r1.ru_stime)) / FLOOR_REPEATS,
        "first_vs_slower_floor": first_s / max(fl["copy_s"], fl["blake3_s"]),
        "reimport_speed_vs_blake3": fl["blake3_s"] / reimport_s,
    }
    res["cli_startup_s"] = measure([sys.executable, "-m", "crdt_merge", "--json", "status",
                                    str(imported)], work / "status").wall_s
    res["targets"] = []
    target(res["targets"], "first import / slower floor (issue 3)",
           res["import"]["first_vs_slower_floor"], "<=", 1.3)
    target(res["targets"], "re-import speed / BLAKE3 (issue 3)",
           res["import"]["reimport_speed_vs_blake3"], ">=", 0.7)

    # resolves
    from crdt_merge.errors import CrdtMergeError
    from crdt_merge.methods import get_method

    mergekit = None if args.skip_mergekit else args.mergekit
    if mergekit is not None and not mergekit.is_file():
        res["notes"].append(f"{mergekit} not found: mergekit not run (tests/oracle/setup_mergekit.sh)")
        mergekit = None
    if mergekit is not None:
        res["mergekit"] = {"version": mergekit_version(mergekit), "options": list(MERGEKIT_OPTIONS)}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res["resolve"] = {}
    for method in methods:
        case = CASES[method]
        try:
            get_method(case.method)
        except (ImportError, CrdtMergeError) as exc:
            res["notes"].append(f"{method}: not available in crdt_merge.methods ({exc}); skipped")
            continue
        print(f"resolving {method} ...", flush=True)
        dest = work / f"replica-{method}"
        steps = prepare(case, paths, imported, dest)
        ours_out = work / f"ours-{method}"
        ours = measure([sys.executable, "-m", "crdt_merge", "--json", "resolve", str(dest),
                        "--out", str(ours_out)], work / f"ours-{method}", env)
        entry: dict[str, Any] = {"cli_prepare_s": steps, "ours": ours.to_json(),
                                 "checkpoint_id": json.loads(ours.stdout)["checkpoint_id"]}
        if not case.in_mergekit and "linear" in res["resolve"]:
            lin = res["resolve"]["linear"]["ours"]
            entry["vs_linear"] = {"wall": ours.wall_s / lin["wall_s"],
                                  "peak_rss": ours.peak_rss_mb / lin["peak_rss_mb"]}
        if mergekit is not None and case.in_mergekit:
            yml = work / f"{method}.yml"
            yml.write_text(case.mergekit_yaml(paths))
            mk_out = work / f"mergekit-{method}"
            if mk_out.exists():
                shutil.rmtree(mk_out)
            mk = measure([str(mergekit), str(yml), str(mk_out), *MERGEKIT_OPTIONS],
                         work / f"mergekit-{method}", env)
            entry["mergekit"] = mk.to_json()
            entry["mergekit_yaml"] = yml.read_text()
            entry["ratios"] = {"wall": ours.wall_s / mk.wall_s, "cpu": ours.cpu_s / mk.cpu_s,
                               "peak_rss": ours.peak_rss_mb / mk.peak_rss_mb,
                               "maxrss": ours.maxrss_mb / mk.maxrss_mb,
                               "tree_pss": ours.tree_pss_mb / mk.tree_pss_mb}
            entry["compare"] = compare_outputs(ours_out, mk_out)
            if case.wall_limit is not None:
                target(res["targets"], f"{method} wall / mergekit (issue {case.issue})",
                       entry["ratios"]["wall"], "<=", case.wall_limit)
            if case.rss_limit is not None:
                target(res["targets"], f"{method} peak RSS / mergekit (issue {case.issue})",
                       entry["ratios"]["peak_rss"], "<" if case.rss_strict else "<=", case.rss_limit)
            if not args.keep_outputs:
                shutil.rmtree(mk_out, ignore_errors=True)
        if not args.keep_outputs:
            shutil.rmtree(ours_out, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
        res["resolve"][method] = entry
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")

    res["machine"]["loadavg_after_resolves"] = os.getloadavg()
    res["profiles"] = {}
    for method in [m for m in args.profile.split(",") if m]:
        if method == "import":
            res["profiles"]["import"] = profile_import(paths["base"], work, out)
        else:
            res["profiles"][method] = profile(CASES[method], paths, imported, work, out)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print_table(res)
    for note in res["notes"]:
        print("note:", note)
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
