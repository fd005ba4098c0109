"""The machine a benchmark ran on, for the ``"machine"`` entry of its results JSON.

Shared by the scripts in this folder. Like their other sibling imports, they put the
repository root on ``sys.path`` (they run as ``python tests/bench/X.py``, and some are also
imported as ``tests.bench.X`` by the tests) and import it from there::

    from tests.bench.machine import describe

    report = {"machine": describe(["torch", "blake3"])}

Standard library only: versions come from ``importlib.metadata``, so describing the machine
imports none of the libraries it names (torch in particular).
"""

from __future__ import annotations

import os
import platform
import sqlite3
import subprocess
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: CPU flags (``/proc/cpuinfo``) that change how fast the numeric and hashing code runs:
#: SIMD widths used by numpy / torch / BLAKE3, and the bfloat16 / VNNI / AMX extensions.
SPEED_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
               "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve")


def _cpuinfo() -> tuple[str, set[str]]:
    """CPU model name and the flags of the first processor (``unknown``, empty if unreadable)."""
    model, flags = "unknown", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86, arm64
            flags = set(value.split())
        if model != "unknown" and flags:
            break
    return model, flags


def _meminfo_kib(*keys: str) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                found[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return found


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _date_utc() -> str:
    try:
        return subprocess.run(["date", "-u"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions(libraries: Iterable[str]) -> dict[str, str]:
    """Installed version of each distribution, ``"absent"`` when it is not installed."""
    out = {}
    for name in libraries:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def describe(libraries: Iterable[str] = ("crdt-model-merge", "numpy", "torch", "blake3")
             ) -> dict[str, Any]:
    """The machine, now: CPU, memory, kernel, Python, library versions, load, date.

    Keys: ``nproc`` (``os.cpu_count()``), ``cpus_usable`` (CPUs this process may run on),
    ``cpu`` (model name), ``arch``, ``cpu_flags`` (each of :data:`SPEED_FLAGS`: present or
    not), ``avx2`` and ``avx512f`` (the same, at the top for a quick look), ``ram_gib``
    (MemTotal, GiB, one decimal), ``ram`` (the same as text, ``"23.5 GiB"``),
    ``mem_available_gib`` (MemAvailable at the time), ``kernel``, ``python``, ``sqlite``,
    ``libraries`` (name -> version or ``"absent"``), ``loadavg_at_start`` (1, 5 and 15 minute
    load averages) and ``date`` (``date -u``).
    """
    cpu, flags = _cpuinfo()
    mem = _meminfo_kib("MemTotal", "MemAvailable")
    ram_gib = round(mem.get("MemTotal", 0) / 1024**2, 1)
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": usable,
        "cpu": cpu,
        "arch": platform.machine(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "cpu_flags": {flag: flag in flags for flag in SPEED_FLAGS},
        "ram_gib": ram_gib,
        "ram": f"{ram_gib:.1f} GiB",
        "mem_available_gib": round(mem.get("MemAvailable", 0) / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "libraries": versions(libraries),
        "loadavg_at_start": _loadavg(),
        "date": _date_utc(),
    }
