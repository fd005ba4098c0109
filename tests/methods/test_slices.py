"""Layer slicing: output tensor names mapped to source tensors (mergekit's slices:)."""

from __future__ import annotations

import pytest

from crdt_merge.errors import BadParameter
from crdt_merge.methods import passthrough_sources, plan_slices


def llama(layers: int) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(layers):
        names += [
            f"model.layers.{i}.self_attn.q_proj.weight",
            f"model.layers.{i}.mlp.up_proj.weight",
        ]
    return names


def test_frankenmerge_stacks_layers_in_order() -> None:
    slices = [
        {"sources": [{"model": "a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "b", "layer_range": [1, 4]}]},
    ]
    got = passthrough_sources(slices, {"a": llama(3), "b": llama(4)})
    assert got == {
        "model.embed_tokens.weight": (0, "model.embed_tokens.weight"),
        "model.layers.0.mlp.up_proj.weight": (0, "model.layers.0.mlp.up_proj.weight"),
        "model.layers.0.self_attn.q_proj.weight": (0, "model.layers.0.self_attn.q_proj.weight"),
        "model.layers.1.mlp.up_proj.weight": (0, "model.layers.1.mlp.up_proj.weight"),
        "model.layers.1.self_attn.q_proj.weight": (0, "model.layers.1.self_attn.q_proj.weight"),
        "model.layers.2.mlp.up_proj.weight": (1, "model.layers.1.mlp.up_proj.weight"),
        "model.layers.2.self_attn.q_proj.weight": (1, "model.layers.1.self_attn.q_proj.weight"),
        "model.layers.3.mlp.up_proj.weight": (1, "model.layers.2.mlp.up_proj.weight"),
        "model.layers.3.self_attn.q_proj.weight": (1, "model.layers.2.self_attn.q_proj.weight"),
        "model.layers.4.mlp.up_proj.weight": (1, "model.layers.3.mlp.up_proj.weight"),
        "model.layers.4.self_attn.q_proj.weight": (1, "model.layers.3.self_attn.q_proj.weight"),
        "model.norm.weight": (1, "model.norm.weight"),
        "lm_head.weight": (1, "lm_head.weight"),
    }


def test_depth_upscaling_repeats_layers() -> None:
    slices = [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]},
        {"sources": [{"model": "a", "layer_range": [1, 4]}]},
    ]
    plan = plan_slices(slices, {"a": llama(4)})
    assert plan.num_layers == 6
    by_name = {t.name: t for t in plan.tensors}
    t = by_name["model.layers.3.mlp.up_proj.weight"]
    assert t.sources == ((0, "model.layers.1.mlp.up_proj.weight"),)
    assert (t.layer_index, t.num_layers, t.slice_index) == (0, 3, 1)
    assert by_name["lm_head.weight"].layer_index is None


def test_multi_source_slices_feed_a_merge() -> None:
    slices = [
        {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [2, 4]}]}
    ]
    plan = plan_slices(slices, {"a": llama(2), "b": llama(4)})
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["model.layers.1.mlp.up_proj.weight"].sources == (
        (0, "model.layers.1.mlp.up_proj.weight"),
        (1, "model.layers.3.mlp.up_proj.weight"),
    )
    assert by_name["model.embed_tokens.weight"].sources == (
        (0, "model.embed_tokens.weight"),
        (1, "model.embed_tokens.weight"),
    )
    with pytest.raises(BadParameter, match="one source per slice"):
        passthrough_sources(slices, {"a": llama(2), "b": llama(4)})


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ([{"sources": [{"model": "a", "layer_range": [0, 5]}]}], "outside model 'a'"),
        ([{"sources": [{"model": "a", "layer_range": [2, 2]}]}], "outside model 'a'"),
        ([{"sources": [{"model": "c", "layer_range": [0, 1]}]}], "not in the recipe"),
        (
            [
                {
                    "sources": [
                        {"model": "a", "layer_range": [0, 1]},
                        {"model": "b", "layer_range": [0, 2]},
                    ]
                }
            ],
            "same number of layers",
        ),
        ([{"sources": [{"model": "a", "layer_range": "0-2"}]}], "must be [start, end]"),
        (
            [{"sources": [{"model": "a", "layer_range": [0, 1]}], "residual_weight": 0.5}],
            "not supported",
        ),
        ([], "empty"),
    ],
)
def test_bad_slices_are_refused(slices, message) -> None:
    with pytest.raises(BadParameter) as info:
        plan_slices(slices, {"a": llama(4), "b": llama(4)})
    assert message in str(info.value)


def test_missing_tensor_in_a_source_is_refused() -> None:
    b = [n for n in llama(2) if "layers.1.mlp" not in n]
    slices = [
        {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}
    ]
    with pytest.raises(BadParameter, match="layer 1 has no 'mlp.up_proj.weight'"):
        plan_slices(slices, {"a": llama(2), "b": b})
