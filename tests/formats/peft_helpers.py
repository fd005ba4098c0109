"""LoRA adapters made with PEFT over the tiny models, with fixed non-zero factors (PEFT
starts B at zero), and PEFT's own merge of them, the oracle of the adapter tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.fixtures.tiny_models import _values, model_class

SCALE = 0.25  # factors in +-0.25: a visible delta of a trained adapter's size


def _load(base: Path) -> torch.nn.Module:
    import json
    config = json.loads((base / "config.json").read_text())
    return model_class(config).from_pretrained(base, dtype=torch.float32).eval()


def make_adapter(base: Path, out: Path, seed: int, **lora: Any) -> Path:
    """A PEFT LoRA adapter of the model in ``base``, saved into ``out``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_load(base), LoraConfig(**lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(_values(seed, name, tuple(param.shape)) * SCALE)
            elif "modules_to_save" in name:
                param.add_(_values(seed, name, tuple(param.shape)) * SCALE)
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's ``merge_and_unload()`` of the adapter onto the base: its state dict."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(_load(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_scalings(base: Path, adapter: Path) -> dict[str, float]:
    """Each LoRA module's ``scaling`` as PEFT computed it, by the base weight it updates."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(base), adapter)
    out = {}
    for name, module in model.base_model.model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            out[name + ".weight"] = float(scaling["default"])
    return out
