"""The order of fsync, rename and directory fsync in every write path, recorded call by call.

A crash test cannot see a rename made before the file's fsync (SIGKILL leaves the page cache
to the kernel, which writes it anyway); only a power cut would. So these tests record the
calls themselves: every object's bytes are fsynced before the rename that makes them
visible, the directory is fsynced after the rename, and only then is the object indexed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from crdt_merge.hashing import digest
from crdt_merge.replica import Replica


class Calls:
    """os.open / os.fsync / os.replace / os.rename and index inserts, in call order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, ...]] = []
        self.fds: dict[int, str] = {}
        self.lock = threading.Lock()
        real_open, real_fsync = os.open, os.fsync
        real_replace, real_rename = os.replace, os.rename

        def opened(path, flags, *args, **kw):
            fd = real_open(path, flags, *args, **kw)
            with self.lock:
                self.fds[fd] = str(Path(path).resolve())
            return fd

        def fsync(fd):
            with self.lock:
                self.events.append(("fsync", self.fds.get(fd, f"fd{fd}")))
            return real_fsync(fd)

        def replace(src, dst, *a, **kw):
            real_replace(src, dst, *a, **kw)
            with self.lock:
                self.events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))

        def rename(src, dst, *a, **kw):
            real_rename(src, dst, *a, **kw)
            with self.lock:
                self.events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))

        monkeypatch.setattr(os, "open", opened)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    def watch_index(self, monkeypatch: pytest.MonkeyPatch, index: object) -> None:
        for name in ("add_object", "add_objects"):
            real = getattr(index, name)

            def wrapped(*args, _real=real, _name=name):
                rows = args[0] if _name == "add_objects" else [args]
                rows = list(rows)
                with self.lock:
                    self.events.extend(("index", r[0]) for r in rows)
                return _real(rows) if _name == "add_objects" else _real(*args)
            monkeypatch.setattr(index, name, wrapped)

    def at(self, event: tuple[str, ...]) -> int:
        assert event in self.events, f"{event} never happened: {self.events}"
        return self.events.index(event)

    def renames_to(self, target: Path) -> tuple[int, str]:
        target = str(target.resolve())
        found = [(i, e[1]) for i, e in enumerate(self.events) if e[0] == "replace" and e[2] == target]
        assert len(found) == 1, f"{target}: {found}"
        return found[0]

    def last_fsync(self, path: str | Path) -> int:
        path = str(Path(path).resolve())
        hits = [i for i, e in enumerate(self.events) if e == ("fsync", path)]
        assert hits, f"{path} never fsynced: {self.events}"
        return hits[-1]


def check_object(calls: Calls, target: Path, object_id: str | None) -> None:
    """tmp fsynced, then renamed to ``target``, then target's directory fsynced, then indexed."""
    when, tmp = calls.renames_to(target)
    synced = [i for i, e in enumerate(calls.events) if e == ("fsync", tmp)]
    assert synced and synced[-1] < when, f"{target.name}: renamed before its bytes were fsynced"
    after = [i for i, e in enumerate(calls.events)
             if e == ("fsync", str(target.parent.resolve())) and i > when]
    assert after, f"{target.name}: its directory was not fsynced after the rename"
    if object_id is not None:
        assert calls.at(("index", object_id)) > after[0], "indexed before it was durable"


@pytest.fixture
def replica(tmp_path: Path):
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    yield r
    r.close()


def test_one_object(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    calls.watch_index(monkeypatch, replica.store.index)
    data = b"durable bytes" * 100
    pid = replica.store.put(data)
    check_object(calls, replica.store.files.path(pid), pid)


def test_a_streamed_and_a_resumable_object(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    calls.watch_index(monkeypatch, replica.store.index)
    data = os.urandom(10000)
    pid = replica.store.put_stream(digest(data), [data[:5000], data[5000:]])
    check_object(calls, replica.store.files.path(pid), pid)
    other = os.urandom(9000)
    writer = replica.store.writer(digest(other), resumable=True)
    writer.write(other)
    got, new = replica.store.finish(writer)
    assert new
    check_object(calls, replica.store.files.path(got), got)


def test_a_batch_of_objects(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    calls.watch_index(monkeypatch, replica.store.index)
    pieces = [os.urandom(300) for _ in range(24)]
    ids, new = replica.store.put_many(pieces)
    assert new == 24
    first_index = min(calls.at(("index", i)) for i in ids)
    for pid in ids:
        check_object(calls, replica.store.files.path(pid), pid)
        # the batch's directory fsync comes after every rename into that directory
        d = str(replica.store.files.path(pid).parent.resolve())
        renames = [i for i, e in enumerate(calls.events)
                   if e[0] == "replace" and str(Path(e[2]).parent) == d]
        assert calls.last_fsync(d) > max(renames)
        assert calls.last_fsync(d) < first_index


def test_the_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crdt_merge.resolve import resolve
    from tests.resolve.conftest import tensors, write_model
    from tests.resolve.test_resolve import anchor, contribute

    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    base = write_model(tmp_path / "base", tensors(0))
    contribute(r, write_model(tmp_path / "ft", tensors(1, scale=0.1)), base=base, weight="1")
    r.set_recipe("linear", {}, anchor=anchor(r, base))
    calls = Calls(monkeypatch)
    out = tmp_path / "out"
    resolve(r, out, workers=1)
    r.close()
    when, tmp = calls.renames_to(out)
    names = sorted(p.name for p in out.iterdir())
    assert "merge_manifest.json" in names and "README.md" in names
    for name in names:  # every file's bytes are durable before the folder appears
        assert calls.last_fsync(Path(tmp) / name) < when, name
    assert calls.last_fsync(tmp) < when  # the folder's entries too
    assert calls.last_fsync(out.parent) > when, "the rename itself was not made durable"


def test_the_op_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crdt_merge.cli.main import main

    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    r.close()
    calls = Calls(monkeypatch)
    out = tmp_path / "ops.bin"
    assert main(["ops", "export", str(tmp_path / "r"), "--out", str(out)]) == 0
    when, tmp = calls.renames_to(out)
    assert calls.last_fsync(tmp) < when < calls.last_fsync(tmp_path)


def test_the_gguf_export(tiny_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGUF beside a checkpoint folder, and the receipt it updates, are written
    fsync -> rename -> directory fsync, like every other output file."""
    import json
    import shutil

    from crdt_merge.formats.gguf import export_gguf

    folder = tmp_path / "out"
    shutil.copytree(tiny_models.get("llama"), folder)
    (folder / "merge_manifest.json").write_text(json.dumps({"checkpoint_id": "x"}))
    calls = Calls(monkeypatch)
    export_gguf(folder, tmp_path / "out.gguf", "f16", tokenizer=False)
    for target in (tmp_path / "out.gguf", folder / "merge_manifest.json"):
        when, tmp = calls.renames_to(target)
        assert calls.last_fsync(tmp) < when < calls.last_fsync(target.parent), target.name
