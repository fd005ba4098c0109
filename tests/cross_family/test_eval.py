"""`crdt-merge eval`: bits per byte and perplexity, checked against a direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from crdt_merge.cli.evaluate import evaluate, read_text, score
from crdt_merge.errors import BadParameter

BOS = 256
TEXT = "Bits per byte compare models across vocabularies.\nÉté: 2 bytes for É.\n" * 3


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    """A tiny llama whose tokenizer maps each UTF-8 byte to one token (id = byte value)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.fixtures.tiny_models import make_tiny

    folder = tmp_path_factory.mktemp("byte-llama")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    table = {c: b for b, c in enumerate(sorted(alphabet, key=_byte_of))}
    tok = Tokenizer(models.BPE(vocab=table, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    assert fast.convert_tokens_to_ids("<s>") == BOS
    make_tiny("llama", folder, seed=4, vocab_size=260, bos_token_id=BOS, eos_token_id=BOS,
              pad_token_id=BOS)
    fast.save_pretrained(folder)
    return folder


def _byte_of(char: str) -> int:
    """The byte a GPT-2 byte-level character stands for."""
    visible = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    mapping = {chr(b): b for b in visible}
    extra = [b for b in range(256) if b not in visible]
    mapping.update({chr(256 + i): b for i, b in enumerate(extra)})
    return mapping[char]


def test_bits_per_byte_is_the_nll_in_bits_over_utf8_bytes(byte_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(byte_model))
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))  # one token per byte
    model = AutoModelForCausalLM.from_pretrained(str(byte_model), dtype=torch.float32).eval()
    with torch.inference_mode():
        full = torch.tensor([[BOS, *ids]])
        logp = torch.log_softmax(model(full).logits[0, :-1].float(), dim=-1)
    direct = -float(logp.gather(1, full[0, 1:, None]).double().sum())
    result = evaluate(byte_model, TEXT, window=len(ids) + 1, stride=len(ids))
    assert result.tokens == len(ids) == result.bytes
    assert result.nll_nats == pytest.approx(direct, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(direct / math.log(2) / len(ids), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(direct / len(ids)), rel=1e-6)
    # short windows score every token exactly once, with less context
    nll, n = score(model, ids, BOS, window=32, stride=16)
    assert n == len(ids) and nll > 0


def test_eval_cli_and_bad_input(byte_model: Path, tmp_path: Path, capsys) -> None:
    from crdt_merge.cli.main import main

    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["--json", "eval", str(byte_model), "--text", str(text), "--window", "64",
                 "--stride", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bytes"] == len(TEXT.encode()) and out["bits_per_byte"] > 0
    assert main(["eval", str(byte_model), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "bad_parameter" in capsys.readouterr().err
    data = TEXT.encode()
    cut = data.index("É".encode()) + 1  # inside the two bytes of É: the partial É is dropped
    assert read_text(text, max_bytes=cut).encode() == data[:cut - 1]
    with pytest.raises(BadParameter):
        score(None, [1, 2], BOS, window=4, stride=8)
