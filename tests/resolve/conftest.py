"""Small models written straight to safetensors, and replicas to merge them in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from crdt_merge.replica import Replica

SHAPES = {
    "model.embed_tokens.weight": (64, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (40, 16),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.mlp.up_proj.weight": (40, 16),
    "model.norm.weight": (16,),
    "lm_head.weight": (64, 16),
}
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
          "hidden_size": 16, "torch_dtype": "float32"}


def tensors(seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0,
            base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        if base is not None:
            t = base[name].to(torch.float64) + t
        out[name] = t.to(dtype)
    return out


def write_model(folder: Path, ts: dict[str, torch.Tensor], config: dict | None = None,
                tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ts.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    if tokenizer:
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return folder


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A base and three fine-tunes (base + small seeded updates), float32."""
    base = tensors(0)
    out = {"base": write_model(tmp_path / "base", base)}
    for i in range(3):
        out[f"ft{i}"] = write_model(tmp_path / f"ft{i}", tensors(10 + i, scale=0.05, base=base))
    return out


@pytest.fixture
def replicas(tmp_path: Path) -> tuple[Replica, Replica, Replica]:
    """Three admitted replicas of one project (test profile: 4 KiB pieces), in sync."""
    from crdt_merge.sync import LocalPeer, sync

    a = Replica.create(tmp_path / "a", site="alpha", profile="test")
    b = Replica.join(tmp_path / "b", site="beta", genesis=a.genesis_bytes())
    c = Replica.join(tmp_path / "c", site="gamma", genesis=a.genesis_bytes())
    a.admit("beta", b.public_key)
    a.admit("gamma", c.public_key)
    sync(b, LocalPeer(a))
    sync(c, LocalPeer(a))
    yield a, b, c
    for r in (a, b, c):
        r.close()
