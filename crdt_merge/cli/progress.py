"""Progress bars on a terminal: bytes, rate and ETA (tqdm), on stderr.

Bars appear only when stderr is a terminal and ``--json`` is off (:func:`enable`); else
every function here is a no-op, so scripts and pipes see nothing extra.

The engine's long steps (import, resolve) have no callbacks: a bar measures them from the
outside, by the bytes this process reads or writes (``rchar``/``wchar`` of
``/proc/self/io``, every ``read``/``pwrite`` the store and resolve make), sampled by a
thread, against the bytes the step will move (the model's files; the output's tensors).
Where ``/proc/self/io`` does not exist, the bar shows elapsed time only.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_enabled = False


def enable(on: bool) -> None:
    """Show bars from now on when ``on`` and stderr is a terminal."""
    global _enabled
    _enabled = bool(on) and sys.stderr.isatty()


def enabled() -> bool:
    return _enabled


def _width() -> int:
    """The terminal's width (80 when it reports none, as a fresh pty does)."""
    return shutil.get_terminal_size((80, 24)).columns or 80


def _rows() -> int:
    """The terminal's height (24 when it reports none: tqdm would then hide every bar)."""
    return shutil.get_terminal_size((80, 24)).lines or 24


def _io_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == field:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


@contextmanager
def meter(label: str, total: int | None, counter: str = "rchar") -> Iterator[None]:
    """A bar for one step, fed from this process's I/O counter ``counter`` (``rchar`` for
    bytes read, ``wchar`` for bytes written) while the ``with`` body runs."""
    if not _enabled:
        yield
        return
    from tqdm import tqdm

    start = _io_bytes(counter)
    bar = tqdm(total=total or None, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
               file=sys.stderr, leave=True, ncols=_width(),
               nrows=_rows())
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            now = _io_bytes(counter)
            if now is not None and start is not None:
                done = now - start
                if total:
                    done = min(done, total)
                bar.update(done - bar.n)

    thread = threading.Thread(target=sample, name="crdt-merge-progress", daemon=True)
    thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        thread.join()
        if ok and total:
            bar.update(total - bar.n)
        bar.close()


def files_size(path: str) -> int | None:
    """The bytes of a model folder's or file's weights (an import reads each once)."""
    p = Path(path)
    try:
        if p.is_file():
            return p.stat().st_size
        if p.is_dir():
            return sum(f.stat().st_size for f in p.glob("*.safetensors"))
    except OSError:
        return None
    return None


class SyncBars:
    """The ``progress(stage, done, total)`` callback of a sync: one bar per stage counting
    objects, with the bytes moved in that stage and their rate in the bar's postfix
    (``12.0 MiB, 3.1 MiB/s``). Bytes are this process's reads (``rchar``: a download's
    socket or a peer folder's files) for the stages that fetch, and its writes (``wchar``)
    for ``upload``."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._stage = ""
        self._counter = "rchar"
        self._start = (0, 0.0)
        # the counters and clock at the previous callback: a stage's first object moved
        # after them (a stage is first heard of when its first object is done)
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[dict[str, int], float]:
        return ({c: _io_bytes(c) or 0 for c in ("rchar", "wchar")}, time.monotonic())

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not _enabled:
            return
        from tqdm import tqdm

        now = self._sample()
        if stage != self._stage or self._bar is None:
            self.close()
            self._stage = stage
            self._counter = "wchar" if stage == "upload" else "rchar"
            self._start = (self._last[0][self._counter], self._last[1])
            self._bar = tqdm(total=total, desc=stage, unit="obj", file=sys.stderr,
                             ncols=_width(), nrows=_rows())
        self._last = now
        moved = now[0][self._counter] - self._start[0]
        elapsed = max(now[1] - self._start[1], 1e-3)
        self._bar.set_postfix_str(f"{human_size(moved)}, {human_size(moved / elapsed)}/s",
                                  refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "b": 1,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, *, count: bool = False) -> int:
    """A size as people write it: ``5GB``, ``5G``, ``5 GiB``, ``500M``, ``1e9`` or bytes.

    Decimal units (K, M, G, T; KB, MB...) are powers of 1000, binary ones (KiB, MiB...)
    of 1024. With ``count`` (a number of parameters, as mergekit's ``--out-shard-size``)
    ``B`` alone means billions (``5B``); else it means bytes.

    Raises:
        ValueError: anything else, or a size below one.
    """
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    if unit not in _UNITS:
        raise ValueError(f"{text!r}: write a size such as 5GB, 500MiB or 1e9")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"{text!r}: write a size such as 5GB, 500MiB or 1e9") from None
    scale = 10**9 if count and unit == "b" else _UNITS[unit]
    size = int(value * scale)
    if size < 1:
        raise ValueError(f"{text!r}: a size must be at least 1")
    return size


Callback = Callable[[str, int, int], None]
