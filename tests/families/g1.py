"""Gate G1 helpers: rebuild a model folder through the canonical namespace and run it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from crdt_merge.families import compare, detect, load_folder
from tests.fixtures.tiny_models import model_class, sample_inputs

_SIDE_FILES = ("config.json", "generation_config.json")


def rebuild(folder: Path, out: Path) -> dict[str, Any]:
    """native -> canonical -> native into ``out`` (one safetensors file plus the config);
    returns :func:`crdt_merge.families.compare` of the original and rebuilt tensors."""
    config, tensors = load_folder(folder)
    family = detect(config, tensors)
    native = family.from_canonical(family.to_canonical(tensors, config))
    out.mkdir(parents=True, exist_ok=True)
    save_file(native, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in _SIDE_FILES:
        if (folder / name).exists():
            shutil.copy(folder / name, out / name)
    return compare(tensors, native)


def outputs(folder: Path, config: dict[str, Any]) -> torch.Tensor:
    """The logits (or, for a model without a head, the last hidden states) on fixed inputs."""
    model = model_class(config).from_pretrained(folder).eval()
    with torch.no_grad():
        result = model(**sample_inputs(config))
    return result.logits if getattr(result, "logits", None) is not None else result.last_hidden_state
