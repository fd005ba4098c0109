"""GGUF in and out on tiny models of each supported family: export f32 -> import is
lossless (Gemma's norms: GGUF stores fl32(1 + w), which cannot hold every float32 w; the
bound is tested, and GGUF -> import -> export is exact for stored values >= 0.5), the export is
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
#: gemma3: transformers' GGUF loader does not read query_pre_attn_scalar (it takes 256) and
#: llama.cpp takes head_dim, so the tiny model has both at 256
OVERRIDES = {"llama": {}, "qwen2": {}, "gemma3": {"head_dim": 256, "query_pre_attn_scalar": 256}}


@pytest.fixture
def tiny(tiny_models):
    return lambda family: tiny_models.get(family, **OVERRIDES[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_is_lossless(tiny, tmp_path: Path, family: str) -> None:
    folder = tiny(family)
    write_gguf(folder, tmp_path / "m.gguf", "f32", tokenizer=False)
    info = gguf_to_folder(tmp_path / "m.gguf", tmp_path / "back")
    assert info["dequantized_from"] == ["F32"]
    want = load_file(str(folder / "model.safetensors"))
    got = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == np.float32 and g.shape == w.shape, name
        if family == "gemma3" and name.endswith("norm.weight"):
            # GGUF holds fl32(1 + w): w comes back as fl32(fl32(1 + w) - 1), see below
            assert g.tobytes() == ((w + np.float32(1)) - np.float32(1)).tobytes(), name
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
    write_gguf(folder, tmp_path / "a.gguf", kind, tokenizer=False)
    write_gguf(folder, tmp_path / "b.gguf", kind, tokenizer=False)
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
    write_gguf(folder, tmp_path / "m.gguf", kind, tokenizer=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                  dtype=torch.float32).eval()
    inputs = sample_inputs(json.loads((folder / "config.json").read_text()))
    with torch.no_grad():
        got = loaded(**inputs).logits
        exact = _rounded_reference(folder, "f32")(**inputs).logits
        want = _rounded_reference(folder, kind)(**inputs).logits
    if kind == "q8_0":
        # 8-bit blocks: far from exact, but close (gemma3's head_dim 256 sums more rounded
        # products per attention score)
        err = (got - exact).abs().max().item()
        assert 0 < err < (0.1 if family == "gemma3" else 0.02) * exact.abs().max().item()
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
    write_gguf(tiny(family), tmp_path / "m.gguf", kind, tokenizer=False)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                  dtype=torch.float32).state_dict()
    gguf_to_folder(tmp_path / "m.gguf", tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    for name, t in ours.items():
        assert np.array_equal(t, theirs[name].numpy()), name


def test_import_into_a_replica_records_dequantisation(replicas, tiny, tmp_path: Path) -> None:
    a = replicas[0]
    write_gguf(tiny("qwen2"), tmp_path / "m.gguf", "q8_0", tokenizer=False)
    got = import_gguf(a.store, str(tmp_path / "m.gguf"), a.piece_size)
    assert got.manifest.meta["source_format"] == "gguf"
    assert got.manifest.meta["dequantized_from"] == ["F32", "Q8_0"]
    assert got.manifest.meta["model_type"] == "qwen2"
    assert all(rec.dtype == "F32" for rec in got.manifest.tensors.values())


def test_unsupported_families_and_files_are_refused(tiny_models, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="gpt2"):
        write_gguf(tiny_models.get("gpt2"), tmp_path / "m.gguf", "f16", tokenizer=False)
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
    record = export_gguf(folder, tmp_path / "out.gguf", "f16", tokenizer=False)
    data = json.loads((folder / "merge_manifest.json").read_text())
    assert data["gguf"] == record and data["checkpoint_id"] == "x"
    assert record["blake3"] == blake3.blake3((tmp_path / "out.gguf").read_bytes()).hexdigest()
    with pytest.raises(PlanError, match="outside"):
        export_gguf(folder, folder / "in.gguf", "f16", tokenizer=False)


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


def _gemma_with_norms(tiny_models, tmp_path: Path, values: np.ndarray) -> Path:
    """The tiny gemma3 with its norm vectors filled from ``values`` (cycled)."""
    import shutil

    from safetensors.numpy import save_file
    folder = tmp_path / "g"
    shutil.copytree(tiny_models.get("gemma3"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    k = 0
    for name in sorted(tensors):
        if name.endswith("norm.weight"):
            n = tensors[name].size
            tensors[name] = np.resize(values[k % values.size:], n).astype(np.float32)
            k += n
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _gguf_norms(path: Path) -> dict[str, np.ndarray]:
    import gguf
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors
            if t.name.endswith("norm.weight")}


def test_gemma_norms_into_gguf_cannot_all_come_back(tiny_models, tmp_path: Path) -> None:
    """Hugging Face -> GGUF -> Hugging Face: GGUF holds g = fl32(1 + w) (one rounding), the
    import gives w' = fl32(g - 1), so |w' - w| <= ulp(g)/2 + ulp(w')/2. Exactness is
    impossible: w = 0 and w = 2**-30 are stored as the same g = 1.0."""
    rng = np.random.default_rng(7)
    values = np.concatenate([
        np.array([0.0, 2.0**-30, -0.75, 3.5, -1.9999999, 1e-8, -1e-8], dtype=np.float32),
        rng.normal(0, 0.05, 400).astype(np.float32), rng.normal(0, 10, 200).astype(np.float32)])
    folder = _gemma_with_norms(tiny_models, tmp_path, values)
    write_gguf(folder, tmp_path / "m.gguf", "f32", tokenizer=False)
    stored = _gguf_norms(tmp_path / "m.gguf")
    gguf_to_folder(tmp_path / "m.gguf", tmp_path / "back")
    want, got = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    lost = 0
    for name, w in want.items():
        if not name.endswith("norm.weight"):
            continue
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        g = stored[next(k for k in stored if (layer is None and k == "output_norm.weight")
                        or (layer is not None and k.startswith(f"blk.{layer}.")
                            and _same(k, name)))]
        assert g.tobytes() == (np.float32(1) + w).tobytes(), name  # numpy's IEEE float32 add
        back = got[name]
        bound = np.spacing(np.abs(g)) / 2 + np.spacing(np.abs(back)) / 2
        assert np.all(np.abs(back.astype(np.float64) - w.astype(np.float64)) <= bound), name
        lost += int(np.sum(back != w))
    assert lost > 0  # the bound is reached in practice, not only in theory
    first = want["model.layers.0.input_layernorm.weight"]
    assert first[0] == 0.0 and first[1] == 2.0**-30
    assert got["model.layers.0.input_layernorm.weight"][1] == 0.0  # one g for both


_GGUF_OF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
            "self_attn.k_norm": "attn_k_norm"}


def _same(gguf_name: str, hf_name: str) -> bool:
    part = hf_name.split(".", 3)[3].removesuffix(".weight")
    return gguf_name.split(".")[2] == _GGUF_OF[part]


def test_gemma_norms_from_gguf_come_back_exactly(tiny_models, tmp_path: Path) -> None:
    """GGUF -> Hugging Face -> GGUF: every stored g >= 0.5 comes back bit for bit
    (g - 1 is exact there: Sterbenz on [0.5, 2], a multiple of ulp(g) above), whatever its
    low bits; below 0.5 it need not (g = 0.1f: fl32(g - 1) = -0.9f, and -0.9f + 1 =
    0.100000024f), which is why the slow real-file test checks every value of gemma-3."""
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**23, 2000, dtype=np.uint32)
    exps = rng.integers(126, 126 + 24, 2000, dtype=np.uint32)  # [0.5, 2**23)
    g = ((exps << 23) | bits).view(np.float32)
    w = g - np.float32(1)  # exact for these g: the folder whose export holds exactly g
    folder = _gemma_with_norms(tiny_models, tmp_path, w)
    write_gguf(folder, tmp_path / "a.gguf", "f32", tokenizer=False)
    first = _gguf_norms(tmp_path / "a.gguf")
    assert sum(v.size for v in first.values()) > 100
    gguf_to_folder(tmp_path / "a.gguf", tmp_path / "back")
    write_gguf(tmp_path / "back", tmp_path / "b.gguf", "f32", tokenizer=False)
    second = _gguf_norms(tmp_path / "b.gguf")
    assert first.keys() == second.keys()
    for name in first:
        assert np.all(first[name] >= 0.5)
        assert first[name].tobytes() == second[name].tobytes(), name


def test_gemma3_query_pre_attn_scalar(tiny_models, tmp_path: Path) -> None:
    """Import: gemma3.attention.scale when the file has it (1/scale**2), else what
    llama.cpp derives (head_dim; hidden/heads for the 62-layer model). Export: a value
    llama.cpp would not use is refused by name."""
    from crdt_merge.formats.gguf import _config
    folder = tiny_models.get("gemma3")  # head_dim 8, query_pre_attn_scalar 8
    write_gguf(folder, tmp_path / "m.gguf", "f32", tokenizer=False)
    gguf_to_folder(tmp_path / "m.gguf", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["query_pre_attn_scalar"] == 8
    with pytest.raises(PlanError, match="query_pre_attn_scalar 16"):
        write_gguf(tiny_models.get("gemma3", query_pre_attn_scalar=16), tmp_path / "x.gguf",
                   "f32", tokenizer=False)
    meta = {"gemma3.attention.head_count": 4, "gemma3.embedding_length": 32,
            "gemma3.feed_forward_length": 64, "gemma3.block_count": 2,
            "gemma3.attention.key_length": 8}
    names = {"token_embd.weight"}
    assert _config("gemma3", meta, names, 128)["query_pre_attn_scalar"] == 8
    scale = float(np.float32(1 / np.sqrt(168)))  # as a GGUF float32 holds it
    assert _config("gemma3", {**meta, "gemma3.attention.scale": scale}, names,
                   128)["query_pre_attn_scalar"] == 168
    assert _config("gemma3", {**meta, "gemma3.attention.scale": 0.3}, names,
                   128)["query_pre_attn_scalar"] == pytest.approx(1 / 0.09)
    big = {**meta, "gemma3.block_count": 62, "gemma3.embedding_length": 5376,
           "gemma3.attention.head_count": 32, "gemma3.attention.key_length": 128}
    assert _config("gemma3", big, names, 128)["query_pre_attn_scalar"] == 168
    with pytest.raises(ModelImportError, match="attention.scale"):
        _config("gemma3", {**meta, "gemma3.attention.scale": -1.0}, names, 128)
