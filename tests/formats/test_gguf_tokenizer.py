"""GGUF tokenizer metadata for SentencePiece tokenizers (llama, gemma3) and the refusals.

The reference is the sentencepiece library itself: it trains the tokenizer.model the tiny
models get, and its processor (an independent reader of the file) gives the expected
tokens, scores and types; transformers' GGUF tokenizer conversion then reads our GGUF and
must tokenize like sentencepiece. A GGUF -> import -> export round trip gives the same
tokenizer metadata key by key. The real gemma-3 file: tests/formats/test_real_gguf.py."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge.errors import ModelImportError, PlanError
from crdt_merge.formats import spm
from crdt_merge.formats.gguf import gguf_to_folder, write_gguf

sentencepiece = pytest.importorskip("sentencepiece")  # a dev dependency: always there in CI

TEXT = ["the merged model speaks", "replicas agree on the same bytes", "hello world 123",
        "ünïcode  and tabs\tand\nnewlines", "<start_of_turn>user hi"] * 30
SAMPLES = ["hello world", "the replicas speak  the same bytes", "ünïcode and 123",
           "say <start_of_turn>user merged\nmodel"]


def _train(user: tuple[str, ...] = ("<start_of_turn>", "\u2581\u2581"), **kw) -> bytes:
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=out, vocab_size=300, model_type="bpe",
        byte_fallback=True, user_defined_symbols=list(user),
        control_symbols=["<ctl>"], num_threads=1, minloglevel=2, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, **kw)
    return out.getvalue()


def _folder(tiny_models, tmp_path: Path, family: str, model: bytes,
            hf_config: bool = False) -> Path:
    """A tiny model with the SentencePiece model; ``hf_config``: and a tokenizer_config.json
    as Hugging Face writes one (special tokens, add flags, added_tokens_decoder)."""
    folder = tmp_path / family
    shutil.copytree(tiny_models.get(family, vocab_size=320), folder)
    (folder / "tokenizer.model").write_bytes(model)
    if hf_config:
        sp = sentencepiece.SentencePieceProcessor(model_proto=model)
        added = {str(sp.piece_to_id(t)): {"content": t, "special": t != "<start_of_turn>"}
                 for t in ("<unk>", "<s>", "</s>", "<start_of_turn>")}
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
            "eos_token": "</s>", "unk_token": "<unk>", "added_tokens_decoder": added}))
    return folder


def _tokenizer_keys(path: Path) -> dict:
    import gguf
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _assert_round_trip_keeps(a: dict, tmp_path: Path) -> None:
    """``a.gguf`` (whose tokenizer keys are ``a``) imported to ``back/`` and exported again
    to ``b.gguf`` has the same tokenizer keys, value for value."""
    gguf_to_folder(tmp_path / "a.gguf", tmp_path / "back")
    write_gguf(tmp_path / "back", tmp_path / "b.gguf", "f32")
    b = _tokenizer_keys(tmp_path / "b.gguf")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key] == b[key], key


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sentencepiece_metadata_is_what_sentencepiece_reads(tiny_models, tmp_path, family) -> None:
    model = _train()
    folder = _folder(tiny_models, tmp_path, family, model)
    info = write_gguf(folder, tmp_path / "t.gguf", "f32")
    assert info["tokenizer"] == "llama"
    got = _tokenizer_keys(tmp_path / "t.gguf")
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    n = sp.vocab_size()
    user = {"<start_of_turn>", "\u2581\u2581"}
    want_tokens, want_types = [], []
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            kind = 2
        elif sp.is_control(i):
            kind = 3
        elif sp.is_byte(i):
            kind = 6
        elif piece in user:
            kind, piece = 4, piece.replace("\u2581", " ")
        else:
            kind = 1
        want_tokens.append(piece)
        want_types.append(kind)
    pad = range(n, 320)
    assert got["tokenizer.ggml.model"] == "llama" and got["tokenizer.ggml.pre"] == "default"
    assert got["tokenizer.ggml.tokens"] == want_tokens + [f"[PAD{i}]" for i in pad]
    assert got["tokenizer.ggml.token_type"] == want_types + [5] * len(pad)
    assert got["tokenizer.ggml.scores"] == [sp.get_score(i) for i in range(n)] + [-10000.0] * len(pad)
    config = json.loads((folder / "config.json").read_text())
    assert got["tokenizer.ggml.bos_token_id"] == config["bos_token_id"]
    assert got["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    assert got["tokenizer.ggml.padding_token_id"] == config["pad_token_id"]
    # gemma3: the converter's rule; llama: the model's add_dummy_prefix (true by default)
    assert got["tokenizer.ggml.add_space_prefix"] is (family == "llama")


def test_transformers_reads_our_sentencepiece_gguf_like_sentencepiece(tiny_models, tmp_path) -> None:
    from transformers import AutoTokenizer
    # without the "▁▁" piece: sentencepiece matches a user-defined piece after its
    # normalisation, transformers (and llama.cpp) in the raw text, so they differ on it
    model = _train(user=("<start_of_turn>",))
    folder = _folder(tiny_models, tmp_path, "llama", model)
    write_gguf(folder, tmp_path / "t.gguf", "f32")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    for sample in SAMPLES:
        assert theirs(sample, add_special_tokens=False)["input_ids"] == sp.encode(sample), sample


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sentencepiece_round_trip_gguf_import_export(tiny_models, tmp_path, family) -> None:
    """export -> import -> export: the same tokenizer metadata, key by key; the imported
    folder's tokenizer.model is a SentencePiece model that tokenizes like the original."""
    model = _train()
    folder = _folder(tiny_models, tmp_path, family, model, hf_config=True)
    write_gguf(folder, tmp_path / "a.gguf", "f32")
    a = _tokenizer_keys(tmp_path / "a.gguf")
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    turn = sp.piece_to_id("<start_of_turn>")
    # the added tokens of tokenizer_config override the model's types and scores
    assert a["tokenizer.ggml.token_type"][sp.unk_id()] == 3
    assert a["tokenizer.ggml.token_type"][turn] == 4
    assert a["tokenizer.ggml.scores"][turn] == -1000.0
    assert a["tokenizer.ggml.unknown_token_id"] == sp.unk_id()
    assert a["tokenizer.ggml.add_bos_token"] is True and a["tokenizer.ggml.add_eos_token"] is False
    _assert_round_trip_keeps(a, tmp_path)
    kept = sentencepiece.SentencePieceProcessor(
        model_file=str(tmp_path / "back" / "tokenizer.model"))
    for sample in SAMPLES:
        # gemma3's GGUF says no dummy prefix (the converter's rule): give it the space
        got = kept.encode(sample if family == "llama" else " " + sample)
        assert got == sp.encode(sample), sample


def test_byte_level_bpe_round_trip_keeps_the_special_tokens(tiny_models, tmp_path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "m"
    shutil.copytree(tiny_models.get("qwen2", vocab_size=320), folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<pad>").save_pretrained(folder)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    info = write_gguf(folder, tmp_path / "a.gguf", "f32")
    assert info["tokenizer"] == "gpt2"
    assert _tokenizer_keys(tmp_path / "a.gguf")["tokenizer.ggml.pre"] == "default"
    # as if imported from a GGUF whose pre-tokenizer is qwen2's: the name is kept through
    # export -> import -> export (the converter would hash transformers' output for it)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["gguf_vocabulary"] = {"pre": "qwen2", "add_space_prefix": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    write_gguf(folder, tmp_path / "a.gguf", "f32")
    a = _tokenizer_keys(tmp_path / "a.gguf")
    assert a["tokenizer.ggml.pre"] == "qwen2" and a["tokenizer.ggml.add_space_prefix"] is False
    assert a["tokenizer.ggml.bos_token_id"] == 1 and a["tokenizer.ggml.eos_token_id"] == 2
    assert a["tokenizer.ggml.padding_token_id"] == 0 and a["tokenizer.ggml.unknown_token_id"] == 0
    assert a["tokenizer.ggml.add_bos_token"] is True and a["tokenizer.ggml.add_sep_token"] is False
    assert a["tokenizer.chat_template"] == "{{ messages }}"
    assert a["tokenizer.ggml.token_type"][3] == 3  # <|im_start|>: a control token
    _assert_round_trip_keeps(a, tmp_path)


# -- refusals ----------------------------------------------------------------------------------

def test_no_tokenizer_is_refused_unless_asked_for(tiny_models, tmp_path) -> None:
    folder = tiny_models.get("llama")
    with pytest.raises(PlanError, match="no tokenizer.*--gguf-no-tokenizer"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")
    assert not (tmp_path / "t.gguf").exists()
    info = write_gguf(folder, tmp_path / "t.gguf", "f16", tokenizer=False)
    assert info["tokenizer"] == "none" and _tokenizer_keys(tmp_path / "t.gguf") == {}


def test_other_tokenizer_kinds_are_refused_by_name(tiny_models, tmp_path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    folder = tmp_path / "wp"
    shutil.copytree(tiny_models.get("llama"), folder)
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.save(str(folder / "tokenizer.json"))
    with pytest.raises(PlanError, match="WordPiece"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")
    # a SentencePiece-style BPE tokenizer.json (Gemma's layout) without tokenizer.model
    sp_style = Tokenizer(models.BPE({"<unk>": 0, "\u2581a": 1, "a": 2, "\u2581": 3},
                                    [("\u2581", "a")], unk_token="<unk>", byte_fallback=True))
    sp_style.normalizer = normalizers.Replace(" ", "\u2581")
    sp_style.save(str(folder / "tokenizer.json"))
    with pytest.raises(PlanError, match="not byte-level.*tokenizer.model"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")
    # a unigram SentencePiece model: llama.cpp's 'llama' tokenizer would merge it wrongly
    (folder / "tokenizer.json").unlink()
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=out, vocab_size=60, model_type="unigram",
        num_threads=1, minloglevel=2, hard_vocab_limit=False)
    (folder / "tokenizer.model").write_bytes(out.getvalue())
    with pytest.raises(PlanError, match="UNIGRAM"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")
    assert not (tmp_path / "t.gguf").exists()


def test_a_tokenizer_model_for_qwen2_is_refused(tiny_models, tmp_path) -> None:
    """qwen2's converter reads a byte-level tokenizer.json only."""
    folder = _folder(tiny_models, tmp_path, "qwen2", _train())
    with pytest.raises(PlanError, match="qwen2"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")


# -- the tokenizer.model reader and writer -------------------------------------------------------

_piece = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                 min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(st.lists(_piece, min_size=1, max_size=30, unique=True),
       st.randoms(use_true_random=False), st.booleans())
def test_write_read_and_sentencepiece_agree(pieces, rnd, dummy) -> None:
    pieces = ["<unk>", *(p for p in pieces if p != "<unk>")]
    scores = [float(rnd.randint(-10**6, 0)) / 4 for _ in pieces]
    types = [2] + [rnd.choice([1, 1, 3, 4, 5]) for _ in pieces[1:]]
    data = spm.write_model(pieces, scores, types, special={"unk": 0}, add_dummy_prefix=dummy)
    back = spm.read_model(data)
    assert back.pieces == tuple(pieces) and back.scores == tuple(scores)
    assert back.types == tuple(types) and back.model_type == 2 and back.add_dummy_prefix is dummy
    sp = sentencepiece.SentencePieceProcessor(model_proto=data)  # an independent reader
    assert [sp.id_to_piece(i) for i in range(len(pieces))] == pieces
    assert [sp.get_score(i) for i in range(len(pieces))] == scores
    assert [sp.is_control(i) for i in range(len(pieces))] == [t == 3 for t in types]
    assert [sp.is_unused(i) for i in range(len(pieces))] == [t == 5 for t in types]


def test_reader_refuses_what_is_not_a_model() -> None:
    for junk in (b"", b"\x0a\x05ab", b"\xff" * 12, b"\x0a\x02\x0a\x01"):
        with pytest.raises(ModelImportError, match="not a SentencePiece model"):
            spm.read_model(junk)


def _template(single: str, pair: str) -> dict:
    def items(text: str) -> list[dict]:
        return [{"Sequence": {"id": t[1:], "type_id": 0}} if t.startswith("$")
                else {"SpecialToken": {"id": t, "type_id": 0}} for t in text.split()]
    return {"post_processor": {"type": "TemplateProcessing", "single": items(single),
                               "pair": items(pair)}}


@pytest.mark.parametrize("tokenizer, names, want", [
    ({"post_processor": {"type": "RobertaProcessing"}}, {}, {"bos": True, "eos": True, "sep": True}),
    # BERT: [CLS] counts as bos; the pair's inner [SEP] is its eos again, so no separate sep
    (_template("[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]"),
     {"bos": "[CLS]", "eos": "[SEP]", "sep": "[SEP]"}, {"bos": True, "eos": True, "sep": False}),
    (_template("<s> $A </s>", "<s> $A </s> </s> $B </s>"), {"bos": "<s>", "eos": "</s>"},
     {"bos": True, "eos": True, "sep": True}),
    (_template("<bos> $A", "<bos> $A <bos> $B"), {"bos": "<bos>", "eos": "<eos>"},
     {"bos": True, "sep": False}),
    (_template("$A", "$A <x> $B"), {}, {"sep": False}),  # no names: <x> is no separator
    (_template("$A", "$A $B"), {}, {}),
])
def test_add_flags_from_the_post_processor(tokenizer, names, want) -> None:
    from crdt_merge.formats.gguf_vocab import _added_flags
    assert _added_flags(tokenizer, names) == want


def test_malformed_tokenizer_files_are_refused_before_writing(tiny_models, tmp_path) -> None:
    """A checkpoint's tokenizer files come from a contributor: junk in them is a typed
    error, and no GGUF is written."""
    folder = _folder(tiny_models, tmp_path, "llama", b"\x0a\x05ab")
    with pytest.raises(PlanError, match="not a SentencePiece model"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")
    (folder / "tokenizer.model").write_bytes(_train())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"not a number": {"content": "<x>"}}}))
    with pytest.raises(PlanError, match="malformed"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").write_text(json.dumps({"model": ["BPE"], "pre_tokenizer": 3}))
    with pytest.raises(PlanError, match="malformed"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")
    (folder / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": {}}, "pre_tokenizer": {"pretokenizers": 3}}))
    with pytest.raises(PlanError, match="malformed"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")
    (folder / "tokenizer.model").write_bytes(_train())
    (folder / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(PlanError, match="tokenizer_config.json"):
        write_gguf(folder, tmp_path / "t.gguf", "f16")
    assert not (tmp_path / "t.gguf").exists()
