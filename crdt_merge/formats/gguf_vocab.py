"""Tokenizer metadata of a GGUF file, written from a model folder and kept on import.

Out (:func:`tokenizer_metadata`): what llama.cpp's converter (convert_hf_to_gguf.py) writes
for the folder's tokenizer, computed here from the files alone:

- a SentencePiece ``tokenizer.model`` of BPE type (Llama 2 style, Gemma), for architectures
  ``llama`` and ``gemma3``: ``tokenizer.ggml.model = "llama"``, ``pre = "default"``, the
  pieces, scores and types (a USER_DEFINED piece stays USER_DEFINED, where the converter
  makes it NORMAL unless it is an added token), padded with ``[PAD<i>]`` (score -10000,
  UNUSED) to the config's vocab size; then (not in a GGUF import, below) every added token (``added_tokens_decoder`` of tokenizer_config.json,
  else ``added_tokens`` of tokenizer.json) overrides its slot: CONTROL when special or when
  it looks special, else USER_DEFINED, score -1000; a USER_DEFINED token is written with
  ``▁`` (U+2581) as a space (llama.cpp matches it in the raw text).
  ``add_space_prefix``: false for gemma3 (as the converter), else tokenizer_config's
  ``add_prefix_space``, else the model's ``add_dummy_prefix``.
- a byte-level BPE ``tokenizer.json`` (GPT-2 style: Llama 3, SmolLM2, Qwen2):
  ``tokenizer.ggml.model = "gpt2"``, tokens, types and merges; ``pre = "default"`` (the
  converter names llama.cpp's pre-tokenizer by hashing transformers' output, which is not
  done here), except in a GGUF import, which keeps the file's ``pre`` and
  ``add_space_prefix``.
- then, for both, the special token ids (``bos``, ``eos``, ``unk``, ``sep``, ``pad``,
  ``mask``: tokenizer_config's ``<typ>_token`` found among the added tokens, else
  config.json's ``<typ>_token_id``), whether ``bos``/``eos``/``sep`` are added (from
  tokenizer.json's post-processor, overridden by tokenizer_config's ``add_<typ>_token``),
  and the chat template. In a folder imported from GGUF (tokenizer_config.json holds
  ``gguf_tokenizer_flags: true``), ``add_<typ>_token: null`` means the file did not set
  the flag, and the export does not either.

Any other tokenizer is refused by name (:class:`PlanError`): a GGUF without a usable
tokenizer does not run in llama.cpp. ``tokenizer=False`` in the export writes none, on
purpose.

In (:func:`keep_gguf_tokenizer`): a GGUF's SentencePiece vocabulary (``model = "llama"``)
becomes a ``tokenizer.model`` in the imported folder (user-defined pieces with U+2581 for
spaces again, as SentencePiece matches them), and its special ids and add flags are
written into tokenizer_config.json, so that the export writes the same metadata back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crdt_merge.errors import ModelImportError, PlanError
from crdt_merge.formats import spm

#: the special token types GGUF has keys for, in the order they are written
SPECIAL = ("bos", "eos", "unk", "sep", "pad", "mask")
#: their GGUF key names (``tokenizer.ggml.<name>``)
GGUF_ID_KEY = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
               "sep": "seperator_token_id", "pad": "padding_token_id", "mask": "mask_token_id"}
ADDED = ("bos", "eos", "sep")
#: set in the tokenizer_config.json of a GGUF import (``{"unk_type": int | null}``): its
#: ``add_<typ>_token: null`` means the GGUF did not set that flag (rather than "derive it
#: from the post-processor"), and its tokenizer.model holds the GGUF's own types and scores
#: (no added-token override; ``unk_type``: the GGUF's type of the unknown token, which the
#: model file must call UNKNOWN)
GGUF_MARK = "gguf_vocabulary"
#: architectures whose converter reads a SentencePiece tokenizer.model
SPM_ARCHS = ("llama", "gemma3")


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path.name}: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else None


def _looks_special(text: str) -> bool:
    """The converter's list of added tokens that are control tokens even when not marked
    special (Gemma's ``<mask>``, ``<unusedN>``, ``<|...|>`` tokens)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _added_tokens(tokenizer: Mapping[str, Any] | None,
                  config: Mapping[str, Any] | None) -> list[tuple[int, str, bool]]:
    """(id, content, special) of the added tokens: tokenizer_config.json's
    ``added_tokens_decoder`` when it has one, else tokenizer.json's ``added_tokens``."""
    decoder = (config or {}).get("added_tokens_decoder")
    if isinstance(decoder, dict) and decoder:
        return [(int(k), str(v["content"]), bool(v.get("special")))
                for k, v in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    return [(int(t["id"]), str(t["content"]), bool(t.get("special")))
            for t in (tokenizer or {}).get("added_tokens", [])]


def _content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _added_flags(tokenizer: Mapping[str, Any] | None, names: Mapping[str, str | None]
                 ) -> dict[str, bool]:
    """Whether bos/eos/sep are added, read from tokenizer.json's post-processor the way the
    converter reads it: a RobertaProcessing adds all three; a TemplateProcessing's single
    template starting with a special token adds bos (when that token is bos or cls), ending
    with one adds eos; its pair template, stripped of those, adds sep when what remains
    between A and B is the sep or eos token."""
    flags: dict[str, bool] = {}
    post = (tokenizer or {}).get("post_processor") or {}
    processors = post.get("processors", [post]) if isinstance(post, dict) else []
    bos, cls, eos, sep = names.get("bos"), names.get("cls"), names.get("eos"), names.get("sep")

    def special_id(item: Any) -> Any:
        return item.get("SpecialToken", {}).get("id") if isinstance(item, dict) else None

    for proc in processors:
        if not isinstance(proc, dict):
            continue
        if proc.get("type") == "RobertaProcessing":
            flags.update(bos=True, eos=True, sep=True)
            continue
        if proc.get("type") != "TemplateProcessing":
            continue
        single, pair = proc.get("single") or [], proc.get("pair") or []
        first = last = None
        if len(single) > 1:
            first = special_id(single[0])
            if first:
                flags["bos"] = first in (bos, cls)
            last = special_id(single[-1])
            if last:
                flags["eos"] = last == eos
        if pair:
            start = 1 if first and special_id(pair[0]) == first else 0
            stop = len(pair) - 1 if last and special_id(pair[-1]) == last else len(pair)
            middle = pair[start:stop]
            a = middle[0].get("Sequence", {}).get("id") if middle else None
            b = middle[-1].get("Sequence", {}).get("id") if middle else None
            if a == "A" and b == "B" and len(middle) > 2:
                inner = middle[1:-1]
                entry = special_id(inner[0])
                add_sep = bool(entry) and entry in (sep, eos) and not last
                second = special_id(inner[1]) if len(inner) == 2 else None
                if second and second in (sep, eos):
                    add_sep = True
                flags["sep"] = add_sep
    return flags


def _special(folder: Path, config: Mapping[str, Any], n_vocab: int,
             tokenizer: Mapping[str, Any] | None, tok_config: Mapping[str, Any] | None
             ) -> tuple[dict[str, int], dict[str, bool], Any]:
    """The special ids, the add flags and the chat template (None when there is none)."""
    added = _added_tokens(tokenizer, tok_config)
    tc = dict(tok_config or {})
    names = {typ: _content(tc.get(f"{typ}_token")) for typ in (*SPECIAL, "cls")}
    if not names["bos"] and names["cls"]:
        names["bos"] = names["cls"]
    if not names["eos"] and names["sep"]:
        names["eos"] = names["sep"]
    flags = _added_flags(tokenizer, names) if tokenizer is not None else {}
    ids: dict[str, int] = {}
    for typ in SPECIAL:
        value = tc.get(f"add_{typ}_token", False)
        if typ in ADDED and isinstance(value, bool):
            flags[typ] = value if f"add_{typ}_token" in tc else flags.get(typ, value)
        elif typ in ADDED and value is None and isinstance(tc.get(GGUF_MARK), dict):
            flags.pop(typ, None)  # a GGUF import whose file did not set it
        if names[typ] is not None:
            found = next((i for i, text, _ in added if text == names[typ]), None)
            if found is not None and 0 <= found < n_vocab:
                ids[typ] = found
    for typ in SPECIAL:
        value = config.get(f"{typ}_token_id")
        if typ not in ids and isinstance(value, int) and not isinstance(value, bool) \
                and 0 <= value < n_vocab:
            ids[typ] = value
    template = tc.get("chat_template")
    if template is None:
        jinja, js = folder / "chat_template.jinja", _json(folder / "chat_template.json")
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        elif js is not None:
            template = js.get("chat_template")
    if not isinstance(template, (str, list)):
        template = None
    return ids, flags, template


def _is_byte_level(tokenizer: Mapping[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers", []) + node.get("decoders", []))

    return has(tokenizer.get("pre_tokenizer")) or has(tokenizer.get("decoder"))


def _spm_vocab(folder: Path, n_vocab: int, tokenizer: Mapping[str, Any] | None,
               tok_config: Mapping[str, Any] | None) -> tuple[list[str], list[float], list[int], bool]:
    """Tokens, scores and types of tokenizer.model, padded and overridden by the added
    tokens as the converter does; and the model's ``add_dummy_prefix``."""
    model = spm.read_model((folder / "tokenizer.model").read_bytes())  # checked: describe
    if len(model.pieces) > n_vocab:
        raise PlanError(f"tokenizer.model has {len(model.pieces)} pieces, more than the model's "
                        f"vocab_size {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [spm.UNUSED] * n_vocab
    for i, (piece, score, kind) in enumerate(zip(model.pieces, model.scores, model.types,
                                                 strict=True)):
        tokens[i], scores[i] = piece, score
        types[i] = kind if kind in (spm.UNKNOWN, spm.CONTROL, spm.UNUSED, spm.BYTE) else (
            spm.USER_DEFINED if kind == spm.USER_DEFINED else spm.NORMAL)
        if kind == spm.USER_DEFINED:  # llama.cpp matches these in the raw text
            tokens[i] = piece.replace("\u2581", " ")
    mark = (tok_config or {}).get(GGUF_MARK)
    if isinstance(mark, dict):  # a GGUF import: the file's own types and scores
        unk, kind = mark.get("unk_id"), mark.get("unk_type")
        if isinstance(unk, int) and isinstance(kind, int) and 0 <= unk < n_vocab:
            types[unk] = kind
        return tokens, scores, types, model.add_dummy_prefix
    for i, text, special in _added_tokens(tokenizer, tok_config):
        if not 0 <= i < n_vocab:
            continue
        if special or _looks_special(text):
            types[i] = spm.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = spm.USER_DEFINED
        scores[i] = -1000.0
        tokens[i] = text
    return tokens, scores, types, model.add_dummy_prefix


def _bpe_vocab(tokenizer: Mapping[str, Any], n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    model = tokenizer["model"]
    # ids past the embedding have no row (llama.cpp's converter refuses them; transformers
    # adds one when its tokenizer class has a default the vocabulary lacks): not written
    vocab = {k: v for k, v in dict(model["vocab"]).items() if 0 <= v < n_vocab}
    added = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])
             if 0 <= t["id"] < n_vocab}
    size = n_vocab
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [spm.UNUSED] * size
    for text, i in vocab.items():  # "[PAD<i>]" at i: the converter's placeholder, unused
        tokens[i], types[i] = text, spm.UNUSED if text == f"[PAD{i}]" else spm.NORMAL
    special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    for text, i in sorted(added.items(), key=lambda kv: kv[1]):
        tokens[i] = text
        types[i] = spm.CONTROL if text in special else spm.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def describe_tokenizer(folder: Path, arch: str) -> str:
    """The kind of tokenizer the export would write: ``"llama"`` (SentencePiece),
    ``"gpt2"`` (byte-level BPE).

    Raises:
        PlanError: a tokenizer GGUF export cannot describe, or none; the message names it.
    """
    try:
        return _describe(folder, arch)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlanError(f"GGUF export: the tokenizer files are malformed "
                        f"({type(exc).__name__}: {str(exc)[:120]})") from None


def _describe(folder: Path, arch: str) -> str:
    tokenizer = _json(folder / "tokenizer.json")
    if (folder / "tokenizer.model").is_file() and arch in SPM_ARCHS:
        try:
            model = spm.read_model((folder / "tokenizer.model").read_bytes())
        except ModelImportError as exc:
            raise PlanError(f"GGUF export: {exc.detail}") from None
        if model.model_type != 2:
            raise PlanError(
                f"GGUF export: tokenizer.model is a SentencePiece "
                f"{spm.MODEL_TYPES.get(model.model_type, model.model_type)} model; GGUF export "
                "writes SentencePiece BPE models only (llama.cpp's 'llama' tokenizer merges by "
                "score), or none on purpose: --gguf-no-tokenizer")
        return "llama"
    if tokenizer is not None:
        model = tokenizer.get("model") or {}
        kind = model.get("type")
        if kind == "BPE" and isinstance(model.get("vocab"), dict) and _is_byte_level(tokenizer):
            return "gpt2"
        if kind == "BPE":
            raise PlanError(
                "GGUF export: tokenizer.json is a BPE tokenizer that is not byte-level "
                "(SentencePiece style) and the checkpoint has no tokenizer.model to read its "
                "scores from; add the model's tokenizer.model, or write the GGUF without a "
                "tokenizer on purpose (--gguf-no-tokenizer)")
        raise PlanError(f"GGUF export: tokenizer.json holds a {kind or 'unknown'} tokenizer; "
                        "GGUF export writes SentencePiece (tokenizer.model) and byte-level BPE "
                        "tokenizers only (or none on purpose: --gguf-no-tokenizer)")
    if (folder / "tokenizer.model").is_file():
        raise PlanError(f"GGUF export: a SentencePiece tokenizer.model for architecture {arch}, "
                        f"whose converter reads a byte-level BPE tokenizer.json; none here "
                        "(or write none on purpose: --gguf-no-tokenizer)")
    raise PlanError("GGUF export: the checkpoint has no tokenizer (tokenizer.model or "
                    "tokenizer.json), and a GGUF without one does not run in llama.cpp; "
                    "write it anyway on purpose with --gguf-no-tokenizer")


def tokenizer_metadata(writer: Any, folder: Path, arch: str, config: Mapping[str, Any]) -> str:
    """Add the folder's tokenizer metadata to a ``gguf.GGUFWriter`` (see the module
    docstring); return its kind, ``"llama"`` or ``"gpt2"``.

    Raises:
        PlanError: see :func:`describe_tokenizer`.
    """
    kind = describe_tokenizer(folder, arch)
    try:
        return _write_metadata(writer, folder, arch, config, kind)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlanError(f"GGUF export: the tokenizer files are malformed "
                        f"({type(exc).__name__}: {str(exc)[:120]})") from None


def _write_metadata(writer: Any, folder: Path, arch: str, config: Mapping[str, Any],
                    kind: str) -> str:
    tokenizer = _json(folder / "tokenizer.json")
    tok_config = _json(folder / "tokenizer_config.json")
    n_vocab = int(config["vocab_size"])
    if kind == "llama":
        tokens, scores, types, dummy = _spm_vocab(folder, n_vocab, tokenizer, tok_config)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        prefix = (tok_config or {}).get("add_prefix_space")
        space = False if arch == "gemma3" else (prefix if isinstance(prefix, bool) else dummy)
    else:
        assert tokenizer is not None
        tokens, types, merges = _bpe_vocab(tokenizer, n_vocab)
        mark = (tok_config or {}).get(GGUF_MARK)
        mark = mark if isinstance(mark, dict) else {}
        pre = mark.get("pre")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre if isinstance(pre, str) and pre else "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        space = mark.get("add_space_prefix")
        space = space if isinstance(space, bool) else None
    ids, flags, template = _special(folder, config, len(tokens), tokenizer, tok_config)
    for typ in SPECIAL:
        if typ in ids:
            getattr(writer, f"add_{typ}_token_id")(ids[typ])
    for typ in ADDED:
        if typ in flags:
            getattr(writer, f"add_add_{typ}_token")(flags[typ])
    if space is not None:
        writer.add_add_space_prefix(space)
    if template is not None:
        writer.add_chat_template(template)
    return kind


# -- GGUF in -----------------------------------------------------------------------------------

def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - a value the reader cannot show counts as absent
        return None


def keep_gguf_tokenizer(reader: Any, out: Path) -> bool:
    """Write what the export needs to give a GGUF's tokenizer metadata back: for a
    SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``) a ``tokenizer.model``; for
    any vocabulary, the special tokens and add flags in tokenizer_config.json (created when
    transformers wrote none). False when the GGUF has no token list."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        return False
    mark: dict[str, Any] = {}
    pre = _field(reader, "tokenizer.ggml.pre")
    if _field(reader, "tokenizer.ggml.model") == "gpt2" and isinstance(pre, str) and pre:
        mark["pre"] = pre  # llama.cpp's pre-tokenizer name (its converter hashes for it)
        space = _field(reader, "tokenizer.ggml.add_space_prefix")
        if isinstance(space, bool):
            mark["add_space_prefix"] = space
    ids = {typ: _field(reader, f"tokenizer.ggml.{GGUF_ID_KEY[typ]}") for typ in SPECIAL}
    if _field(reader, "tokenizer.ggml.model") == "llama":
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = _field(reader, "tokenizer.ggml.token_type") or [spm.NORMAL] * len(tokens)
        types = [int(t) for t in types]
        unk = ids["unk"]
        if spm.UNKNOWN not in types and isinstance(unk, int) and 0 <= unk < len(types):
            mark.update(unk_id=unk, unk_type=types[unk])  # given back by the export
            types[unk] = spm.UNKNOWN  # SentencePiece needs one
        space = _field(reader, "tokenizer.ggml.add_space_prefix")
        # the converter writes user-defined pieces with spaces where SentencePiece has U+2581
        pieces = [str(t).replace(" ", "\u2581") if k == spm.USER_DEFINED else str(t)
                  for t, k in zip(tokens, types, strict=True)]
        data = spm.write_model(pieces, [float(s) for s in scores], types,
                               special={k: v for k, v in ids.items()
                                        if k in ("unk", "bos", "eos", "pad") and isinstance(v, int)},
                               add_dummy_prefix=True if space is None else bool(space))
        (out / "tokenizer.model").write_bytes(data)
    path = out / "tokenizer_config.json"
    config = _json(path) or {}
    for typ in SPECIAL:
        value = ids[typ]
        if isinstance(value, int) and 0 <= value < len(tokens):
            config[f"{typ}_token"] = str(tokens[value])
        else:
            config.pop(f"{typ}_token", None)
    for typ in ADDED:  # the file's flags; unset ones stay unset in the export
        flag = _field(reader, f"tokenizer.ggml.add_{typ}_token")
        config[f"add_{typ}_token"] = flag if isinstance(flag, bool) else None
    config[GGUF_MARK] = mark
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return True
