"""Server and client processes for the crash tests, each with its crash point armed when the
test wants it, run either as fresh programs or forked from a warm fork server.

    python tests/reliability/procs.py serve --crash-point P --armed-file F [--sabotage S] -- DIR ...
    python tests/reliability/procs.py cli --crash-point P --after N -- sync DIR URL
    python tests/reliability/procs.py forkserver

``serve`` runs the real server program (``server.__main__.main``, what ``crdt-merge serve``
runs): on SIGUSR1 it sets ``CRDT_MERGE_CRASH_AT=P`` (so the next time the server reaches
crash point P, :func:`crdt_merge.store.objects.crashpoint` SIGKILLs it) and creates the
file F. Until then it runs untouched, so a test can have it acknowledge a push first and
die in a later one. ``--sabotage`` breaks the object store's write ordering on purpose (to
show that the tests' checks catch a store that is not crash safe): ``in-place`` writes an
uploaded object straight under its final name (no temp file, no rename); ``index-first``
writes the index row before the file is durable and in place.

``cli`` runs the real command line (``crdt_merge.cli.main.main``) and sets
``CRDT_MERGE_CRASH_AT=P`` once N objects were stored in this process (counted as
:meth:`LocalStore.finish` returns, which every HTTP download ends in; N = 0 arms it from
the start, the same as running ``crdt-merge`` with the variable set). So the process can
die among pieces downloaded in parallel, some stored and others in flight.

``forkserver`` imports the server and the CLI once, then reads JSON requests, one a line,
and answers one JSON line each. ``{"op": "start", "kind": "serve"|"cli", "args": [...],
"stdout": path, "stderr": path, "env": {...}, "cwd": path}`` forks a child that runs
``serve``/``cli`` with those arguments (what follows the command name above) and answers
``{"pid"}``; ``{"op": "wait", "pid", "timeout"}`` answers ``{"pid", "returncode"}`` (a
negative signal number when it was killed; null if it still runs after ``timeout``).
Starting a server this way costs milliseconds instead of the seconds its imports take.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any


def _sabotage(name: str) -> None:
    from crdt_merge.hashing import PieceId
    from crdt_merge.store import local, objects

    if name == "in-place":
        original_init = objects.ObjectWriter.__init__

        def in_place_init(self: Any, files: Any, object_id: str, resumable: bool = False) -> None:
            original_init(self, files, object_id, resumable)
            if not resumable:
                os.close(self._fd)
                self.path.unlink()
                self.path = files.path(object_id)
                objects.make_parent(self.path)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

        objects.ObjectWriter.__init__ = in_place_init  # type: ignore[method-assign]
    elif name == "index-first":
        def finish(self: Any, writer: Any) -> tuple[PieceId, bool]:
            if self.index.has_objects([writer.object_id]):
                writer.discard()
                return PieceId(writer.object_id), False
            self.index.add_object(writer.object_id, writer.size)
            writer.commit()
            return PieceId(writer.object_id), True

        local.LocalStore.finish = finish  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown sabotage {name!r}")


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def serve(argv: list[str]) -> int:
    own, rest = _split(argv)
    p = argparse.ArgumentParser(prog="procs.py serve")
    p.add_argument("--crash-point")
    p.add_argument("--armed-file")
    p.add_argument("--sabotage")
    args = p.parse_args(own)
    os.environ.pop("CRDT_MERGE_CRASH_AT", None)
    if args.crash_point:
        def arm(signum: int, frame: object) -> None:
            os.environ["CRDT_MERGE_CRASH_AT"] = args.crash_point
            Path(args.armed_file).write_text(args.crash_point)

        signal.signal(signal.SIGUSR1, arm)
    if args.sabotage:
        _sabotage(args.sabotage)
    from crdt_merge_server.__main__ import main

    return main(rest)


def cli(argv: list[str]) -> int:
    own, rest = _split(argv)
    p = argparse.ArgumentParser(prog="procs.py cli")
    p.add_argument("--crash-point", required=True)
    p.add_argument("--after", type=int, default=0)
    args = p.parse_args(own)
    os.environ.pop("CRDT_MERGE_CRASH_AT", None)

    from crdt_merge.cli.main import main
    from crdt_merge.store.local import LocalStore

    original = LocalStore.finish
    lock = threading.Lock()
    stored = 0

    def counting_finish(self: Any, writer: Any) -> Any:
        nonlocal stored
        out = original(self, writer)
        with lock:
            stored += out[1]
            if stored >= args.after:
                os.environ["CRDT_MERGE_CRASH_AT"] = args.crash_point
        return out

    LocalStore.finish = counting_finish  # type: ignore[method-assign]
    if args.after <= 0:
        os.environ["CRDT_MERGE_CRASH_AT"] = args.crash_point
    return main(rest)


COMMANDS = {"serve": serve, "cli": cli}


def _child(request: dict[str, Any]) -> None:
    """The forked child: redirect, run the command, and exit (never returns)."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = COMMANDS[request["kind"]](list(request["args"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def forkserver() -> None:
    import crdt_merge.cli.main  # noqa: F401  (imported once here, inherited by each child)
    import crdt_merge_server.__main__  # noqa: F401

    reply = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            reply.flush()
            pid = os.fork()
            if pid == 0:
                reply.close()  # the child answers nothing: only this process holds the pipe
                _child(request)
            answer: dict[str, Any] = {"pid": pid}
        elif request["op"] == "wait":
            answer = {"pid": request["pid"],
                      "returncode": _wait(request["pid"], request.get("timeout", 60))}
        else:
            answer = {"error": f"unknown op {request['op']!r}"}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "forkserver":
        forkserver()
    else:
        sys.exit(COMMANDS[command](sys.argv[2:]))
