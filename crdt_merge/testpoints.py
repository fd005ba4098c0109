"""Pause points for the CLI's interrupt tests (test-only; never set them in production).

A test that must send Ctrl-C to a command at a known step (half-way through an import,
while a resolve writes its output, between two pieces of a sync download) sets::

    CRDT_MERGE_TEST_PAUSE=POINT:MARKER_FILE

and runs ``crdt-merge``. The first time the process's *main thread* reaches the named
point, it writes ``MARKER_FILE`` (its pid) and sleeps; the test waits for the file and
sends a real SIGINT, which the sleep turns into the KeyboardInterrupt the command would
get at that step. Without a signal the sleep ends after :data:`PAUSE_SECONDS` and the
command carries on, so a broken test cannot hang.

The points (``pause("...")`` in the code): ``import.batch`` (the importer stored a batch of
pieces and is about to hash the next), ``piece.mid_stream`` (an object's bytes are in its
temp file, not yet renamed into place), ``op.before_commit`` (inside the transaction that
commits an op), ``resolve.job`` (a resolve wrote one output tensor of several; ``verify``
resolves through it too) and ``sync.pieces`` (a sync stored one piece of several).

Who can arm it: only :func:`arm`, which the ``crdt-merge`` console program
(:func:`crdt_merge.cli.main.run`) calls with the environment variable at start-up. Library
callers, the server (which never calls :func:`arm`, whatever its environment) and ops
(data, which name no code) cannot. Unarmed, :func:`pause` is one global compare.
"""

from __future__ import annotations

import os
import threading
import time

#: the environment variable the CLI reads at start-up (test-only)
ENV = "CRDT_MERGE_TEST_PAUSE"
#: how long a reached point sleeps when no signal comes
PAUSE_SECONDS = 120.0

_armed: tuple[str, str] | None = None


def arm(spec: str | None) -> None:
    """Arm one point from ``POINT:MARKER_FILE`` (None or empty: disarm)."""
    global _armed
    if not spec:
        _armed = None
        return
    point, sep, marker = spec.partition(":")
    if not sep or not point or not marker:
        raise ValueError(f"{ENV} must be POINT:MARKER_FILE, got {spec!r}")
    _armed = (point, marker)


def pause(point: str) -> None:
    """Pause here when armed for ``point`` and on the main thread (once per process)."""
    if _armed is None:
        return
    _reached(point)


def _reached(point: str) -> None:
    global _armed
    armed = _armed
    if armed is None or armed[0] != point or threading.current_thread() is not threading.main_thread():
        return
    _armed = None  # once: the rest of the run goes on as usual
    marker = armed[1]
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {point}\n")
    os.replace(tmp, marker)  # the test sees the whole file or none
    # short sleeps: the kernel may deliver the SIGINT to another thread (an importer's or
    # a progress bar's), which does not wake a long sleep of this one; between two short
    # ones the interpreter runs its pending handler and raises KeyboardInterrupt here
    deadline = time.monotonic() + PAUSE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)
