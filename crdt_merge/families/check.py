"""``crdt-merge families check``: detect a model's family and prove its round trip lossless."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

if TYPE_CHECKING:
    from torch import Tensor

from crdt_merge.errors import ModelImportError
from crdt_merge.families.canonical import CanonicalModel
from crdt_merge.families.detect import detect
from crdt_merge.families.fused import same_bits
from crdt_merge.lazy import torch

INDEX_FILE = "model.safetensors.index.json"


def load_folder(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``config.json`` and every tensor of a local model folder.

    The tensors come from ``model.safetensors.index.json``'s shards when the folder has
    one, else from every ``*.safetensors`` file in it.

    Raises:
        ModelImportError: no config, no safetensors, a shard missing, a name held twice.
    """
    root = Path(folder)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ModelImportError(f"{root} has no config.json; point at a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelImportError(f"{config_path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelImportError(f"{config_path} does not hold a JSON object")
    index_path = root / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({root / shard for shard in weight_map.values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelImportError(f"{root} holds no *.safetensors files")
    tensors: dict[str, Tensor] = {}
    for path in files:
        if not path.is_file():
            raise ModelImportError(f"{INDEX_FILE} names {path.name}, which {root} lacks")
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name in tensors:
                    raise ModelImportError(f"tensor {name} appears in two files of {root}")
                tensors[name] = handle.get_tensor(name)
    return config, tensors


def compare(original: Mapping[str, Tensor], rebuilt: Mapping[str, Tensor]) -> dict[str, Any]:
    """The round-trip verdict.

    ``changed`` lists the tensors whose bits differ (``reshaped`` those among them whose
    shape or dtype differs); ``max_abs_diff`` is the largest absolute difference among the
    others, in float64, ignoring NaN. Lossless means no missing, extra or changed tensor.
    """
    missing = sorted(set(original) - set(rebuilt))
    extra = sorted(set(rebuilt) - set(original))
    changed = []
    reshaped = []
    worst = 0.0
    for name in sorted(set(original) & set(rebuilt)):
        a, b = original[name], rebuilt[name]
        if same_bits(a, b):
            continue
        changed.append(name)
        if a.shape != b.shape or a.dtype != b.dtype:
            reshaped.append(name)
            continue
        diff = (a.to(torch.float64) - b.to(torch.float64)).abs()
        finite = diff[~torch.isnan(diff)]
        if finite.numel():
            worst = max(worst, float(finite.max()))
    return {
        "max_abs_diff": worst,
        "missing": missing,
        "extra": extra,
        "changed": changed,
        "reshaped": reshaped,
        "lossless": not (missing or extra or changed),
    }


def report(model: CanonicalModel) -> dict[str, Any]:
    """The JSON-able description of a canonical model: mapping, classes, ties, leftovers."""
    by_native: dict[str, list[str]] = {}
    for canonical, native in model.native_names.items():
        by_native.setdefault(native, []).append(canonical)
    mapping = [
        {"native": native, "canonical": sorted(names),
         "shape": [list(model.tensors[n].shape) for n in sorted(names)]}
        for native, names in sorted(by_native.items())
    ]
    return {
        "family": model.family,
        "prefix": model.prefix,
        "layers": model.layers,
        "classes": model.classes,
        "mapping": mapping,
        "ties": model.ties,
        "aliases": model.aliases,
        "unmapped": sorted(model.unmapped),
    }


def check(
    source: str | os.PathLike[str] | Mapping[str, Tensor],
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Detect the family of a model and run native -> canonical -> native on it.

    Args:
        source: a model folder, or a mapping of native tensor names to tensors.
        config: the model's config.json as a dict; required with a mapping, ignored with
            a folder (whose own config.json is read).

    Returns:
        ``report()`` of the canonical model plus ``model_type``, ``tensors`` (the native
        count) and ``round_trip`` (``compare()`` of the original and the rebuilt tensors).

    Raises:
        UnknownFamily: no supported family fits.
        ModelImportError: the folder or a fused tensor cannot be read as the family says.
    """
    if isinstance(source, (str, os.PathLike)):
        config, tensors = load_folder(source)
    else:
        if config is None:
            raise TypeError("check(tensors, config): config is required with tensors")
        tensors = dict(source)
    family = detect(config, tensors)
    model = family.to_canonical(tensors, config)
    rebuilt = family.from_canonical(model)
    out = {"model_type": config.get("model_type"), "tensors": len(tensors)}
    out.update(report(model))
    out["round_trip"] = compare(tensors, rebuilt)
    return out
