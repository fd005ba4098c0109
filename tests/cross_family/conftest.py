"""Tiny models of several families and replicas that merge them across families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crdt_merge.replica import Replica
from crdt_merge.store.importer import import_model


@pytest.fixture(scope="session")
def family_models(tiny_models) -> dict[str, Path]:
    """A llama anchor and donors of other families, widths and depths."""
    return {
        "llama": tiny_models.get("llama", seed=0),
        "gpt2": tiny_models.get("gpt2", seed=1),
        "qwen2": tiny_models.get("qwen2", seed=2, num_hidden_layers=3, hidden_size=48,
                                 intermediate_size=80, num_attention_heads=6,
                                 num_key_value_heads=3),
        "gemma3": tiny_models.get("gemma3", seed=3),
    }


def add(replica: Replica, folder: Path, **params: str):
    """Contribute ``folder`` as a full donor; returns the op."""
    imported = import_model(replica.store, str(folder), replica.piece_size)
    return replica.contribute(imported.manifest_id, params=params, label=folder.name)


def manifest(replica: Replica, folder: Path) -> str:
    return import_model(replica.store, str(folder), replica.piece_size).manifest_id


def read(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def rotated_copy(source: Path, target: Path, seed: int = 5) -> Path:
    """``source`` with every 2-D matrix rotated on both sides (float64): the same spectra
    in other coordinates. Embeddings and 1-D tensors are copied as they are."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, target / f.name)
    out = {}
    for i, (name, t) in enumerate(sorted(read(source).items())):
        t = t.to(torch.float64)
        if t.dim() == 2 and "embed" not in name and "lm_head" not in name:
            gen = torch.Generator().manual_seed(seed + i)
            left, _ = torch.linalg.qr(torch.randn(t.shape[0], t.shape[0], generator=gen,
                                                  dtype=torch.float64))
            right, _ = torch.linalg.qr(torch.randn(t.shape[1], t.shape[1], generator=gen,
                                                   dtype=torch.float64))
            t = left @ t @ right.T
        out[name] = t.contiguous()
    save_file(out, str(target / "model.safetensors"))
    return target


@pytest.fixture
def replica(tmp_path: Path):
    r = Replica.create(tmp_path / "rep", site="alpha", profile="test")
    yield r
    r.close()
