"""The CLI as a person uses it: JSON out, one clear line and a non-zero exit on mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crdt_merge.cli.commands import parse_value
from crdt_merge.cli.main import main
from tests.resolve.conftest import tensors, write_model


def cli(capsys, *args: str) -> tuple[int, dict]:
    code = main(["--json", *args])
    captured = capsys.readouterr()
    out = captured.out if captured.out.strip() else captured.err
    return code, json.loads(out) if out.strip() else {}


def test_cli_project_flow(tmp_path: Path, capsys, models) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli(capsys, "init", a, "--site", "alpha", "--profile", "test")[0] == 0
    code, joined = cli(capsys, "init", b, "--site", "beta", "--join", a)
    assert code == 0 and len(joined["public_key"]) == 64
    # beta is not admitted yet: contributing fails cleanly and stores nothing
    code, err = cli(capsys, "contribute", b, str(models["ft1"]))
    assert code == 2 and err["error"] == "unknown_site"
    assert cli(capsys, "admit", a, "beta", joined["public_key"])[0] == 0
    assert cli(capsys, "sync", b, a)[0] == 0
    code, c1 = cli(capsys, "contribute", a, str(models["ft0"]), "--base", str(models["base"]),
                   "--weight", "0.50")
    assert code == 0 and len(c1["op_id"]) == 64
    code, c2 = cli(capsys, "contribute", b, str(models["ft1"]), "--base", str(models["base"]),
                   "--weight", "0.5", "--param", "density=1")
    assert code == 0
    code, rec = cli(capsys, "recipe", b, "--method", "task_arithmetic", "--param", "lambda=1.0",
                    "--anchor", str(models["base"]))
    assert code == 0 and rec["params"] == {"lambda": "1"}
    assert cli(capsys, "sync", a, b)[0] == 0
    sa, sb = cli(capsys, "status", a)[1], cli(capsys, "status", b)[1]
    assert sa["state_root"] == sb["state_root"] and sa["ops"] == 5
    assert sa["recipe"]["method"] == "task_arithmetic" and sa["conflicts"] == []
    assert {c["params"]["weight"] for c in sa["contributions"]} == {"0.5"}
    code, plan = cli(capsys, "plan", a)
    assert code == 0 and len(plan["contributions"]) == 2
    ra = cli(capsys, "resolve", a, "--out", str(tmp_path / "oa"), "--workers", "1")[1]
    rb = cli(capsys, "resolve", b, "--out", str(tmp_path / "ob"), "--workers", "2")[1]
    assert ra["checkpoint_id"] == rb["checkpoint_id"] and ra["plan_id"] == plan["plan_id"]
    code, verdict = cli(capsys, "verify", a, b)
    assert code == 0 and verdict["ok"]
    # a retract at one side makes the other side diverge until it syncs
    assert cli(capsys, "retract", b, c2["op_id"])[0] == 0
    code, verdict = cli(capsys, "verify", a, b)
    assert code == 1 and "diverged" in verdict["verdicts"][b]
    assert cli(capsys, "sync", a, b)[0] == 0
    assert cli(capsys, "verify", a, b)[0] == 0
    assert cli(capsys, "fsck", a)[1]["ok"]
    assert cli(capsys, "gc", a)[1]["deleted"] >= 0


def test_concurrent_recipes_are_reported_as_conflict(tmp_path: Path, capsys, models) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cli(capsys, "init", a, "--site", "alpha", "--profile", "test")
    key = cli(capsys, "init", b, "--site", "beta", "--join", a)[1]["public_key"]
    cli(capsys, "admit", a, "beta", key, "--role", "admin")
    cli(capsys, "sync", b, a)
    cli(capsys, "recipe", a, "--method", "linear")
    cli(capsys, "recipe", b, "--method", "linear", "--param", "normalize=false")
    cli(capsys, "sync", a, b)
    sa, sb = cli(capsys, "status", a)[1], cli(capsys, "status", b)[1]
    assert sa["recipe"] == sb["recipe"] and len(sa["conflicts"]) == 1
    cli(capsys, "recipe", a, "--method", "linear")
    assert cli(capsys, "status", a)[1]["conflicts"] == []


@pytest.mark.parametrize("args, code_name", [
    (["recipe", "{a}", "--method", "no_such_method"], "unknown_method"),
    (["recipe", "{a}", "--method", "linear", "--param", "normalize=maybe"], "bad_parameter"),
    (["recipe", "{a}", "--method", "linear", "--param", "novalue"], "bad_parameter"),
    (["contribute", "{a}", "{tmp}/absent"], "bad_model"),
    (["contribute", "{a}", "{bad}"], "bad_model"),
    (["contribute", "{a}", "{good}", "--delta"], "bad_parameter"),
    (["retract", "{a}", "f" * 64], "op_missing"),
    (["retract", "{a}", "xyz"], "bad_id"),
    (["status", "{tmp}/not-a-replica"], "not_a_replica"),
    (["init", "{a}", "--site", "again"], "replica_exists"),
])
def test_mistakes_give_one_line_and_change_nothing(tmp_path: Path, capsys, args, code_name) -> None:
    a = str(tmp_path / "a")
    assert main(["init", a, "--site", "alpha", "--profile", "test"]) == 0
    good = write_model(tmp_path / "good", tensors(1))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((good / "model.safetensors").read_bytes()[:100])
    capsys.readouterr()
    before = cli(capsys, "status", a)[1]
    filled = [x.format(a=a, tmp=tmp_path, bad=bad, good=good) for x in args]
    code = main(filled)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"crdt-merge: {code_name}:"), err
    assert "Traceback" not in err
    after = cli(capsys, "status", a)[1]
    assert after["state_root"] == before["state_root"]


def test_parse_value_canonicalizes_numbers() -> None:
    assert parse_value("0.30") == "0.3"
    assert parse_value("1e-3") == "0.001"
    assert parse_value("TRUE") is True
    assert parse_value("[0, 0.50, 1]") == ["0", "0.5", "1"]
    assert parse_value("model.layers") == "model.layers"


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "crdt_merge", "--json", "init",
                           str(tmp_path / "r"), "--site", "s1"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["project"]) == 64
