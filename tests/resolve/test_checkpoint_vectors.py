"""crdt_merge against specs/vectors/checkpoint/checkpoint.json, written from
specs/checkpoint.md by an independent generator: the safetensors headers, shard names and
index resolve writes, the checkpoint manifest and id of a folder, the plan id."""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from crdt_merge import codec
from crdt_merge.resolve import MergePlan
from crdt_merge.resolve.checkpoint import checkpoint_manifest
from crdt_merge.resolve.output import prepare_files

HERE = Path(__file__).resolve().parents[2] / "specs" / "vectors" / "checkpoint"
VECTORS = json.loads((HERE / "checkpoint.json").read_text())


def fill_bytes(dtype: str, count: int, fill: dict) -> bytes:
    values = ([0] * count if fill["kind"] == "zeros" else [1] * count if fill["kind"] == "ones"
              else [(i % fill["mod"]) + fill["offset"] for i in range(count)])
    if dtype == "BF16":
        return b"".join(struct.pack("<f", float(x))[2:] for x in values)
    return struct.pack(f"<{count}{'f' if dtype == 'F32' else 'i'}", *values)


def test_the_generator_is_independent_and_reproduces_the_file(tmp_path: Path) -> None:
    tree = ast.parse((HERE / "make_vectors.py").read_text())
    imported = {(n.module or "") if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    assert {m.split(".")[0] for m in imported} <= {"__future__", "json", "struct", "sys",
                                                  "pathlib", "blake3"}
    subprocess.run([sys.executable, str(HERE / "make_vectors.py"), str(tmp_path)], check=True)
    assert (tmp_path / "checkpoint.json").read_bytes() == (HERE / "checkpoint.json").read_bytes()


@pytest.mark.parametrize("case", VECTORS["folders"], ids=lambda c: c["name"])
def test_resolve_writes_the_vector_files_and_measures_their_id(case: dict, tmp_path: Path) -> None:
    specs = [(t["name"], t["dtype"], tuple(t["shape"]))
             for f in case["safetensors"] for t in f["tensors"]]
    where = prepare_files(tmp_path, specs, case["max_shard_size"])
    for f in case["safetensors"]:
        for t in f["tensors"]:
            count = 1
            for d in t["shape"]:
                count *= d
            path, offset = where[t["name"]]
            assert Path(path).name == f["name"]
            with open(path, "r+b") as out:
                out.seek(offset)
                out.write(fill_bytes(t["dtype"], count, t["fill"]))
    for f in case["safetensors"]:
        data = (tmp_path / f["name"]).read_bytes()
        assert data[:len(f["header_hex"]) // 2].hex() == f["header_hex"], f["name"]
        assert len(data) == f["size"]
    for name, text in case["texts"].items():
        if name == "model.safetensors.index.json":  # resolve wrote it: compare
            assert (tmp_path / name).read_bytes() == text.encode()
        else:
            (tmp_path / name).write_bytes(text.encode())
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f["name"] for f in case["safetensors"]] + list(case["texts"]))
    manifest = checkpoint_manifest(tmp_path, VECTORS["piece_size"])
    assert manifest.to_wire() == case["manifest"]
    assert manifest.encode().hex() == case["manifest_hex"]
    assert manifest.id == case["checkpoint_id"]


@pytest.mark.parametrize("case", VECTORS["plans"], ids=lambda c: c["name"])
def test_the_plan_wire_form_and_id(case: dict) -> None:
    plan = MergePlan.from_wire(case["plan"])
    assert plan.to_wire() == case["plan"]
    assert codec.encode(plan.to_wire()).hex() == case["hex"]
    assert plan.id == case["plan_id"]
