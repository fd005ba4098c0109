"""GGUF in and out, for the families with a GGUF name mapping: llama, qwen2, gemma3.

In (:func:`gguf_to_folder`, :func:`import_gguf`): every tensor is dequantised to float32 by
the GGUF rules (the ``gguf`` package's reference dequantisers), named back to its Hugging
Face name, the q/k permutation llama.cpp applies to Llama undone, Gemma's stored norm
offset (``w + 1``) taken off, and a config.json rebuilt from the GGUF metadata; the
tokenizer is rebuilt by transformers' GGUF tokenizer conversion when transformers is
installed, and the GGUF's own vocabulary kept beside it (a SentencePiece one as
tokenizer.model; :mod:`crdt_merge.formats.gguf_vocab`). The result is an ordinary model
folder, imported like any other; its manifest's
``meta`` says ``dequantized_from`` (the GGUF tensor types), and the model card repeats it.

Out (:func:`write_gguf`): a resolved model folder (config.json, safetensors, tokenizer
files) written as one GGUF file of type ``f32``, ``f16``, ``bf16`` or ``q8_0`` (the names
and the permutation forward, tokenizer metadata as llama.cpp's converter writes them from
tokenizer.model or a byte-level tokenizer.json; any other tokenizer, or none, refused
unless ``tokenizer=False``). Tensors are added in
a fixed order and every value is a function of the folder's bytes, so the same checkpoint
gives the same GGUF bytes (specs/formats.md, "GGUF").
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from crdt_merge.errors import ModelImportError
from crdt_merge.formats.gguf_vocab import keep_gguf_tokenizer, tokenizer_metadata

FAMILIES = ("llama", "qwen2", "gemma3")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

#: GGUF name of a block tensor (after ``blk.N.``) -> Hugging Face name (after ``model.layers.N.``)
_BLOCK_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK = {
    "llama": {**_BLOCK_COMMON, "ffn_norm": "post_attention_layernorm"},
    "qwen2": {**_BLOCK_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {**_BLOCK_COMMON, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
#: the transformers model type and class of each GGUF architecture
_HF = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
       "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
_ARCH_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3",
            "gemma3": "gemma3"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:  # pragma: no cover - the extra is not installed
        raise ModelImportError("GGUF needs the gguf package: pip install "
                               "'crdt-model-merge[gguf]'") from None
    return gguf


def hf_name(arch: str, name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name, or None when it has none."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK[arch]:
        return f"model.layers.{int(parts[1])}.{_BLOCK[arch][parts[2]]}.{kind}"
    return None


def gguf_name(arch: str, name: str) -> str | None:
    """The GGUF name of a Hugging Face tensor name, or None when it has none."""
    stem, _, kind = name.rpartition(".")
    for g, h in _GLOBAL.items():
        if stem == h:
            return f"{g}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for g, h in _BLOCK[arch].items():
            if parts[3] == h:
                return f"blk.{int(parts[2])}.{g}.{kind}"
    return None


def _permute(w: np.ndarray, heads: int, forward: bool) -> np.ndarray:
    """llama.cpp's q/k row order for Llama (forward: Hugging Face -> GGUF): within each
    head, the rotary pairs (i, i + d/2) become adjacent rows (2i, 2i + 1)."""
    half = w.shape[0] // heads // 2
    rest = w.shape[1:]
    if forward:
        return w.reshape(heads, 2, half, *rest).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _is_gemma_norm(arch: str, name: str) -> bool:
    return arch == "gemma3" and name.endswith("norm.weight")


# -- GGUF in -----------------------------------------------------------------------------------

def _fields(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in (
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.model"):
            continue  # long lists, read by the tokenizer conversion
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field type the reader cannot show is skipped
            continue
    return out


def _config(arch: str, meta: Mapping[str, Any], names: set[str], vocab: int) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    model_type, cls = _HF[arch]
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    config: dict[str, Any] = {
        "architectures": [cls], "model_type": model_type,
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    theta = get("rope.freq_base")
    if theta is not None:
        config["rope_theta"] = float(theta)
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("padding_token_id", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf] = int(value)
    if arch == "qwen2":
        config["attention_bias"] = True
    if arch == "gemma3":
        config["query_pre_attn_scalar"] = _query_pre_attn_scalar(get("attention.scale"), config)
        window = get("attention.sliding_window")
        if window is not None:
            config["sliding_window"] = int(window)
        config["hidden_activation"] = "gelu_pytorch_tanh"
    return config


def _llama_cpp_scalar(config: Mapping[str, Any]) -> int:
    """The query scaling llama.cpp derives for a gemma3 GGUF (it reads no key for it):
    ``hidden / heads`` for the 62-layer 27B model, else ``head_dim``."""
    if int(config["num_hidden_layers"]) == 62:
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return int(config["head_dim"])


def _query_pre_attn_scalar(scale: Any, config: Mapping[str, Any]) -> int | float:
    """Gemma 3's ``query_pre_attn_scalar`` from a GGUF: ``1 / scale**2`` when the file has
    ``gemma3.attention.scale`` (the attention multiplier, ``1/sqrt(query_pre_attn_scalar)``;
    an integer when it is one within float32's precision), else what llama.cpp derives."""
    if scale is None:
        return _llama_cpp_scalar(config)
    scale = float(scale)
    if not scale > 0 or scale == float("inf"):
        raise ModelImportError(f"gemma3.attention.scale {scale!r} is not a positive number")
    value = 1.0 / (scale * scale)
    nearest = round(value)
    return nearest if nearest > 0 and abs(value - nearest) <= 1e-5 * nearest else value


def gguf_to_folder(path: Path, out: Path) -> dict[str, Any]:
    """Write the model of a GGUF file as a Hugging Face folder in ``out`` (see the module
    docstring); return what the import records: the architecture and the GGUF types.

    Raises:
        ModelImportError: not a GGUF file, an architecture without a mapping, a tensor
            that has no Hugging Face name, or a type the dequantisers do not know.
    """
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ModelImportError(f"{path}: not a readable GGUF file ({exc})") from None
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        raise ModelImportError(f"{path}: GGUF architecture {arch!r} is not supported "
                               f"(supported: {', '.join(FAMILIES)})")
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelImportError(f"{path}: no token_embd.weight")
    config = _config(arch, meta, names, int(embd.shape[1]))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    types: set[str] = set()
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # computed from the config's rope settings
        name = hf_name(arch, t.name)
        if name is None:
            raise ModelImportError(f"{path}: GGUF tensor {t.name!r} has no Hugging Face name "
                                   f"for {arch}")
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelImportError(f"{path}: tensor {t.name}: GGUF type "
                                   f"{t.tensor_type.name} cannot be dequantised") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
        if arch == "llama" and ".attn_q." in t.name:
            values = _permute(values, heads, forward=False)
        elif arch == "llama" and ".attn_k." in t.name:
            values = _permute(values, kv_heads, forward=False)
        if _is_gemma_norm(arch, name):
            values = values - np.float32(1)  # GGUF stores Gemma's norms as 1 + w
        tensors[name] = np.ascontiguousarray(values)
        types.add(t.tensor_type.name)
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer = _tokenizer_files(path, out)
    kept = keep_gguf_tokenizer(reader, out)
    return {"architecture": arch, "dequantized_from": sorted(types),
            "tokenizer": tokenizer or kept}


def _tokenizer_files(path: Path, out: Path) -> bool:
    """The tokenizer as transformers rebuilds it from the GGUF metadata (saved into
    ``out``); False when transformers is missing or the GGUF has no tokenizer. The GGUF's
    own vocabulary is kept beside it (:func:`crdt_merge.formats.gguf_vocab.keep_gguf_tokenizer`)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return False
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:  # noqa: BLE001 - a GGUF without (a convertible) tokenizer
        return False
    tok.save_pretrained(str(out))
    return True


def import_gguf(store: Any, source: str, piece_size: int) -> Any:
    """Import a GGUF file: :func:`gguf_to_folder` into a temporary folder, then the
    ordinary import, with ``meta`` recording the source format and the GGUF types."""
    from crdt_merge.store.importer import import_model

    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelImportError(f"{source}: no such GGUF file")
    with tempfile.TemporaryDirectory(prefix="crdt-merge-gguf-") as tmp:
        info = gguf_to_folder(path, Path(tmp))
        meta = {"source_format": "gguf", "dequantized_from": info["dequantized_from"]}
        imported = import_model(store, tmp, piece_size, meta)
    return imported


# -- GGUF out ----------------------------------------------------------------------------------

def _out_type(gguf: Any, kind: str, name: str, shape: tuple[int, ...]) -> Any:
    """The GGUF type of one tensor for an export of ``kind``: 1-D tensors (norms, biases)
    stay F32, as llama.cpp keeps them; q8_0 needs rows a multiple of 32 (else F16)."""
    q = gguf.GGMLQuantizationType
    if kind == "f32" or len(shape) < 2:
        return q.F32
    if kind == "f16":
        return q.F16
    if kind == "bf16":
        return q.BF16
    return q.Q8_0 if shape[-1] % 32 == 0 else q.F16


def _encode(gguf: Any, values: np.ndarray, qtype: Any) -> np.ndarray:
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return values
    if qtype == q.F16:
        return values.astype(np.float16)  # round to nearest even
    return gguf.quants.quantize(values, qtype)


def write_gguf(folder: Path, out: Path, kind: str = "f16", *,
               tokenizer: bool = True) -> dict[str, Any]:
    """Write the model folder as a GGUF file (see the module docstring); with
    ``tokenizer=False``, on purpose without tokenizer metadata.

    Raises:
        PlanError: an unsupported family or export type, a tensor without a GGUF name, a
            tokenizer the export cannot describe (or none, unless ``tokenizer=False``), a
            gemma3 ``query_pre_attn_scalar`` llama.cpp would not use.
    """
    from crdt_merge.errors import PlanError

    if kind not in GGUF_TYPES:
        raise PlanError(f"GGUF type {kind!r}: use one of {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    config = json.loads((folder / "config.json").read_text())
    arch = _ARCH_OF.get(config.get("model_type", ""))
    if arch is None:
        raise PlanError(f"GGUF export supports {', '.join(FAMILIES)}; this model is "
                        f"{config.get('model_type')!r}")
    if arch == "gemma3":
        scalar = config.get("query_pre_attn_scalar")
        derived = _llama_cpp_scalar({**config, "head_dim": config.get("head_dim")
                                     or int(config["hidden_size"]) // int(config["num_attention_heads"])})
        if scalar is not None and scalar != derived:
            raise PlanError(f"gemma3 query_pre_attn_scalar {scalar}: llama.cpp and transformers "
                            f"read no GGUF key for it and would run this model with {derived}; "
                            "GGUF export refuses rather than write a file they run wrongly")
    if tokenizer:
        from crdt_merge.formats.gguf_vocab import describe_tokenizer
        describe_tokenizer(folder, arch)  # refuse before any work
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer = gguf.GGUFWriter(str(out), arch, use_temp_file=False)
    writer.add_name("crdt-merge output")
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    theta = config.get("rope_theta")
    if theta is None:
        params = config.get("rope_parameters") or {}
        params = params.get("full_attention", params)
        theta = params.get("rope_theta")
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if arch == "gemma3" and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    written = tokenizer_metadata(writer, folder, arch, config) if tokenizer else "none"
    types: dict[str, str] = {}
    for name in sorted(tensors, key=lambda n: (gguf_name(arch, n) or "", n)):
        target = gguf_name(arch, name)
        if target is None:
            raise PlanError(f"tensor {name} has no GGUF name for {arch}")
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        values = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if arch == "llama" and ".self_attn.q_proj." in name:
            values = _permute(values, heads, forward=True)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            values = _permute(values, kv_heads, forward=True)
        if _is_gemma_norm(arch, name):
            values = values + np.float32(1)
        qtype = _out_type(gguf, kind, name, values.shape)
        writer.add_tensor(target, _encode(gguf, np.ascontiguousarray(values), qtype),
                          raw_dtype=qtype)
        types[target] = qtype.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "type": kind, "tokenizer": written,
            "tensors": len(types)}


def file_digest(path: Path) -> str:
    """BLAKE3 of a file's bytes, read in blocks (the GGUF hash the merge manifest records)."""
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def export_gguf(folder: Path, out: Path, kind: str = "f16", *,
                tokenizer: bool = True) -> dict[str, Any]:
    """Write a resolved checkpoint folder as the GGUF file ``out`` (outside the folder:
    the checkpoint id covers every file of the folder, and the GGUF is another rendering
    of the same checkpoint) and record it in the folder's ``merge_manifest.json`` beside
    the checkpoint id: ``"gguf": {"file", "type", "blake3", "size", "tokenizer"}``.

    Raises:
        PlanError: see :func:`write_gguf`; ``out`` inside ``folder``.
    """
    from crdt_merge.errors import PlanError

    if out.resolve().parent == folder.resolve():
        raise PlanError(f"{out}: write the GGUF file outside the checkpoint folder (every file "
                        "inside it is part of the checkpoint id)")
    tmp = out.with_name(out.name + ".part")
    info = write_gguf(folder, tmp, kind, tokenizer=tokenizer)
    _durable_replace(tmp, out)  # the bytes durable before the name, the name after
    record = {"file": out.name, "type": kind, "blake3": file_digest(out),
              "size": out.stat().st_size, "tokenizer": info["tokenizer"]}
    receipt = folder / "merge_manifest.json"
    if receipt.is_file():
        data = json.loads(receipt.read_text())
        data["gguf"] = record
        part = receipt.with_name(receipt.name + ".part")
        part.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        _durable_replace(part, receipt)  # never a torn receipt
    return record


def _durable_replace(tmp: Path, target: Path) -> None:
    """fsync ``tmp``, rename it to ``target``, fsync the directory (that order)."""
    from crdt_merge.store.objects import fsync_dir

    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_dir(target.parent)
