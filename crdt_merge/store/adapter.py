"""LoRA / PEFT adapters as contributions: read, check, store as their own factors.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``). It is stored as an **adapter manifest** (specs/formats.md,
"Adapter manifests"): the factor tensors under their PEFT names, the config file, and in
``meta`` the adapter's meaning resolved once, at import, into a plain table::

    meta = {"adapter": "lora",
            "lora": {target: {"a": name, "b": name, "r": int, "alpha": decimal,
                              "rslora": bool, "transpose": bool}, ...},
            "replace": {target: name, ...}}

``target`` is the base model's tensor the module updates (``model.layers.0.self_attn.
q_proj.weight``); ``a``/``b`` name the ``lora_A``/``lora_B`` tensors; ``r`` and ``alpha``
are the module's rank and alpha after ``rank_pattern``/``alpha_pattern``; ``transpose`` is
``fan_in_fan_out`` (and always true for an embedding's ``lora_embedding_A/B``);
``replace`` maps a base tensor to the full tensor that ``modules_to_save`` replaces it
with. The PEFT config's patterns (regular expressions) are evaluated only here, on the
contributor's machine; every replica reads the table, and :func:`adapter_table` checks it
against the base (shapes, ranks, every tensor used) without running a pattern.

Anything whose maths is not ``scale * B @ A`` is refused by name: DoRA, bias training,
LoRA on raw parameters, trainable tokens, other PEFT types and initialisations that change
the base (PiSSA, OLoRA, LoftQ...).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdt_merge import codec
from crdt_merge.dtypes import FLOATS
from crdt_merge.errors import ModelImportError
from crdt_merge.store.manifests import Manifest

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

#: config keys read here, each with the values it may take (None: any)
_READ = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
         "fan_in_fan_out", "modules_to_save", "target_modules", "bias", "use_dora",
         "init_lora_weights", "lora_bias"}
#: keys that do not change the merged weights (training, bookkeeping, which modules got
#: an adapter: the saved tensors say that)
_INERT = {"auto_mapping", "base_model_name_or_path", "inference_mode", "lora_dropout",
          "peft_version", "revision", "task_type", "layers_pattern", "layers_to_transform",
          "exclude_modules", "megatron_core", "qalora_group_size", "ensure_weight_tying"}
#: names the refusal uses for well-known keys that change the maths
_FEATURES = {"use_dora": "DoRA (use_dora)", "lora_bias": "LoRA bias (lora_bias)",
             "target_parameters": "LoRA on parameters (target_parameters)",
             "trainable_token_indices": "trainable tokens (trainable_token_indices)",
             "layer_replication": "layer replication (layer_replication)",
             "use_qalora": "QA-LoRA (use_qalora)", "loftq_config": "LoftQ (loftq_config)",
             "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
             "use_bdlora": "BD-LoRA (use_bdlora)", "megatron_config": "Megatron layers"}
_INITS = (True, False, "gaussian")

_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.weight)?")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module of an adapter manifest's table, checked."""

    target: str
    a: str
    b: str
    rank: int
    alpha: float
    rslora: bool
    transpose: bool


@dataclass(frozen=True)
class AdapterTable:
    """The checked table of an adapter manifest: LoRA modules and full replacements, each
    keyed by the base tensor it changes."""

    lora: Mapping[str, LoraModule]
    replace: Mapping[str, str]


def is_adapter(manifest: Manifest) -> bool:
    return manifest.meta.get("adapter") is not None


def is_peft_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def _refuse(path: object, msg: str) -> ModelImportError:
    return ModelImportError(f"{path}: {msg}")


def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def read_config(path: Path, data: bytes) -> dict[str, Any]:
    """``adapter_config.json`` parsed and checked: a LoRA adapter whose update is
    ``scale * B @ A``, or a refusal that names the feature.

    Raises:
        ModelImportError: not JSON, another PEFT type, or a feature that changes the maths.
    """
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        raise _refuse(path, "adapter_config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise _refuse(path, "adapter_config.json is not a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise _refuse(path, f"PEFT type {kind!r} is not supported: only LORA adapters "
                            "(scale * B @ A) can be contributed")
    if config.get("bias", "none") != "none":
        raise _refuse(path, f"bias training (bias={config.get('bias')!r}) is not supported: "
                            "only adapters with bias='none'")
    for key, name in _FEATURES.items():
        if not _empty(config.get(key)):
            raise _refuse(path, f"{name} is not supported: its weight update is not "
                                "scale * B @ A")
    init = config.get("init_lora_weights", True)
    if init not in _INITS:
        raise _refuse(path, f"init_lora_weights={init!r} is not supported: it changes the "
                            "base weights (convert the adapter to plain LoRA first)")
    for key in sorted(set(config) - _READ - _INERT - set(_FEATURES)):
        if not _empty(config[key]):
            raise _refuse(path, f"adapter_config.json sets {key}={config[key]!r}, a PEFT "
                                "feature crdt-merge does not materialise")
    r = config.get("r")
    alpha = config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise _refuse(path, f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise _refuse(path, f"lora_alpha must be a finite number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise _refuse(path, f"{key} must be a map of module patterns")
        config[key] = value
    mts = config.get("modules_to_save") or []
    if not isinstance(mts, list) or not all(isinstance(m, str) and m for m in mts):
        raise _refuse(path, "modules_to_save must be a list of module names")
    return config


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first pattern (in the file's order) that matches the end of the
    module name at a dot boundary, ``(.*\\.)?(pattern)$``; else the default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def build_table(path: Path, config: Mapping[str, Any], tensors: Mapping[str, tuple[str, tuple[int, ...]]],
                ) -> dict[str, Any]:
    """The adapter manifest's ``meta`` from the checked config and the adapter file's
    tensors (``name -> (dtype, shape)``).

    Raises:
        ModelImportError: a tensor that is neither a LoRA factor nor under
            ``modules_to_save`` (a trained bias, DoRA's magnitude...), a factor without its
            pair, or a rank that differs from the config's.
    """
    pairs: dict[str, dict[str, str]] = {}
    replace: dict[str, str] = {}
    for name in sorted(tensors):
        if not name.startswith(PREFIX):
            raise _refuse(path, f"tensor {name!r} does not start with {PREFIX!r} (not a PEFT "
                                "adapter file)")
        rest = name[len(PREFIX):]
        if "lora_magnitude_vector" in rest:
            raise _refuse(path, f"DoRA (tensor {name}) is not supported: its weight update is "
                                "not scale * B @ A")
        m = _LORA_KEY.fullmatch(rest)
        if m:
            pairs.setdefault(m["module"], {})[m["kind"]] = name
            continue
        module = rest.rpartition(".")[0]
        if any(module == s or module.endswith("." + s) for s in config["modules_to_save"]):
            if dtype_of(tensors, name) not in _FLOATS:
                raise _refuse(path, f"tensor {name} ({dtype_of(tensors, name)}) is not a float tensor")
            replace[rest] = name
            continue
        raise _refuse(path, f"tensor {name!r} is neither a LoRA factor nor under "
                            "modules_to_save (a trained bias or another PEFT feature)")
    lora: dict[str, Any] = {}
    for module in sorted(pairs):
        kinds = pairs[module]
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if set(kinds) != {a_kind, b_kind}:
            raise _refuse(path, f"module {module}: LoRA factors {sorted(kinds)} (expected "
                                f"{a_kind} and {b_kind})")
        a, b = kinds[a_kind], kinds[b_kind]
        rank = _pattern_value(config["rank_pattern"], module, config["r"])
        alpha = _pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise _refuse(path, f"module {module}: rank {rank!r} is not a positive integer")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise _refuse(path, f"module {module}: lora_alpha {alpha!r} is not a finite number")
        target = module + ".weight"
        if target in replace:
            raise _refuse(path, f"{target} is both LoRA-adapted and in modules_to_save")
        lora[target] = {"a": a, "b": b, "r": rank, "alpha": codec.canonical_decimal(alpha),
                        "rslora": bool(config.get("use_rslora", False)),
                        "transpose": embedding or bool(config.get("fan_in_fan_out", False))}
    if not lora and not replace:
        raise _refuse(path, "the adapter holds no LoRA factors")
    return {"adapter": "lora", "lora": lora, "replace": replace}


_FLOATS = FLOATS  # the one table: crdt_merge/dtypes.py


def dtype_of(tensors: Mapping[str, tuple[str, tuple[int, ...]]], name: str) -> str:
    return tensors[name][0]


def adapter_table(adapter: Manifest, base: Manifest | None) -> AdapterTable:
    """Check an adapter manifest's table (its ``meta``) and return it; with ``base``, also
    against the base's tensors. Pure: the same answer on every replica.

    Checks: the table's form; every tensor it names exists, is a float tensor and is used
    exactly once, and no other tensor is in the manifest; ``A`` is ``(r, in)`` and ``B``
    ``(out, r)`` with the table's ``r``; the target is a base tensor of shape ``(out, in)``
    (``(in, out)`` with ``transpose``); a replacement has its target's shape.

    Raises:
        ModelImportError: the first problem found, named.
    """
    meta = adapter.meta
    if meta.get("adapter") != "lora":
        raise ModelImportError(f"adapter kind {meta.get('adapter')!r} is not supported (only lora)")
    lora_raw, replace_raw = meta.get("lora"), meta.get("replace")
    if not isinstance(lora_raw, dict) or not isinstance(replace_raw, dict):
        raise ModelImportError("adapter table: lora and replace must be maps")
    used: dict[str, str] = {}

    def use(name: object, target: str) -> str:
        if not isinstance(name, str) or name not in adapter.tensors:
            raise ModelImportError(f"adapter table: {target} names tensor {name!r}, which the "
                                   "adapter lacks")
        if name in used:
            raise ModelImportError(f"adapter table: tensor {name} is used twice")
        if adapter.tensors[name].dtype not in _FLOATS:
            raise ModelImportError(f"adapter tensor {name} is {adapter.tensors[name].dtype}, "
                                   "not a float tensor")
        used[name] = target
        return name

    lora: dict[str, LoraModule] = {}
    for target, entry in sorted(lora_raw.items()):
        if not isinstance(entry, dict) or set(entry) != {"a", "b", "r", "alpha", "rslora", "transpose"}:
            raise ModelImportError(f"adapter table: {target}: expected a, b, r, alpha, rslora, transpose")
        rank, alpha = entry["r"], entry["alpha"]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank < 2**31:
            raise ModelImportError(f"adapter table: {target}: r must be a positive integer")
        if not isinstance(alpha, str) or not codec.is_canonical_decimal(alpha):
            raise ModelImportError(f"adapter table: {target}: alpha must be a canonical decimal")
        alpha_f = float(alpha)
        if not math.isfinite(alpha_f):
            raise ModelImportError(f"adapter table: {target}: alpha is out of range")
        if not isinstance(entry["rslora"], bool) or not isinstance(entry["transpose"], bool):
            raise ModelImportError(f"adapter table: {target}: rslora and transpose are booleans")
        mod = LoraModule(target, use(entry["a"], target), use(entry["b"], target), rank, alpha_f,
                         entry["rslora"], entry["transpose"])
        a, b = adapter.tensors[mod.a].shape, adapter.tensors[mod.b].shape
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise ModelImportError(f"adapter module {target}: A {list(a)} and B {list(b)} are "
                                   f"not (r, in) and (out, r) with r = {rank}")
        if base is not None:
            want = (a[1], b[0]) if mod.transpose else (b[0], a[1])
            rec = base.tensors.get(target)
            if rec is None:
                raise ModelImportError(f"adapter module {target}: the base has no tensor "
                                       f"{target}; is the base the model the adapter was trained on?")
            if tuple(rec.shape) != want:
                raise ModelImportError(f"adapter module {target}: its delta is {list(want)}, the "
                                       f"base tensor is {list(rec.shape)}; is the base the model "
                                       "the adapter was trained on?")
        lora[target] = mod
    replace: dict[str, str] = {}
    for target, name in sorted(replace_raw.items()):
        if target in lora:
            raise ModelImportError(f"adapter table: {target} is both adapted and replaced")
        replace[target] = use(name, target)
        if base is not None:
            rec = base.tensors.get(target)
            if rec is None or tuple(rec.shape) != tuple(adapter.tensors[name].shape):
                raise ModelImportError(
                    f"adapter replacement {target}: shape {list(adapter.tensors[name].shape)}, "
                    f"the base's is {None if rec is None else list(rec.shape)}")
    extra = sorted(set(adapter.tensors) - set(used))
    if extra:
        raise ModelImportError(f"adapter tensor {extra[0]} is not named by the adapter table")
    if not lora and not replace:
        raise ModelImportError("the adapter changes no tensor")
    return AdapterTable(lora, replace)
