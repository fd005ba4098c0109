"""LoRA adapters: the exact float64 materialisation (golden vectors, fixed order, against
PEFT), adapters made with PEFT imported as their factors and checked against the base, and
the PEFT variants whose maths differs refused by name."""

from __future__ import annotations

import ast
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge.errors import ModelImportError
from crdt_merge.methods.lora import lora_delta, lora_scale
from crdt_merge.store.adapter import adapter_table
from crdt_merge.store.importer import import_adapter, import_model
from tests.formats.peft_helpers import make_adapter, peft_scalings

FOLDER = Path(__file__).resolve().parents[2] / "specs" / "vectors" / "lora"
VECTORS = json.loads((FOLDER / "lora.json").read_text())
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _unpack(hexstr: str, dtype: str, shape: list[int]) -> np.ndarray:
    raw = bytes.fromhex(hexstr)
    if dtype == "BF16":
        words = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return words.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype="<f4").reshape(shape)


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["name"])
def test_golden_vectors(case) -> None:
    a = _unpack(case["a"], case["dtype"], case["a_shape"])
    b = _unpack(case["b"], case["dtype"], case["b_shape"])
    scale = lora_scale(float(case["alpha"]), case["r"], case["rslora"])
    assert struct.pack("<d", scale).hex() == case["scale"]
    delta = lora_delta(a, b, scale, case["transpose"])
    assert list(delta.shape) == case["delta_shape"] and delta.dtype == np.float64
    assert delta.tobytes().hex() == case["delta"]


def test_vector_generator_is_independent_and_reproducible(tmp_path: Path) -> None:
    source = (FOLDER / "make_vectors.py").read_text()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert imported <= {"__future__", "json", "math", "struct", "sys", "pathlib"}
    subprocess.run([sys.executable, str(FOLDER / "make_vectors.py"), str(tmp_path)], check=True)
    assert (tmp_path / "lora.json").read_bytes() == (FOLDER / "lora.json").read_bytes()


def _sequential(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """The spec's sum, one Python float operation at a time."""
    a64, b64 = a.astype(np.float64).tolist(), b.astype(np.float64).tolist()
    out = np.empty((len(b64), len(a64[0])))
    for i in range(len(b64)):
        for j in range(len(a64[0])):
            s = b64[i][0] * a64[0][j]
            for k in range(1, len(a64)):
                s = s + b64[i][k] * a64[k][j]
            out[i, j] = scale * s
    return out


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 6), rows=st.integers(1, 70), cols=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1), spread=st.integers(0, 60))
def test_materialisation_is_the_fixed_order_sum(r, rows, cols, seed, spread) -> None:
    """Any shape (rows past one block of 64), values spread over many binades so that
    the order of the sum matters: equal to the spec's sequential sum, bit for bit."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((r, cols)) * 2.0 ** rng.integers(-spread, spread + 1, (r, cols))).astype(np.float32)
    b = (rng.standard_normal((rows, r)) * 2.0 ** rng.integers(-spread, spread + 1, (rows, r))).astype(np.float32)
    scale = lora_scale(7, r, bool(seed & 1))
    got = lora_delta(a, b, scale)
    assert got.tobytes() == _sequential(a, b, scale).tobytes()
    assert lora_delta(a, b, scale, True).tobytes() == np.ascontiguousarray(got.T).tobytes()


def test_order_is_part_of_the_result() -> None:
    """The vector "order matters": numpy's BLAS product gives another value."""
    a = np.array([[2.0**26], [1.0], [-(2.0**26)]], dtype=np.float32)
    b = np.array([[2.0**27, 1.0, 2.0**27]], dtype=np.float32)
    assert lora_delta(a, b, 1.0)[0, 0] == 0.0
    reordered = lora_delta(a[[0, 2, 1]], b[:, [0, 2, 1]], 1.0)
    assert reordered[0, 0] == 1.0


def test_scale_rules() -> None:
    assert lora_scale(16, 8, False) == 2.0
    assert lora_scale(16, 4, True) == 8.0
    assert lora_scale(7, 3, False) == 7 / 3
    assert lora_scale(8, 2, True) == 8 / math.sqrt(2)
    with pytest.raises(ValueError):
        lora_scale(8, 0, False)


# -- adapters made with PEFT ----------------------------------------------------------------

@pytest.fixture
def base(tiny_models) -> Path:
    return tiny_models.get("llama")


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
    dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
         rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3},
         alpha_pattern={"v_proj": 5}, modules_to_save=["lm_head"]),
], ids=["plain", "rslora", "patterns"])
def test_import_keeps_factors_and_peft_scales(replicas, base, tmp_path, lora) -> None:
    a = replicas[0]
    folder = make_adapter(base, tmp_path / "ad", 1, **lora)
    base_m = import_model(a.store, str(base), a.piece_size).manifest
    got = import_adapter(a.store, str(folder), a.piece_size, base_m)
    # stored as its own factors: the adapter's tensors, not base-sized deltas
    from safetensors import safe_open
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        assert set(got.manifest.tensors) == set(f.keys())
    assert "adapter_config.json" in got.manifest.files
    table = adapter_table(got.manifest, base_m)
    scalings = peft_scalings(base, folder)
    assert set(table.lora) == set(scalings)
    for target, mod in table.lora.items():
        assert lora_scale(mod.alpha, mod.rank, mod.rslora) == scalings[target], target
    assert set(table.replace) == ({"lm_head.weight"} if lora.get("modules_to_save") else set())


def test_gpt2_conv1d_adapter_is_transposed(replicas, tiny_models, tmp_path) -> None:
    a = replicas[0]
    gpt2 = tiny_models.get("gpt2")
    folder = make_adapter(gpt2, tmp_path / "ad", 2, r=2, lora_alpha=4, fan_in_fan_out=True,
                          target_modules=["c_attn", "c_proj"])
    base_m = import_model(a.store, str(gpt2), a.piece_size).manifest
    table = adapter_table(import_adapter(a.store, str(folder), a.piece_size, base_m).manifest, base_m)
    assert table.lora and all(m.transpose for m in table.lora.values())
    attn = table.lora["transformer.h.0.attn.c_attn.weight"]
    assert base_m.tensors[attn.target].shape == (32, 96)  # Conv1D: (in, out)


def _snapshot(replica) -> tuple:
    return tuple(replica.store.object_ids())


@pytest.mark.filterwarnings("ignore:.*lora_bias")
@pytest.mark.parametrize("lora,match", [
    (dict(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
    (dict(r=2, lora_alpha=4, target_modules=["q_proj"], bias="all"), "bias training"),
    (dict(r=2, lora_alpha=4, target_modules=["q_proj"], bias="lora_only"), "bias training"),
    (dict(r=2, lora_alpha=4, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
])
def test_variants_with_other_maths_are_refused_by_name(replicas, base, tmp_path, lora, match) -> None:
    a = replicas[0]
    folder = make_adapter(base, tmp_path / "ad", 3, **lora)
    base_m = import_model(a.store, str(base), a.piece_size).manifest
    before = _snapshot(a)
    with pytest.raises(ModelImportError, match=match):
        import_adapter(a.store, str(folder), a.piece_size, base_m)
    assert _snapshot(a) == before


def test_other_peft_types_are_refused_by_name(replicas, base, tmp_path) -> None:
    from peft import IA3Config, LoHaConfig, get_peft_model

    from tests.formats.peft_helpers import _load
    a = replicas[0]
    for i, config in enumerate([LoHaConfig(r=2, target_modules=["q_proj"]),
                                IA3Config(target_modules=["q_proj", "down_proj"],
                                          feedforward_modules=["down_proj"])]):
        folder = tmp_path / f"other{i}"
        get_peft_model(_load(base), config).save_pretrained(folder)
        with pytest.raises(ModelImportError, match=f"PEFT type '{config.peft_type.value}'"):
            import_adapter(a.store, str(folder), a.piece_size, None)


def test_dora_tensors_are_refused_even_if_the_config_hides_them(replicas, base, tmp_path) -> None:
    """A hostile contributor edits use_dora out of the config: the magnitude vectors still
    give the adapter away."""
    a = replicas[0]
    folder = make_adapter(base, tmp_path / "ad", 3, r=2, lora_alpha=4, target_modules=["q_proj"],
                          use_dora=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = False
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelImportError, match="DoRA"):
        import_adapter(a.store, str(folder), a.piece_size, None)


def test_adapter_for_another_base_is_refused(replicas, base, tiny_models, tmp_path) -> None:
    a = replicas[0]
    folder = make_adapter(base, tmp_path / "ad", 4, r=2, lora_alpha=4, target_modules=["q_proj"])
    other = tiny_models.get("llama", hidden_size=48, head_dim=12)
    other_m = import_model(a.store, str(other), a.piece_size).manifest
    before = _snapshot(a)
    with pytest.raises(ModelImportError, match="trained on"):
        import_adapter(a.store, str(folder), a.piece_size, other_m)
    assert _snapshot(a) == before
    # an unknown config key that would change the maths is refused by its name
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_fancy_new_thing"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelImportError, match="use_fancy_new_thing"):
        import_adapter(a.store, str(folder), a.piece_size, None)


def test_against_peft_delta_weight(base, tmp_path) -> None:
    """PEFT's own get_delta_weight (float32 matmul) agrees within float32 rounding."""
    from peft import PeftModel

    from tests.formats.peft_helpers import _load
    folder = make_adapter(base, tmp_path / "ad", 5, r=4, lora_alpha=8, target_modules=["q_proj"])
    model = PeftModel.from_pretrained(_load(base), folder)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight.detach().numpy()
    b = layer.lora_B["default"].weight.detach().numpy()
    ours = lora_delta(a, b, layer.scaling["default"])
    theirs = layer.get_delta_weight("default").detach().double().numpy()
    assert np.allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(ours, np.zeros_like(ours))


def _forged(manifest, **change):
    from crdt_merge.store.manifests import Manifest
    meta = json.loads(json.dumps(manifest.meta))
    next(iter(meta["lora"].values())).update(change.get("entry", {}))
    meta.update(change.get("meta", {}))
    tensors = dict(manifest.tensors)
    tensors.update(change.get("tensors", {}))
    return Manifest(manifest.piece_size, tensors, manifest.files, meta)


def test_forged_adapter_tables_are_refused(replicas, base, tmp_path) -> None:
    """A hostile contributor writes the manifest by hand: a table that lies about the rank,
    names a tensor twice, hides an extra tensor, or is not LoRA is refused by adapter_table,
    which every replica's plan runs."""
    a = replicas[0]
    folder = make_adapter(base, tmp_path / "ad", 6, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    base_m = import_model(a.store, str(base), a.piece_size).manifest
    good = import_adapter(a.store, str(folder), a.piece_size, base_m).manifest
    adapter_table(good, base_m)
    first = next(iter(good.meta["lora"].values()))
    second = list(good.meta["lora"].values())[1]
    cases = {
        "rank": dict(entry={"r": 3}),
        "twice": dict(entry={"a": second["a"]}),
        "missing": dict(entry={"b": "no.such.tensor"}),
        "alpha": dict(entry={"alpha": "1e3"}),
        "kind": dict(meta={"adapter": "dora"}),
        "extra": dict(tensors={"extra.weight": good.tensors[first["a"]]}),
        "int": dict(tensors={first["a"]: good.tensors[first["a"]].__class__(
            "I32", good.tensors[first["a"]].shape, good.tensors[first["a"]].pieces)}),
    }
    for change in cases.values():
        with pytest.raises(ModelImportError):
            adapter_table(_forged(good, **change), base_m)
