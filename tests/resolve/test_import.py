"""Import: safetensors files, folders, sharded checkpoints, the hub cache; bad files refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from crdt_merge.errors import ModelImportError
from crdt_merge.store.importer import import_model, read_file
from crdt_merge.store.manifests import piece_count
from crdt_merge.store.tensors import load_tensor
from tests.resolve.conftest import tensors, write_model


def _snapshot(replica) -> tuple:
    return (replica.state_root(), tuple(replica.store.object_ids()),
            tuple(sorted(p.name for p in (replica.path / "objects").rglob("*") if p.is_file())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_import_keeps_every_byte(replicas, tmp_path: Path, dtype: torch.dtype) -> None:
    a = replicas[0]
    ts = tensors(3, dtype=dtype)
    folder = write_model(tmp_path / "m", ts)
    imported = import_model(a.store, str(folder), a.piece_size)
    assert set(imported.manifest.tensors) == set(ts)
    for name, t in ts.items():
        rec = imported.manifest.tensors[name]
        assert len(rec.pieces) == piece_count(t.numel() * t.element_size(), a.piece_size)
        back = load_tensor(a.store, rec)
        assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    assert read_file(a.store, imported.manifest.files["config.json"]) == (folder / "config.json").read_bytes()
    assert "tokenizer_config.json" in imported.manifest.files
    assert a.get_manifest(imported.manifest_id) == imported.manifest


def test_reimport_stores_nothing_new(replicas, models) -> None:
    a = replicas[0]
    first = import_model(a.store, str(models["base"]), a.piece_size)
    assert first.new_pieces > 0
    before = a.store.object_ids()
    again = import_model(a.store, str(models["base"]), a.piece_size)
    assert again.manifest_id == first.manifest_id
    assert again.new_pieces == 0
    assert a.store.object_ids() == before
    # the bare file gives the same tensors (no config/tokenizer files)
    bare = import_model(a.store, str(models["base"] / "model.safetensors"), a.piece_size)
    assert bare.manifest.tensors == first.manifest.tensors and not bare.manifest.files


def test_sharded_checkpoint(replicas, tmp_path: Path) -> None:
    a = replicas[0]
    ts = tensors(4)
    names = sorted(ts)
    folder = tmp_path / "sharded"
    folder.mkdir()
    half = len(names) // 2
    save_file({k: ts[k] for k in names[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: ts[k] for k in names[half:]}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: ("model-00001-of-00002.safetensors" if i < half else
                      "model-00002-of-00002.safetensors") for i, k in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    sharded = import_model(a.store, str(folder), a.piece_size)
    single = import_model(a.store, str(write_model(tmp_path / "single", ts)), a.piece_size)
    assert sharded.manifest.tensors == single.manifest.tensors


def test_hub_cache_by_repo_id(replicas, tmp_path: Path, monkeypatch) -> None:
    a = replicas[0]
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("ab" * 20)
    write_model(snap, tensors(5))
    (cache / "models--acme--tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    imported = import_model(a.store, "acme/tiny", a.piece_size)
    direct = import_model(a.store, str(snap), a.piece_size)
    assert imported.manifest_id == direct.manifest_id
    pinned = import_model(a.store, "acme/tiny@" + "ab" * 20, a.piece_size)
    assert pinned.manifest_id == direct.manifest_id
    with pytest.raises(ModelImportError, match="not in the local Hugging Face cache"):
        import_model(a.store, "acme/absent", a.piece_size)


def _corrupt_variants(good: bytes) -> dict[str, bytes]:
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    bad_offsets = dict(header)
    bad_offsets[name] = dict(header[name], data_offsets=[0, 3])
    def with_header(h: dict) -> bytes:
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + good[8 + n:]
    return {
        "truncated": good[: len(good) // 2],
        "header_too_long": struct.pack("<Q", 10**9) + good[8:],
        "not_json": struct.pack("<Q", 4) + b"{{{{" + good[12:],
        "tiny": good[:5],
        "offsets_wrong": with_header(bad_offsets),
        "bad_dtype": with_header({**header, name: dict(header[name], dtype="Q7")}),
    }


@pytest.mark.parametrize("variant", ["truncated", "header_too_long", "not_json", "tiny",
                                     "offsets_wrong", "bad_dtype"])
def test_bad_safetensors_is_refused_and_changes_nothing(replicas, tmp_path: Path, variant: str) -> None:
    a = replicas[0]
    good_dir = write_model(tmp_path / "good", tensors(6))
    bad = tmp_path / f"{variant}.safetensors"
    bad.write_bytes(_corrupt_variants((good_dir / "model.safetensors").read_bytes())[variant])
    before = _snapshot(a)
    with pytest.raises(ModelImportError):
        import_model(a.store, str(bad), a.piece_size)
    assert _snapshot(a) == before


def test_missing_shard_and_non_safetensors(replicas, tmp_path: Path) -> None:
    a = replicas[0]
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ModelImportError, match="missing"):
        import_model(a.store, str(folder), a.piece_size)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelImportError, match="tensors only"):
        import_model(a.store, str(tmp_path / "weights.bin"), a.piece_size)
    (tmp_path / "weights.pt").write_bytes(b"\0" * 16)
    with pytest.raises(ModelImportError, match="only .safetensors"):
        import_model(a.store, str(tmp_path / "weights.pt"), a.piece_size)
    with pytest.raises(ModelImportError, match="no such file"):
        import_model(a.store, str(tmp_path / "nothing-here"), a.piece_size)
