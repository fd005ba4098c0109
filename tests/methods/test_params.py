"""Parameter values: scalars, layer gradients and filters, evaluated as mergekit does."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge.methods import layer_t, parse_scalar, resolve_param


def test_parse_scalar() -> None:
    assert parse_scalar("0.5", float) == 0.5
    assert parse_scalar("1e-3", float) == 0.001
    assert parse_scalar(2, float) == 2.0 and isinstance(parse_scalar(2, float), float)
    assert parse_scalar("10", int) == 10
    assert parse_scalar(True, bool) is True and parse_scalar("false", bool) is False
    for bad, kind in [
        ("0.5x", float),
        ("inf", float),
        (True, float),
        ("1.5", int),
        ("1", bool),
        (1.0, str),
    ]:
        with pytest.raises(ValueError):
            parse_scalar(bad, kind)


def test_layer_t_follows_mergekit_plan() -> None:
    # mergekit.plan: t = i / (n - 1) inside a slice of n layers, 1 for one layer, 0 outside
    assert layer_t(None, None) == 0.0
    assert layer_t(0, 5) == 0.0 and layer_t(4, 5) == 1.0 and layer_t(1, 5) == 0.25
    assert layer_t(0, 1) == 1.0
    with pytest.raises(ValueError):
        layer_t(5, 5)


def test_scalars_and_decimal_strings() -> None:
    assert resolve_param("0.3", "x", 2, 4) == 0.3
    assert resolve_param(True, "x") is True
    assert resolve_param("sum", "x") == "sum"


def test_gradient_interpolates_across_layers() -> None:
    grad = ["0", "0.5", "1"]
    # 5 layers: t = 0, .25, .5, .75, 1 -> positions 0, .5, 1, 1.5, 2 along [0, .5, 1]
    assert [resolve_param(grad, "x", i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # hand-computed: t = 1/3, scaled = 2/3 -> (1 - 2/3) * 0.2 + (2/3) * 0.8 = 0.6
    assert resolve_param(["0.2", "0.8", "0.4"], "x", 1, 4) == pytest.approx(0.6, abs=1e-15)
    # outside the layers t = 0: the first value
    assert resolve_param(["0.2", "0.8"], "model.embed_tokens.weight") == 0.2


def test_boolean_gradient_picks() -> None:
    assert [resolve_param([True, False], "x", i, 3) for i in range(3)] == [True, True, False]


def test_filters_first_match_wins() -> None:
    value = [
        {"filter": "self_attn", "value": "0.1"},
        {"filter": "mlp", "value": ["0", "1"]},
        {"value": "0.7"},
    ]
    assert resolve_param(value, "model.layers.3.self_attn.q_proj.weight", 3, 4) == 0.1
    assert resolve_param(value, "model.layers.1.mlp.up_proj.weight", 1, 3) == 0.5
    assert resolve_param(value, "model.norm.weight") == 0.7
    assert resolve_param({"filter": "*", "value": "2"}, "anything") == 2.0
    # no match: None, so the caller falls back to the next scope, then the default
    assert resolve_param([{"filter": "mlp", "value": "1"}], "model.norm.weight") is None


@settings(deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=6),
    st.integers(1, 40).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))),
)
def test_gradient_stays_between_its_endpoints(points, where) -> None:
    index, count = where
    x = resolve_param([repr(p) for p in points], "x", index, count)
    assert min(points) <= x <= max(points)
    if len(set(points)) == 1:
        assert x == points[0]
