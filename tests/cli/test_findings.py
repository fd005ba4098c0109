"""Issue 14, one test per finding: what a new user following the README tripped over.

Each test drives the real CLI (``main``) on real replicas and tiny models."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from crdt_merge.cli.commands import expand_op_id
from crdt_merge.cli.main import _parser, main
from crdt_merge.cli.progress import parse_size
from crdt_merge.cli.render import short_ids
from crdt_merge.errors import AmbiguousId, BadId, OpMissing
from crdt_merge.replica import Replica
from tests.resolve.conftest import tensors, write_model


def run(capsys, *args: str) -> tuple[int, dict, str]:
    """``main(["--json", *args])``: exit code, the JSON payload (or error), stderr."""
    code = main(["--json", *args])
    out = capsys.readouterr()
    text = out.out if out.out.strip() else ""
    payload = json.loads(text) if text else {}
    if not payload and out.err.strip().startswith("{"):
        payload = json.loads(out.err.strip().splitlines()[-1])
    return code, payload, out.err


def ops(capsys, replica: str) -> int:
    return run(capsys, "status", replica)[1]["ops"]


@pytest.fixture
def project(tmp_path: Path, capsys, models) -> dict[str, str]:
    a = str(tmp_path / "a")
    assert main(["init", a, "--site", "alpha", "--profile", "test"]) == 0
    capsys.readouterr()
    return {"a": a, **{k: str(v) for k, v in models.items()}}


def test_a_weight_no_method_accepts_is_refused_before_writing(project, capsys) -> None:
    a = project["a"]
    code, err, _ = run(capsys, "contribute", a, project["ft0"], "--weight", "abc")
    assert code == 2 and err["error"] == "bad_parameter" and "weight" in err["detail"]
    assert "--force" in err["detail"]
    assert ops(capsys, a) == 1
    code, done, _ = run(capsys, "contribute", a, project["ft0"], "--weight", "abc", "--force")
    assert code == 0 and ops(capsys, a) == 2


def test_a_contribution_the_recipe_would_exclude_is_refused(project, capsys) -> None:
    a = project["a"]
    assert run(capsys, "recipe", a, "--method", "linear")[0] == 0
    code, err, _ = run(capsys, "contribute", a, project["ft0"])  # linear needs a weight
    assert code == 2 and "weight" in err["detail"] and "is required" in err["detail"]
    assert "--force" in err["detail"]
    assert ops(capsys, a) == 2
    assert run(capsys, "contribute", a, project["ft0"], "--weight", "1")[0] == 0


def test_setting_a_recipe_that_would_exclude_contributions_is_refused(project, capsys) -> None:
    a = project["a"]
    run(capsys, "contribute", a, project["ft0"], "--base", project["base"])  # no weight
    code, err, _ = run(capsys, "recipe", a, "--method", "linear")
    assert code == 2 and err["error"] == "plan_error"
    assert "excluded" in err["detail"] and "weight" in err["detail"] and "ft0" in err["detail"]
    assert ops(capsys, a) == 2
    assert run(capsys, "recipe", a, "--method", "linear", "--force")[0] == 0
    assert ops(capsys, a) == 3


def test_slerp_after_the_tutorial_ignores_weight_and_says_so(project, capsys) -> None:
    a = project["a"]
    code, c, _ = run(capsys, "contribute", a, project["ft0"], "--base", project["base"],
                     "--weight", "0.5")
    assert code == 0
    code, rec, _ = run(capsys, "recipe", a, "--method", "slerp", "--param", "t=0.3",
                       "--anchor", project["base"])
    assert code == 0, rec
    code, plan, _ = run(capsys, "plan", a)
    assert code == 0 and [x["op_id"] for x in plan["contributions"]] == [c["op_id"]]
    assert plan["contributions"][0]["params"] == {}
    notes = [d for d in plan["decisions"] if d["decision"] == "params_ignored"]
    assert len(notes) == 1 and "weight" in notes[0]["detail"]
    # a second contribution: slerp takes one donor, so the plan would fail: refused
    code, err, _ = run(capsys, "contribute", a, project["ft1"], "--base", project["base"])
    assert code == 2 and "exactly 1" in err["detail"]


def test_resolve_prints_each_exclusion_with_the_op_prefix(project, capsys, tmp_path) -> None:
    a = project["a"]
    run(capsys, "recipe", a, "--method", "linear")
    good = run(capsys, "contribute", a, project["ft0"], "--weight", "0.5")[1]
    bad = run(capsys, "contribute", a, project["ft1"], "--weight", "abc", "--force")[1]
    assert good["op_id"] and bad["op_id"]
    code = main(["resolve", a, "--out", str(tmp_path / "o")])
    out = capsys.readouterr()
    assert code == 0
    line = [x for x in out.err.splitlines() if "excluded" in x]
    assert len(line) == 1 and bad["op_id"][:12] in line[0] and "ft1" in line[0]
    assert "weight" in line[0]
    assert "1 contribution(s) excluded" in out.out


def test_no_live_contribution_error_lists_every_exclusion(project, capsys) -> None:
    a = project["a"]
    run(capsys, "recipe", a, "--method", "linear")
    bad = [run(capsys, "contribute", a, project[m], "--force")[1]["op_id"] for m in ("ft0", "ft1")]
    code, err, _ = run(capsys, "plan", a)
    assert code == 2 and "no live contribution" in err["detail"]
    for op_id in bad:
        assert op_id[:12] in err["detail"]
    assert err["detail"].count("is required") == 2 and "alpha" in err["detail"]


def test_retract_of_another_sites_op_is_refused(tmp_path, capsys, models) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    main(["init", a, "--site", "alpha", "--profile", "test"])
    capsys.readouterr()
    key = run(capsys, "init", b, "--site", "beta", "--join", a)[1]["public_key"]
    run(capsys, "admit", a, "beta", key)
    run(capsys, "sync", b, a)
    op = run(capsys, "contribute", a, str(models["ft0"]), "--weight", "1")[1]["op_id"]
    run(capsys, "sync", b, a)
    before = ops(capsys, b)
    code, err, _ = run(capsys, "retract", b, op)
    assert code != 0 and err["error"] == "not_authorized" and "alpha" in err["detail"]
    assert ops(capsys, b) == before


def test_status_prefixes_are_unique_and_every_command_takes_them(project, capsys) -> None:
    a = project["a"]
    op = run(capsys, "contribute", a, project["ft0"], "--weight", "1")[1]["op_id"]
    main(["status", a])
    text = capsys.readouterr().out
    with Replica.open(a) as r:
        prefix = short_ids(r.op_ids())[op]
    assert re.search(rf"\b{prefix}\b", text) and op not in text
    assert "fate" not in text and "-> live (no plan yet)" in text
    code, done, _ = run(capsys, "retract", a, prefix)
    assert code == 0 and done["targets"] == [op]
    status = run(capsys, "status", a)[1]
    assert status["contributions"][0]["fate"] == "retracted"


def test_an_ambiguous_prefix_is_an_error(tmp_path) -> None:
    with Replica.create(tmp_path / "r", site="s", profile="test") as r:
        for k in range(17):  # 18 ops: two share a first hex digit (pigeonhole)
            r.set_recipe("linear", {"normalize": bool(k % 2)})
        ids = sorted(r.op_ids())
        pairs = [(x, y) for x, y in zip(ids, ids[1:], strict=False) if x[:4] == y[:4]]
        first = [(x, y) for x, y in zip(ids, ids[1:], strict=False) if x[0] == y[0]]
        assert first
        with pytest.raises(BadId):
            expand_op_id(r, first[0][0][:3])
        if pairs:
            with pytest.raises(AmbiguousId):
                expand_op_id(r, pairs[0][0][:4])
        absent = next(p for p in ("0" * 12, "f" * 12, "a" * 12)
                      if not any(i.startswith(p) for i in ids))
        with pytest.raises(OpMissing):
            expand_op_id(r, absent)
        short = short_ids(ids)
        assert all(expand_op_id(r, p) == i for i, p in short.items())
        assert len(set(short.values())) == len(ids)


def test_status_tells_each_fate_members_and_checkpoint(project, capsys, tmp_path) -> None:
    a = project["a"]
    run(capsys, "recipe", a, "--method", "linear")
    ok = run(capsys, "contribute", a, project["ft0"], "--weight", "1")[1]["op_id"]
    bad = run(capsys, "contribute", a, project["ft1"], "--force")[1]["op_id"]
    gone = run(capsys, "contribute", a, project["ft2"], "--weight", "1")[1]["op_id"]
    run(capsys, "retract", a, gone)
    s = run(capsys, "status", a)[1]
    fate = {c["op_id"]: c["fate"] for c in s["contributions"]}
    assert fate[ok] == "counted" and fate[gone] == "retracted"
    assert fate[bad].startswith("excluded:") and "weight" in fate[bad]
    assert [(m["site"], m["role"], m["state"]) for m in s["members"]] == [("alpha", "admin", "live")]
    assert s["checkpoint_id"] is None
    cid = run(capsys, "resolve", a, "--out", str(tmp_path / "o"))[1]["checkpoint_id"]
    assert run(capsys, "status", a)[1]["checkpoint_id"] == cid


def test_plan_prints_text_and_its_json_has_no_text_copy(project, capsys) -> None:
    a = project["a"]
    run(capsys, "recipe", a, "--method", "linear")
    run(capsys, "contribute", a, project["ft0"], "--weight", "1")
    assert main(["plan", a]) == 0
    text = capsys.readouterr().out
    assert text.startswith("plan ") and "method     linear" in text and "{" not in text
    code, plan, _ = run(capsys, "plan", a)
    assert code == 0 and "text" not in plan and plan["method"] == "linear"
    assert "text" not in run(capsys, "status", a)[1]


def test_version_and_help_for_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and re.match(r"crdt-merge \S+", capsys.readouterr().out)

    def walk(parser: argparse.ArgumentParser, where: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield where, action

    missing = [f"{w}: {a.option_strings or a.dest}" for w, a in walk(_parser(), "crdt-merge")
               if not a.help]
    assert missing == []


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("5GiB", 5 * 2**30), ("500M", 5 * 10**8),
                                        ("1e9", 10**9), ("4096", 4096), ("2 KiB", 2048)])
def test_human_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert parse_size("5B", count=True) == 5 * 10**9


def test_resolve_takes_a_human_shard_size(project, capsys, tmp_path) -> None:
    a = project["a"]
    run(capsys, "recipe", a, "--method", "linear")
    run(capsys, "contribute", a, project["ft0"], "--weight", "1")
    code, done, _ = run(capsys, "resolve", a, "--out", str(tmp_path / "o"), "--max-shard-size", "5GB")
    assert code == 0 and len(done["checkpoint_id"]) == 64
    code, err, _ = run(capsys, "resolve", a, "--out", str(tmp_path / "o"), "--max-shard-size", "lots")
    assert code == 2 and err["error"] == "bad_parameter"


def test_vocabulary_mismatch_is_never_silent(project, capsys, tmp_path) -> None:
    a = project["a"]
    big = dict(tensors(5))
    import torch
    big["model.embed_tokens.weight"] = torch.zeros(70, 16)
    other = write_model(tmp_path / "vocab70", big)
    run(capsys, "recipe", a, "--method", "linear")
    run(capsys, "contribute", a, project["ft0"], "--weight", "1")
    code, err, _ = run(capsys, "contribute", a, str(other), "--weight", "1")
    assert code == 2 and "shape" in err["detail"] and "--force" in err["detail"]
    run(capsys, "contribute", a, str(other), "--weight", "1", "--force")
    code = main(["resolve", a, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    # which of the two is excluded follows the plan's canonical order (the first by op id
    # is the shape reference); either way resolve says so in plain text
    assert code == 0 and "excluded" in err and "embed_tokens" in err
    assert "vocab70" in err or "ft0" in err
