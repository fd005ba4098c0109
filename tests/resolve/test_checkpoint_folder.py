"""The independent verifier (tests/verifier/independent.py, no crdt_merge inside) recomputes
the checkpoint id and plan id of a resolved folder from its files alone; any changed byte of
a header, the card or the config changes the id, and crdt-merge's own checks say so."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from crdt_merge.cli.main import main
from crdt_merge.errors import PlanError
from crdt_merge.resolve import resolve, resolve_recorded
from crdt_merge.resolve.checkpoint import check_folder
from tests.resolve.test_resolve import anchor, contribute, sync_all
from tests.verifier import independent


@pytest.fixture
def resolved(replicas, models, tmp_path: Path):
    a, b, c = replicas
    contribute(a, models["ft0"], base=models["base"], weight="1")
    contribute(b, models["ft1"], base=models["base"], weight="1")
    a.set_recipe("task_arithmetic", {"lambda": "0.5"}, anchor=anchor(a, models["base"]))
    sync_all(a, b, c)
    return a, resolve(a, tmp_path / "out", workers=1)


@pytest.mark.parametrize("shard", [None, 4096])
def test_the_independent_verifier_recomputes_both_ids(replicas, models, tmp_path: Path,
                                                      shard: int | None) -> None:
    a, b, _ = replicas
    contribute(a, models["ft0"], base=models["base"], weight="1")
    contribute(b, models["ft1"], base=models["base"], weight="0.5")
    a.set_recipe("linear", {}, anchor=anchor(a, models["base"]))
    sync_all(a, b)
    kw = {} if shard is None else {"max_shard_size": shard}
    result = resolve(a, tmp_path / "out", workers=1, **kw)
    found = independent.verify(result.out)
    assert found["checkpoint_id"] == result.checkpoint_id == found["recorded_checkpoint_id"]
    assert found["plan_id"] == result.plan_id == found["recorded_plan_id"]
    assert found["layout_problems"] == []
    names = {p.name for p in result.out.iterdir()}
    covered = set(found["manifest"]["files"]) | set(found["manifest"]["meta"]["safetensors"])
    assert covered == names - {"merge_manifest.json"}  # every other file is in the id
    assert {"README.md", "config.json", "tokenizer_config.json"} <= covered
    if shard is not None:
        assert "model.safetensors.index.json" in covered and len(found["manifest"]["meta"]["safetensors"]) > 1
    # the receipt's manifest is the checkpoint manifest
    record = json.loads((result.out / "merge_manifest.json").read_text())
    assert record["manifest"] == found["manifest"]


def _flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    i = data.index(b'{"format":"pt"}', 8, 8 + n)
    data[i + 11:i + 13] = b"tf"  # a header every loader still reads, the same tensors
    path.write_bytes(bytes(data))


def _append_card(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\nThis model is safe.\n")


def _edit_config(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b'"hidden_size": 16', b'"hidden_size": 17'))


@pytest.mark.parametrize("tamper", [
    ("model.safetensors", _flip_header_byte),
    ("README.md", _append_card),
    ("config.json", _edit_config),
])
def test_a_changed_header_card_or_config_byte_changes_the_id(resolved, tmp_path: Path,
                                                             tamper, capsys) -> None:
    replica, result = resolved
    name, change = tamper
    before = independent.verify(result.out)["checkpoint_id"]
    assert check_folder(result.out).ok
    assert main(["verify-folder", str(result.out), "--expect", result.checkpoint_id]) == 0
    change(result.out / name)
    after = independent.verify(result.out)["checkpoint_id"]
    assert after != before
    check = check_folder(result.out)
    assert check.checkpoint_id == after and not check.ok
    assert any(name in p for p in check.problems), check.problems
    capsys.readouterr()
    assert main(["verify-folder", str(result.out), "--expect", result.checkpoint_id]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    # resolve --plan looks at the user's files, not only at the record
    with pytest.raises(PlanError, match=name.replace(".", r"\.")):
        resolve_recorded(replica, result.out / "merge_manifest.json", tmp_path / "again",
                         workers=1)
    # and the re-derived copy it wrote is the recorded checkpoint
    assert check_folder(tmp_path / "again", expect=result.checkpoint_id).ok


def test_an_added_file_changes_the_id_and_a_folder_without_a_receipt(resolved, tmp_path, capsys) -> None:
    _, result = resolved
    (result.out / "notes.txt").write_bytes(b"extra")
    assert independent.verify(result.out)["checkpoint_id"] != result.checkpoint_id
    assert not check_folder(result.out).ok
    (result.out / "notes.txt").unlink()
    (result.out / "merge_manifest.json").unlink()
    # without a receipt, --expect finds the profile's piece size (the test profile's here)
    capsys.readouterr()
    assert main(["verify-folder", str(result.out), "--expect", result.checkpoint_id]) == 0
    assert "4096-byte pieces (profile test)" in capsys.readouterr().out
    assert main(["verify-folder", str(result.out), "--expect", "ab" * 32]) == 1
    shown = capsys.readouterr().out
    assert "MISMATCH" in shown and "--piece-size" in shown
    # without --expect either: v1's piece size is taken, and the output says so
    assert main(["verify-folder", str(result.out)]) == 0
    shown = capsys.readouterr().out
    assert "16777216-byte pieces (profile v1)" in shown and "--piece-size" in shown
    assert result.checkpoint_id not in shown  # a test-profile checkpoint: another id
    piece = "4096"  # given, it is used as is
    capsys.readouterr()
    assert main(["verify-folder", str(result.out), "--piece-size", piece,
                 "--expect", result.checkpoint_id]) == 0
    capsys.readouterr()
    assert main(["--json", "verify-folder", str(result.out), "--piece-size", piece]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint_id"] == result.checkpoint_id


def test_bytes_after_the_tensors_or_a_sub_folder_are_refused(resolved) -> None:
    _, result = resolved
    with open(result.out / "model.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(PlanError, match="after the last tensor"):
        check_folder(result.out)
    (result.out / "model.safetensors").write_bytes(
        (result.out / "model.safetensors").read_bytes()[:-8])
    (result.out / "sub").mkdir()
    with pytest.raises(PlanError, match="not a plain file"):
        check_folder(result.out)
