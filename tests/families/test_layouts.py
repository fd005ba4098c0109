"""The canonical tensors mean what specs/families.md says: fused splits, transposes and
position offsets checked against transformers' own modules, and across families."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from crdt_merge.errors import ModelImportError, PlanError, ShapeMismatch
from crdt_merge.families import CanonicalModel, get_family
from crdt_merge.families.fused import join, same_bits, split
from tests.fixtures.tiny_models import build, sample_inputs


def canonical(model: torch.nn.Module, family: str) -> CanonicalModel:
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return get_family(family).to_canonical(tensors, config)


def x_in(hidden: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, 5 * hidden).reshape(1, 5, hidden)


def linear(x: torch.Tensor, cm: CanonicalModel, name: str) -> torch.Tensor:
    out = x @ cm.tensors[f"{name}.weight"].T
    bias = cm.tensors.get(f"{name}.bias")
    return out if bias is None else out + bias


def test_gpt2_c_attn_split_and_conv1d_transposes() -> None:
    model = build("gpt2")
    cm = canonical(model, "gpt2")
    x = x_in(32)
    q, k, v = model.transformer.h[0].attn.c_attn(x).split(32, dim=2)
    for got, role in ((q, "attn_q"), (k, "attn_k"), (v, "attn_v")):
        torch.testing.assert_close(linear(x, cm, f"decoder.layers.0.{role}"), got)
    native = model.transformer.h[1].mlp.c_fc.weight
    assert cm.tensors["decoder.layers.1.mlp_up.weight"].shape == (128, 32)
    assert torch.equal(cm.tensors["decoder.layers.1.mlp_up.weight"], native.T)
    assert cm.tensors["decoder.layers.1.mlp_up.weight"].is_contiguous()


def test_gpt_neox_query_key_value_is_interleaved_per_head() -> None:
    model = build("gpt_neox")
    cm = canonical(model, "gpt_neox")
    x = x_in(32)
    qkv = model.gpt_neox.layers[0].attention.query_key_value(x)
    q, k, v = qkv.view(1, 5, 4, 3 * 8).chunk(3, dim=-1)  # heads, then [q | k | v] per head
    for got, role in ((q, "attn_q"), (k, "attn_k"), (v, "attn_v")):
        torch.testing.assert_close(linear(x, cm, f"decoder.layers.0.{role}"), got.reshape(1, 5, 32))


def test_phi3_qkv_and_gate_up_split() -> None:
    model = build("phi3")  # 4 query heads, 2 key/value heads of 8
    cm = canonical(model, "phi3")
    layer = model.model.layers[1]
    x = x_in(32)
    qkv = layer.self_attn.qkv_proj(x)
    assert cm.tensors["decoder.layers.1.attn_k.weight"].shape == (16, 32)
    torch.testing.assert_close(linear(x, cm, "decoder.layers.1.attn_q"), qkv[..., :32])
    torch.testing.assert_close(linear(x, cm, "decoder.layers.1.attn_k"), qkv[..., 32:48])
    torch.testing.assert_close(linear(x, cm, "decoder.layers.1.attn_v"), qkv[..., 48:])
    gate, up = layer.mlp.gate_up_proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(linear(x, cm, "decoder.layers.1.mlp_gate"), gate)
    torch.testing.assert_close(linear(x, cm, "decoder.layers.1.mlp_up"), up)


@pytest.mark.parametrize("family", ["opt", "roberta"])
def test_position_rows_start_at_position_zero(family: str) -> None:
    model = build(family)
    cm = canonical(model, family)
    positions = {k: v for k, v in model.state_dict().items() if "embed_positions" in k
                 or "position_embeddings" in k}
    (table,) = positions.values()
    assert torch.equal(cm.tensors["pos_embed_offset.weight"], table[:2])
    assert torch.equal(cm.tensors["pos_embed.weight"], table[2:])
    assert cm.tensors["pos_embed.weight"].shape[0] == 64


def _load(family_name: str, config: Any, cm: CanonicalModel, folder) -> torch.nn.Module:
    family = get_family(family_name)
    target = CanonicalModel(family_name, cm.tensors, cm.classes, ties=cm.ties,
                            prefix=family.spec.prefixes[0], config=config.to_dict())
    native = family.from_canonical(target)
    save_file(native, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    return getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()


def _shared_classes_equal(a: CanonicalModel, b_family: str, config: dict) -> None:
    other = get_family(b_family).classes(config, a.classes)
    assert other == a.classes


def test_phi3_canonical_runs_as_llama(tmp_path) -> None:
    phi3 = build("phi3")
    cm = canonical(phi3, "phi3")
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=128, max_position_embeddings=64, head_dim=8,
        rms_norm_eps=phi3.config.rms_norm_eps, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )
    _shared_classes_equal(cm, "llama", config.to_dict())
    llama = _load("llama", config, cm, tmp_path)
    inputs = sample_inputs(phi3.config.to_dict())
    with torch.no_grad():
        torch.testing.assert_close(llama(**inputs).logits, phi3(**inputs).logits)


def test_gpt2_canonical_runs_as_opt(tmp_path) -> None:
    gpt2 = build("gpt2")
    cm = canonical(gpt2, "gpt2")
    cm.tensors["pos_embed_offset.weight"] = torch.zeros(2, 32)
    config = transformers.OPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        word_embed_proj_dim=32, vocab_size=128, max_position_embeddings=64,
        activation_function="gelu_new", pad_token_id=0, bos_token_id=1, eos_token_id=2,
        architectures=["OPTForCausalLM"],
    )
    cm.classes.pop("pos_embed_offset", None)
    _shared_classes_equal(cm, "opt", config.to_dict())
    opt = _load("opt", config, cm, tmp_path)
    inputs = sample_inputs(gpt2.config.to_dict())
    with torch.no_grad():
        torch.testing.assert_close(opt(**inputs).logits, gpt2(**inputs).logits)


# -- the fused ops themselves -----------------------------------------------------------------


def _tensor(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape) * 0.5


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 4), d=st.integers(1, 4), parts=st.integers(1, 3),
       cols=st.integers(0, 3), kind=st.sampled_from(["rows", "conv1d", "heads"]))
def test_split_then_join_is_the_identity(heads: int, d: int, parts: int, cols: int, kind: str) -> None:
    dims = {"h": heads, "d": d}
    into = [f"p{n}" for n in range(parts)]
    if kind == "heads":
        op = {"op": "heads", "heads": "h", "into": into}
        tensor = _tensor((heads * parts * d, cols) if cols else (heads * parts * d,))
    elif kind == "rows":
        op = {"op": "rows", "sizes": ["d", *([1] * (parts - 2)), "*"][:parts] if parts > 1 else ["*"],
              "into": into}
        tensor = _tensor((d + parts + 2, cols + 1))
    else:
        op = {"op": "conv1d", "sizes": ["d"] * parts, "into": into}
        tensor = _tensor((cols + 1, d * parts))
    pieces = split(op, "t", tensor, dims)
    assert len(pieces) == parts
    assert all(p.is_contiguous() and p.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
               for p in pieces)
    assert same_bits(join(op, "t", pieces, dims), tensor)


def test_wrong_shape_fused_tensor_is_refused(tiny_models) -> None:
    from crdt_merge.families import detect, load_folder

    config, tensors = load_folder(tiny_models.get("phi3"))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    tensors[name] = torch.zeros(65, 32)  # q 32 + k 16 + v 16 = 64 rows
    family = detect(config, tensors)
    with pytest.raises(ModelImportError, match=r"qkv_proj\.weight has 65 .* q_size=32 \+ kv_size=16"):
        family.to_canonical(tensors, config)


def test_wrong_shape_neox_and_gpt2_are_refused() -> None:
    neox = {"op": "heads", "heads": "heads", "rows": "qkv_size", "into": ["q", "k", "v"]}
    with pytest.raises(ModelImportError, match="expected 96"):
        split(neox, "qkv", torch.zeros(48, 32), {"heads": 4, "qkv_size": 96})
    c_attn = {"op": "conv1d", "sizes": ["hidden"] * 3, "into": ["q", "k", "v"]}
    with pytest.raises(ModelImportError, match="c_attn"):
        split(c_attn, "h.0.attn.c_attn.weight", torch.zeros(96, 32), {"hidden": 32})
    with pytest.raises(ModelImportError, match=r"\(in, out\)"):
        split(c_attn, "c_attn", torch.zeros(96), {"hidden": 32})


def test_parts_that_do_not_fit_are_refused() -> None:
    neox = {"op": "heads", "heads": "heads", "into": ["q", "k", "v"]}
    with pytest.raises(ShapeMismatch):
        join(neox, "qkv", [torch.zeros(32, 8), torch.zeros(16, 8), torch.zeros(32, 8)], {"heads": 4})
    rows = {"op": "rows", "sizes": ["*"], "into": ["a", "b"]}
    with pytest.raises(ShapeMismatch, match="dtypes"):
        join(rows, "ab", [torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16)], {})


def test_from_canonical_needs_every_part(tiny_models) -> None:
    from crdt_merge.families import detect, load_folder

    config, tensors = load_folder(tiny_models.get("gpt2"))
    family = detect(config, tensors)
    cm = family.to_canonical(tensors, config)
    del cm.tensors["decoder.layers.1.attn_k.weight"]
    with pytest.raises(PlanError, match=r"h\.1\.attn\.c_attn\.weight"):
        family.from_canonical(cm)
