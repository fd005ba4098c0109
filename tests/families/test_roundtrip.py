"""Gate G1 on tiny models of every supported family: native -> canonical -> native is
lossless, and the rebuilt folder loads in transformers and computes the same outputs."""

from __future__ import annotations

import json

import pytest
import torch

from crdt_merge.families import check, list_families
from tests.families.g1 import outputs, rebuild
from tests.fixtures.tiny_models import FAMILIES, VARIANTS

REQUIRED = {
    "llama", "qwen2", "mistral", "phi", "phi3", "gpt2", "gpt_neox", "opt", "granite",
    "gemma", "gemma2", "gemma3", "bert", "roberta", "t5",
}


def test_every_supported_family_has_a_tiny_model() -> None:
    supported = {family.name for family in list_families()}
    assert REQUIRED <= supported
    assert supported == set(FAMILIES)


@pytest.mark.parametrize("name", [*FAMILIES, *VARIANTS])
def test_g1_round_trip(name: str, tiny_models, tmp_path) -> None:
    folder = tiny_models.variant(name)
    config = json.loads((folder / "config.json").read_text())
    report = check(folder)
    expected_family = VARIANTS[name][0] if name in VARIANTS else name
    assert report["family"] == expected_family
    assert report["unmapped"] == []
    trip = report["round_trip"]
    assert trip == {
        "max_abs_diff": 0.0, "missing": [], "extra": [], "changed": [], "reshaped": [],
        "lossless": True,
    }

    rebuilt = tmp_path / "rebuilt"
    assert rebuild(folder, rebuilt)["lossless"]
    before = outputs(folder, config)
    after = outputs(rebuilt, config)
    assert torch.equal(before, after)
    assert torch.isfinite(before).all()


def test_g1_sharded_checkpoint(tiny_models) -> None:
    folder = tiny_models.get("phi3", shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 1
    report = check(folder)
    assert report["round_trip"]["lossless"]
    assert report["tensors"] == len(check(tiny_models.get("phi3"))["mapping"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_g1_half_precision(tiny_models, dtype: torch.dtype) -> None:
    report = check(tiny_models.get("gpt2", dtype=dtype))
    assert report["round_trip"]["lossless"]


def test_round_trip_keeps_unmapped_tensors_verbatim(tiny_models) -> None:
    from crdt_merge.families import load_folder

    config, tensors = load_folder(tiny_models.get("llama"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(4.0)
    tensors["score.weight"] = torch.ones(3, 32)
    report = check(tensors, config)
    assert report["unmapped"] == ["model.layers.0.self_attn.rotary_emb.inv_freq", "score.weight"]
    assert report["round_trip"]["lossless"]


def test_t5_aliases_of_the_shared_embedding(tiny_models) -> None:
    from crdt_merge.families import detect, load_folder

    config, tensors = load_folder(tiny_models.get("t5"))
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].clone()
    tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"].clone() + 1
    family = detect(config, tensors)
    model = family.to_canonical(tensors, config)
    # an identical copy is an alias; a different one is carried as an unmapped tensor
    assert model.aliases == {"encoder.embed_tokens.weight": "embed.weight"}
    assert list(model.unmapped) == ["decoder.embed_tokens.weight"]
    assert check(tensors, config)["round_trip"]["lossless"]
