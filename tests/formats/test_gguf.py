"""GGUF in and out on tiny models of each supported family: export f32 -> import is
lossless (Gemma's norms: GGUF stores 1 + w, one float32 rounding), the export is
deterministic, loads in transformers with the logits of the safetensors folder within the
export type's precision, and transformers' own GGUF loader reads our files and agrees with
our importer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from crdt_merge.errors import ModelImportError, PlanError
from crdt_merge.formats.gguf import export_gguf, gguf_to_folder, import_gguf, write_gguf
from tests.fixtures.tiny_models import sample_inputs

FAMILIES = ["llama", "qwen2", "gemma3"]
#: gemma3: transformers' GGUF loader does not read query_pre_attn_scalar (it takes 256), so
#: the tiny model uses that value
OVERRIDES = {"llama": {}, "qwen2": {}, "gemma3": {"query_pre_attn_scalar": 256}}


@pytest.fixture
def tiny(tiny_models):
    return lambda family: tiny_models.get(family, **OVERRIDES[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_is_lossless(tiny, tmp_path: Path, family: str) -> None:
    folder = tiny(family)
    write_gguf(folder, tmp_path / "m.gguf", "f32")
    info = gguf_to_folder(tmp_path / "m.gguf", tmp_path / "back")
    assert info["dequantized_from"] == ["F32"]
    want = load_file(str(folder / "model.safetensors"))
    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == np.float32 and g.shape == w.shape, name
        if family == "gemma3" and name.endswith("norm.weight"):
            # GGUF holds fl32(1 + w): back within one rounding at 1 + w's magnitude
            ulp = np.spacing(np.abs(w.astype(np.float32) + np.float32(1)))
            assert np.all(np.abs(g - w) <= ulp), name
        else:
            assert g.tobytes() == w.tobytes(), name
    config = json.loads((folder / "config.json").read_text())
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("model_type", "architectures", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert back[key] == config[key], key


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_export_is_deterministic(tiny, tmp_path: Path, kind: str) -> None:
    folder = tiny("llama")
    write_gguf(folder, tmp_path / "a.gguf", kind)
    write_gguf(folder, tmp_path / "b.gguf", kind)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def _rounded_reference(folder: Path, kind: str) -> torch.nn.Module:
    """The safetensors model with its 2-D weights rounded to the export type (torch's own
    float16/bfloat16 casts), the 1-D ones kept, as the GGUF rules say."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if kind in ("f16", "bf16"):
        dtype = torch.float16 if kind == "f16" else torch.bfloat16
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.copy_(p.to(dtype).to(torch.float32))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_transformers_loads_the_export(tiny, tmp_path: Path, family: str, kind: str) -> None:
    from transformers import AutoModelForCausalLM
    folder = tiny(family)
    write_gguf(folder, tmp_path / "m.gguf", kind)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                  dtype=torch.float32).eval()
    inputs = sample_inputs(json.loads((folder / "config.json").read_text()))
    with torch.no_grad():
        got = loaded(**inputs).logits
        exact = _rounded_reference(folder, "f32")(**inputs).logits
        want = _rounded_reference(folder, kind)(**inputs).logits
    if kind == "q8_0":
        # 8-bit blocks: far from exact, but close
        err = (got - exact).abs().max().item()
        assert 0 < err < 0.02 * exact.abs().max().item()
    elif family == "gemma3":  # norms within one float32 rounding (1 + w)
        assert torch.allclose(got, want, rtol=0, atol=1e-5)
    else:
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["bf16", "q8_0"])
def test_import_agrees_with_transformers_gguf_loader(tiny, tmp_path: Path, family: str, kind: str) -> None:
    """transformers' GGUF loader (an independent dequantiser and name map) and our importer
    give the same tensors from the same file."""
    from transformers import AutoModelForCausalLM
    write_gguf(tiny(family), tmp_path / "m.gguf", kind)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                  dtype=torch.float32).state_dict()
    gguf_to_folder(tmp_path / "m.gguf", tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    for name, t in ours.items():
        assert np.array_equal(t, theirs[name].numpy()), name


def test_import_into_a_replica_records_dequantisation(replicas, tiny, tmp_path: Path) -> None:
    a = replicas[0]
    write_gguf(tiny("qwen2"), tmp_path / "m.gguf", "q8_0")
    got = import_gguf(a.store, str(tmp_path / "m.gguf"), a.piece_size)
    assert got.manifest.meta["source_format"] == "gguf"
    assert got.manifest.meta["dequantized_from"] == ["F32", "Q8_0"]
    assert got.manifest.meta["model_type"] == "qwen2"
    assert all(rec.dtype == "F32" for rec in got.manifest.tensors.values())


def test_unsupported_families_and_files_are_refused(tiny_models, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="gpt2"):
        write_gguf(tiny_models.get("gpt2"), tmp_path / "m.gguf", "f16")
    with pytest.raises(PlanError, match="q4"):
        write_gguf(tiny_models.get("llama"), tmp_path / "m.gguf", "q4")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 40)
    with pytest.raises(ModelImportError):
        gguf_to_folder(tmp_path / "junk.gguf", tmp_path / "x")


def test_export_records_the_hash_beside_the_checkpoint(tiny, tmp_path: Path) -> None:
    import shutil

    import blake3
    folder = tmp_path / "out"
    shutil.copytree(tiny("llama"), folder)
    (folder / "merge_manifest.json").write_text(json.dumps({"checkpoint_id": "x"}))
    record = export_gguf(folder, tmp_path / "out.gguf", "f16")
    data = json.loads((folder / "merge_manifest.json").read_text())
    assert data["gguf"] == record and data["checkpoint_id"] == "x"
    assert record["blake3"] == blake3.blake3((tmp_path / "out.gguf").read_bytes()).hexdigest()
    with pytest.raises(PlanError, match="outside"):
        export_gguf(folder, folder / "in.gguf", "f16")


def test_bpe_tokenizer_metadata(tiny_models, tmp_path: Path) -> None:
    """A byte-level BPE tokenizer.json is written as GGUF tokenizer metadata that
    transformers' GGUF tokenizer conversion reads back to the same token ids."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = tmp_path / "m"
    shutil.copytree(tiny_models.get("llama", vocab_size=320), folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the merged model speaks", "replicas agree on the same bytes", "hello world"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    info = write_gguf(folder, tmp_path / "t.gguf", "f16")
    assert info["tokenizer"] == "gpt2"
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    want = AutoTokenizer.from_pretrained(str(folder))
    for sample in ["hello world", "the replicas speak the same bytes", "ünïcode and 123"]:
        assert (back(sample, add_special_tokens=False)["input_ids"]
                == want(sample, add_special_tokens=False)["input_ids"]), sample
