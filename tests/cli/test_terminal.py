"""The CLI as a terminal program: real processes, real signals, a real pseudo-terminal.

- Ctrl-C (SIGINT) at several points of an import and a resolve: "interrupted", exit 130,
  no traceback, and the replica still passes ``fsck``.
- A closed pipe (``| head``) ends quietly.
- Progress bars appear on a terminal (run under ``script``, which gives the command a pty)
  and not with ``--json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crdt_merge", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, **kw)


def big_model(folder: Path, mib: int, seed: int) -> Path:
    """A safetensors model of about ``mib`` MiB (float32), enough for an import to last."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = mib * 1024 * 1024 // 4 // 4
    save_file({f"model.layers.{i}.mlp.weight": rng.standard_normal(n, dtype=np.float32)
               for i in range(4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("terminal")
    # a fresh model for every interrupted contribute: a model already imported is found
    # again at once (content addressing), so a later Ctrl-C could only ever meet an exit
    return {"a": big_model(root / "a", 64, 1), "b": big_model(root / "b", 64, 2),
            **{f"c{i}": big_model(root / f"c{i}", 64, 10 + i) for i in range(4)}}


def interrupt(args: list[str], delay: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "crdt_merge", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ctrl_c_anywhere_ends_cleanly_and_keeps_the_replica(tmp_path, models) -> None:
    replica = str(tmp_path / "r")
    assert cli("init", replica, "--site", "alpha").returncode == 0
    interrupted = 0
    for i, delay in enumerate((0.3, 0.8, 1.5, 2.5)):  # loading, reading the model, writing
        target = str(models[f"c{i}"])
        done = interrupt(["contribute", replica, target, "--weight", "1"], delay)
        assert done.returncode in (0, 130), done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        if done.returncode == 130:
            interrupted += 1
            assert done.stderr.strip().endswith("crdt-merge: interrupted"), done.stderr
        fsck = cli("--json", "fsck", replica)
        assert fsck.returncode == 0 and json.loads(fsck.stdout)["ok"], fsck.stdout
    # on a quiet machine a 64 MiB import can end before the later signals: at least one
    # must meet a running command (every one of them ends cleanly, checked above)
    assert interrupted >= 1
    # the replica still works: contribute, recipe, then interrupt a resolve
    for m in ("a", "b"):
        cli("contribute", replica, str(models[m]), "--weight", "1")
    assert cli("recipe", replica, "--method", "linear").returncode == 0
    for delay in (0.3, 1.5):
        done = interrupt(["resolve", replica, "--out", str(tmp_path / "out"), "--workers", "1"],
                         delay)
        assert done.returncode in (0, 130) and "Traceback" not in done.stderr, done.stderr
        if done.returncode == 130:
            assert not (tmp_path / "out.partial").exists()
    assert cli("fsck", replica).returncode == 0
    final = cli("--json", "resolve", replica, "--out", str(tmp_path / "out"))
    assert final.returncode == 0, final.stderr


def test_a_closed_pipe_ends_quietly(tmp_path) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (as `| head` after a line)
    try:
        proc = subprocess.run([sys.executable, "-m", "crdt_merge", "families", "list"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
                              cwd=ROOT)
    finally:
        os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr
    assert "BrokenPipe" not in proc.stderr


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` is absent")
def test_progress_shows_on_a_terminal_and_not_with_json(tmp_path, models) -> None:
    replica = str(tmp_path / "r")
    assert cli("init", replica, "--site", "alpha").returncode == 0

    def on_tty(*args: str) -> str:
        command = " ".join([sys.executable, "-m", "crdt_merge", *args])
        proc = subprocess.run(["script", "-qefc", command, "/dev/null"], capture_output=True,
                              text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    shown = on_tty("contribute", replica, str(models["a"]), "--weight", "1")
    assert "import a:" in shown and "100%" in shown
    assert re.search(r"\d+(\.\d+)?M/\d+(\.\d+)?M", shown)  # bytes done / total
    assert re.search(r"\d+(\.\d+)?[kMG]?B/s", shown)  # a rate
    quiet = on_tty("--json", "contribute", replica, str(models["b"]), "--weight", "1")
    assert "import" not in quiet and "%" not in quiet
    assert json.loads(quiet[quiet.index("{"):])["op_id"]
    off_tty = cli("contribute", replica, str(models["b"]), "--weight", "1", "--label", "again")
    assert off_tty.returncode == 0 and "%" not in off_tty.stderr
