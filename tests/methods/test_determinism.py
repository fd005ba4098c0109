"""Same bytes whatever the thread count, the CPU kernel, the block size or the process.

DESIGN section 4: torch's own reductions change with threads and with the AVX2 vs default
kernels; the methods must not. Each configuration runs tests/methods/probe.py in a fresh
process and prints the BLAKE3 of every method's output; all must match each other and the
committed golden hashes (tests/methods/golden.json), so a different machine checks itself
against this one too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crdt_merge.methods.reduce as reduce
import crdt_merge.methods.select as select
from tests.methods import probe

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((Path(__file__).parent / "golden.json").read_text())


def _spawn(threads: int, capability: str, block: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(OMP_NUM_THREADS=str(threads), ATEN_CPU_CAPABILITY=capability)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.methods.probe", str(block), "--env"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    configs = {"1 default": (1, "default", 512), "2 avx2": (2, "avx2", 2048)}
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        configs["2 avx512"] = (2, "avx512", 1024)
    procs = {name: _spawn(*cfg) for name, cfg in configs.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[name] = json.loads(stdout)
    return out


def test_threads_and_cpu_kernels_do_not_change_a_byte(runs: dict[str, dict]) -> None:
    # AVX512 CPUs run the AVX2 kernels too; a CPU with neither cannot compare
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2 kernel to compare with")
    bare = {}
    for name, result in runs.items():
        threads, capability = name.split()
        assert result["_env"] == f"{threads} {capability.upper()}"
        bare[name] = {k: v for k, v in result.items() if k != "_env"}
    first = bare.pop("1 default")
    assert bare and all(result == first for result in bare.values())


def test_outputs_match_the_golden_hashes(runs: dict[str, dict]) -> None:
    for result in runs.values():
        result = {k: v for k, v in result.items() if k != "_env"}
        assert result == GOLDEN


def test_block_size_does_not_change_a_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    assert probe.hashes() == GOLDEN  # the default block: one block per tensor here
    monkeypatch.setattr(reduce, "BLOCK", 256)
    monkeypatch.setattr(select, "_SAMPLE", 32)
    assert probe.hashes() == GOLDEN


def test_golden_covers_every_method() -> None:
    from crdt_merge.methods import METHODS

    assert {method for _, method, *_ in probe.CASES} == set(METHODS)
    assert set(GOLDEN) == {case for case, *_ in probe.CASES}
