"""PyTorch checkpoints in: `pytorch_model.bin` (single and sharded) import to the same pieces
and manifest id as the same weights in safetensors; a pickle that is not tensors is refused
without running it."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from crdt_merge.errors import ModelImportError
from crdt_merge.store.importer import import_model
from tests.resolve.conftest import CONFIG, tensors, write_model


def _bin_folder(folder: Path, ts: dict[str, torch.Tensor], shards: int = 1) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    names = sorted(ts)
    if shards == 1:
        torch.save(ts, folder / "pytorch_model.bin")
        return folder
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        shard = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: ts[n] for n in part}, folder / shard)
        weight_map.update({n: shard for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shards", [1, 3])
def test_bin_and_safetensors_give_one_manifest_id(replicas, tmp_path: Path, dtype, shards) -> None:
    a, b, _ = replicas
    ts = tensors(5, dtype=dtype)
    ts["model.layers.0.position_ids"] = torch.arange(7, dtype=torch.int64)
    st = write_model(tmp_path / "st", ts)
    binf = _bin_folder(tmp_path / "bin", ts, shards)
    from_st = import_model(a.store, str(st), a.piece_size)
    from_bin = import_model(b.store, str(binf), b.piece_size)
    assert from_bin.manifest_id == from_st.manifest_id
    assert from_bin.manifest == from_st.manifest
    assert from_bin.new_pieces == from_st.new_pieces > 0
    # importing the .bin into the replica that holds the safetensors writes nothing new
    again = import_model(a.store, str(binf), a.piece_size)
    assert again.manifest_id == from_st.manifest_id and again.new_pieces == 0


def test_bin_file_alone_and_views(replicas, tmp_path: Path) -> None:
    """A bare .bin file; tensors that are views of one storage (tied weights, a transposed
    slice) are stored as their own row-major bytes."""
    a = replicas[0]
    big = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    ts = {"w": big, "tied": big, "t": big.t(), "s": big[2:5, 1:4]}
    path = tmp_path / "weights.bin"
    torch.save(ts, path)
    from safetensors.torch import save_file
    save_file({k: v.contiguous().clone() for k, v in ts.items()}, str(tmp_path / "w.safetensors"))
    got = import_model(a.store, str(path), a.piece_size)
    want = import_model(a.store, str(tmp_path / "w.safetensors"), a.piece_size)
    assert got.manifest_id == want.manifest_id
    assert got.manifest.tensors["t"].shape == (6, 8)


def test_nonfinite_in_bin_is_recorded(replicas, tmp_path: Path) -> None:
    from crdt_merge.store.finite import first_nonfinite
    a = replicas[0]
    ts = tensors(2)
    ts["model.norm.weight"][3] = float("nan")
    got = import_model(a.store, str(_bin_folder(tmp_path / "m", ts)), a.piece_size)
    assert first_nonfinite(a.store, got.manifest_id) == "model.norm.weight"


class _Payload:
    """Unpickling this would create a file: the proof that a refused .bin never ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_bin_with_a_non_tensor_pickle_is_refused_unexecuted(replicas, tmp_path: Path) -> None:
    a = replicas[0]
    target = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    torch.save({"model.norm.weight": torch.ones(4), "x": _Payload(str(target))},
               folder / "pytorch_model.bin")
    before = a.store.object_ids()
    with pytest.raises(ModelImportError, match="tensors only"):
        import_model(a.store, str(folder), a.piece_size)
    assert not target.exists()
    assert a.store.object_ids() == before
    # a raw pickle (not torch's zip format) with the same payload: refused too
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps({"w": _Payload(str(target))}))
    with pytest.raises(ModelImportError):
        import_model(a.store, str(raw), a.piece_size)
    assert not target.exists()
    # control: the payload really is live when unpickled without weights_only
    pickle.loads(raw.read_bytes())
    assert target.exists()


@pytest.mark.parametrize("value", [[torch.ones(2)], {"a": 3}, {"a": {"b": torch.ones(2)}}, {}])
def test_bin_that_is_not_a_flat_state_dict_is_refused(replicas, tmp_path: Path, value) -> None:
    a = replicas[0]
    path = tmp_path / "odd.bin"
    torch.save(value, path)
    with pytest.raises(ModelImportError):
        import_model(a.store, str(path), a.piece_size)


def test_safetensors_win_over_bin_in_one_folder(replicas, tmp_path: Path) -> None:
    a = replicas[0]
    folder = write_model(tmp_path / "both", tensors(1))
    torch.save(tensors(2), folder / "pytorch_model.bin")
    got = import_model(a.store, str(folder), a.piece_size)
    want = import_model(a.store, str(folder / "model.safetensors"), a.piece_size)
    assert got.manifest.tensors == want.manifest.tensors
