"""A mergekit YAML run through both tools gives the same tensors; unsupported features refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from crdt_merge.cli.main import main
from tests.fixtures.tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[2]
MERGEKIT_YAML = ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"
needs_mergekit = pytest.mark.skipif(not MERGEKIT_YAML.exists(),
                                    reason="the mergekit oracle env is absent: run make mergekit-env")


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118
                out[k] = st.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mk-models")
    return {name: make_tiny("llama", root / name, seed=seed)
            for name, seed in (("base", 0), ("m1", 1), ("m2", 2))}


CASES = {
    "linear": ("linear", None, [{"weight": 0.6}, {"weight": 0.4}], {}),
    "task_arithmetic": ("task_arithmetic", "base", [{"weight": 0.7}, {"weight": 0.5}],
                        {"lambda": 0.9}),
    "ties": ("ties", "base", [{"weight": 1.0, "density": 0.6}, {"weight": 0.5, "density": 0.4}],
             {"normalize": True}),
    "slerp": ("slerp", "base", [{}], {"t": 0.3}),
    # mergekit's newer methods (issue 16)
    "sce": ("sce", "base", [{}, {}], {"select_topk": 0.5}),
    "ramplus_tl": ("ramplus_tl", "base", [{}, {}], {"epsilon": 0.01}),
    "nearswap": ("nearswap", "base", [{}], {"t": 0.01}),
    "arcee_fusion": ("arcee_fusion", "base", [{}], {}),
    "ram": ("ram", "base", [{}, {}], {"epsilon": 0.01}),
}


def write_yaml(path: Path, tiny: dict[str, Path], method: str, base: str | None,
               per_model: list[dict], params: dict) -> None:
    import yaml

    donors = ["m1", "m2"][: len(per_model)]
    models = [{"model": str(tiny[d]), "parameters": p} if p else {"model": str(tiny[d])}
              for d, p in zip(donors, per_model, strict=True)]
    if method == "slerp":
        models = [{"model": str(tiny["base"])}, {"model": str(tiny["m1"])}]
    config = {"merge_method": method, "models": models, "dtype": "float32"}
    if base:
        config["base_model"] = str(tiny[base])
    if params:
        config["parameters"] = params
    path.write_text(yaml.safe_dump(config))


@needs_mergekit
@pytest.mark.mergekit
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit_yaml(tiny, tmp_path: Path, capsys, case: str) -> None:
    method, base, per_model, params = CASES[case]
    config = tmp_path / "merge.yml"
    write_yaml(config, tiny, method, base, per_model, params)
    proc = subprocess.run([str(MERGEKIT_YAML), str(config), str(tmp_path / "mk"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    assert main(["--json", "recipe", replica, "--from-mergekit", str(config)]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(["--json", "resolve", replica, "--out", str(tmp_path / "ours"), "--workers", "1"]) == 0
    ours, theirs = tensors_of(tmp_path / "ours"), tensors_of(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name in sorted(theirs):
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
        diff = (ours[name].double() - theirs[name].double()).abs().max().item()
        assert diff <= 1e-6, (name, diff)
    # running the same YAML again adds no op
    before = json.loads(_status(replica, capsys))["ops"]
    assert main(["recipe", replica, "--from-mergekit", str(config)]) == 0
    capsys.readouterr()
    assert json.loads(_status(replica, capsys))["ops"] == before


def _status(replica: str, capsys) -> str:
    capsys.readouterr()
    assert main(["--json", "status", replica]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("extra, feature", [
    ({"slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}]}]}, "slices"),
    ({"tokenizer_source": "union"}, "tokenizer source"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_unsupported_features_are_refused_by_name(tiny, tmp_path: Path, capsys, extra, feature) -> None:
    import yaml

    config = {"merge_method": "linear", "models": [{"model": str(tiny["m1"]),
                                                    "parameters": {"weight": 1.0}}], **extra}
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    capsys.readouterr()
    assert main(["recipe", replica, "--from-mergekit", str(path)]) == 2
    err = capsys.readouterr().err
    assert feature in err and err.count("\n") == 1
    assert json.loads(_status(replica, capsys))["ops"] == 1  # nothing but the genesis


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "clipped", "krum", "multi_krum"])
def test_robust_methods_are_refused_by_name(tiny, tmp_path: Path, capsys, method) -> None:
    """mergekit has no robust aggregators, so a mergekit file naming one is not mergekit's."""
    import yaml

    config = {"merge_method": method, "base_model": str(tiny["base"]),
              "models": [{"model": str(tiny["m1"])}, {"model": str(tiny["m2"])}]}
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    capsys.readouterr()
    assert main(["recipe", replica, "--from-mergekit", str(path)]) == 2
    err = capsys.readouterr().err
    assert repr(method) in err and "mergekit has no such method" in err
    assert json.loads(_status(replica, capsys))["ops"] == 1  # nothing but the genesis
