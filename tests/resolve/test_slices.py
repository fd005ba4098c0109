"""Layer slicing end to end: the recipe's ``slices``, plan checks, execution, --from-mergekit.

Parity with ``mergekit-yaml`` itself is in tests/methods/test_parity_mergekit.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from crdt_merge.cli.main import main
from crdt_merge.errors import BadParameter, PlanError, ShapeMismatch
from crdt_merge.methods import TensorJob, get_method
from crdt_merge.replica import Replica
from crdt_merge.resolve import plan, resolve, resolve_recorded
from crdt_merge.store.importer import import_model
from crdt_merge.sync import LocalPeer, sync
from tests.fixtures.tiny_models import make_tiny, sample_inputs
from tests.resolve.conftest import write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llamas: A with 2 layers, B and C with 4 (B is the anchor where one is needed),
    W with 2 wider layers."""
    root = tmp_path_factory.mktemp("slice-models")
    return {"A": make_tiny("llama", root / "A", seed=1),
            "B": make_tiny("llama", root / "B", seed=2, num_hidden_layers=4),
            "C": make_tiny("llama", root / "C", seed=3, num_hidden_layers=4),
            "W": make_tiny("llama", root / "W", seed=4, hidden_size=48, num_attention_heads=6)}


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = st.get_tensor(k)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def imp(r: Replica, folder: Path) -> str:
    return import_model(r.store, str(folder), r.piece_size).manifest_id


def src(model: str, start: int, end: int) -> dict:
    return {"model": model, "layer_range": [start, end]}


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def renamed(name: str, layer: int) -> str:
    parts = name.split(".")
    return ".".join(parts[:2] + [str(layer)] + parts[3:])


def test_passthrough_frankenmerge_copies_bytes_and_loads(tiny, tmp_path: Path) -> None:
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    ids = {n: imp(r, tiny[n]) for n in "ABC"}
    ops = {n: r.contribute(ids[n], label=n) for n in "ABC"}
    slices = [{"sources": [src(ids["A"], 0, 2)]}, {"sources": [src(ids["B"], 1, 4)]}]
    r.set_recipe("passthrough", {"slices": slices})
    p = plan(r)
    assert [c.op_id for c in p.contributions] == sorted(ops[n].id for n in "AB")
    assert {"decision": "excluded", "op_id": ops["C"].id,
            "detail": "not named in the recipe's slices"} in p.decisions
    out = resolve(r, tmp_path / "out", workers=1)

    a, b = tensors_of(tiny["A"]), tensors_of(tiny["B"])
    want = {k: t for k, t in a.items() if layer_of(k) is None and "embed" in k}
    want |= {k: t for k, t in b.items() if layer_of(k) is None and "embed" not in k}
    for o, (source, i) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2), (b, 3)]):
        want |= {renamed(k, o): t for k, t in source.items() if layer_of(k) == i}
    got = tensors_of(out.out)
    assert set(got) == set(want)
    assert all(same_bytes(got[k], want[k]) for k in want)

    config = json.loads((out.out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    record = json.loads((out.out / "merge_manifest.json").read_text())
    assert record["plan"]["slices"] == slices
    card = (out.out / "README.md").read_text()
    assert "## Slices" in card and "The output model has 5 layers." in card

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out.out)
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    with torch.no_grad():
        logits = model(**sample_inputs(config)).logits
    assert torch.isfinite(logits).all()
    # an unused contribution does not change what is computed
    r.retract([ops["C"].id])
    assert plan(r).id == p.id
    r.close()


def _slerp(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    job = TensorJob("x", base, [other], [{}], {"t": repr(t)}, out_dtype=torch.float32)
    return get_method("slerp").merge(job)


def test_slerp_with_slices_and_a_gradient(tiny, tmp_path: Path) -> None:
    """Slice parameters override the recipe's; t is the offset over the slice's length."""
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    b, c = imp(r, tiny["B"]), imp(r, tiny["C"])
    r.contribute(c, label="C")
    gradient = [{"filter": "self_attn", "value": ["0", "0.5", "0.3", "0.7", "1"]}, {"value": "0.5"}]
    slices = [{"sources": [src(b, 0, 3), src(c, 1, 4)]},
              {"sources": [src(c, 2, 4), src(b, 2, 4)], "parameters": {"t": ["0.2", "0.9"]}}]
    r.set_recipe("slerp", {"t": gradient, "slices": slices, "dtype": "float32"}, anchor=b)
    out = resolve(r, tmp_path / "out", workers=1)
    got = tensors_of(out.out)
    tb, tc = tensors_of(tiny["B"]), tensors_of(tiny["C"])
    # (output layer, B layer, C layer, t for self_attn, t for the rest)
    layers = [(0, 0, 1, 0.0, 0.5), (1, 1, 2, 0.3, 0.5), (2, 2, 3, 1.0, 0.5),
              (3, 2, 2, 0.2, 0.2), (4, 3, 3, 0.9, 0.9)]
    checked = 0
    for o, i, j, t_attn, t_rest in layers:
        for k in tb:
            if layer_of(k) == i:
                t = t_attn if "self_attn" in k else t_rest
                want = _slerp(tb[k].double(), tc[renamed(k, j)].double(), t)
                assert same_bytes(got[renamed(k, o)], want), (k, o)
                checked += 1
    # outside the layers t = 0: embeddings take slice 0's parameters, the rest slice 1's
    for k, t in (("model.embed_tokens.weight", 0.5), ("model.norm.weight", 0.2),
                 ("lm_head.weight", 0.2)):
        assert same_bytes(got[k], _slerp(tb[k].double(), tc[k].double(), t)), k
    assert checked + 3 == len(got)
    assert json.loads((out.out / "config.json").read_text())["num_hidden_layers"] == 5
    r.close()


def test_same_checkpoint_on_every_replica_whatever_the_arrival_order(replicas, tiny,
                                                                       tmp_path: Path) -> None:
    a, b, c = replicas
    ids = {n: imp(x, tiny[n]) for x, n in zip((a, b, c), "ABC", strict=True)}
    for x, n in zip((a, b, c), "ABC", strict=True):
        x.contribute(ids[n], label=n)
    slices = [{"sources": [src(ids["A"], 0, 2), src(ids["B"], 0, 2)]},
              {"sources": [src(ids["C"], 1, 3), src(ids["B"], 2, 4)],
               "parameters": {"weight": ["1", "3"]}}]
    c.set_recipe("linear", {"weight": "1", "slices": slices})
    sync(a, LocalPeer(c))  # a: C's ops first, then B's
    sync(a, LocalPeer(b))
    sync(b, LocalPeer(a))  # b: everything from a
    first = resolve(a, tmp_path / "out-a", workers=1)
    second = resolve(b, tmp_path / "out-b", workers=2)
    assert (first.plan_id, first.checkpoint_id) == (second.plan_id, second.checkpoint_id)
    sync(c, LocalPeer(a))
    again = resolve_recorded(c, first.out / "merge_manifest.json", tmp_path / "out-c")
    assert again.checkpoint_id == first.checkpoint_id
    # canonical input order: by contribution op id, not the slice's listing order
    got = tensors_of(first.out)
    ta, tb = tensors_of(tiny["A"]), tensors_of(tiny["B"])
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(got[name].double(), (ta[name].double() + tb[name].double()) / 2,
                          atol=1e-6)


def test_a_delta_contribution_adds_to_the_anchor_at_its_source_layer(tiny, tmp_path: Path) -> None:
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    tb, tc = tensors_of(tiny["B"]), tensors_of(tiny["C"])
    delta = write_model(tmp_path / "delta", {k: tc[k] - tb[k] for k in tb},
                        json.loads((tiny["B"] / "config.json").read_text()))
    b, d = imp(r, tiny["B"]), imp(r, delta)
    r.contribute(d, form="delta", base=b, label="delta")
    r.set_recipe("passthrough", {"slices": [{"sources": [src(d, 2, 4)]}]}, anchor=b)
    got = tensors_of(resolve(r, tmp_path / "out", workers=1).out)
    assert len(got) == 3 + 2 * sum(1 for k in tb if layer_of(k) == 0)
    for k, t in got.items():
        source = k if layer_of(k) is None else renamed(k, layer_of(k) + 2)
        want = (tb[source].double() + (tc[source] - tb[source]).double()).to(torch.float32)
        assert same_bytes(t, want), k
    # the same delta declared against the 2-layer A: A has no layer 2 to add it to
    a = imp(r, tiny["A"])
    r.contribute(d, form="delta", base=a, label="delta on A")
    r.set_recipe("passthrough", {"slices": [{"sources": [src(d, 2, 4)]}]}, anchor=a)
    with pytest.raises(ShapeMismatch, match="which the anchor lacks"):
        plan(r)
    r.close()


def one(*sources: dict, **extra) -> list[dict]:
    return [{"sources": list(sources), **extra}]


ERRORS = [
    # (method, anchor, recipe parameters from {name: manifest id}, error, message)
    ("passthrough", None, lambda m: {"slices": one(src("ab" * 32, 0, 1))},
     BadParameter, "neither contributed nor the anchor"),
    ("passthrough", None, lambda m: {"slices": one(src(m["A"], 0, 3))},
     BadParameter, "outside model"),
    ("passthrough", None, lambda m: {"slices": one(src(m["A"], 1, 1))},
     BadParameter, "empty or negative"),
    ("passthrough", None, lambda m: {"slices": one(src(m["A"], 0, "x"))},
     BadParameter, "whole numbers"),
    ("passthrough", None, lambda m: {"slices": one(src(m["A"], 0, 1), src(m["C"], 0, 1))},
     BadParameter, "exactly 1 donor"),
    ("passthrough", None, lambda m: {"slices": one(src(m["A"], 0, 1), base_model=m["A"])},
     BadParameter, "base_model is not supported"),
    ("passthrough", None,
     lambda m: {"slices": one({**src(m["A"], 0, 1), "parameters": {"scale": "2"}})},
     BadParameter, "per-source `parameters`"),
    ("passthrough", None, lambda m: {"slices": []}, BadParameter, "slices must be a list"),
    ("linear", None, lambda m: {"weight": "1", "slices": one(src(m["A"], 0, 2),
                                                             src(m["C"], 0, 3))},
     BadParameter, "same number of layers"),
    ("linear", None, lambda m: {"weight": "1", "slices": one(src(m["A"], 0, 1),
                                                             src(m["A"], 1, 2))},
     BadParameter, "appears twice"),
    ("linear", None, lambda m: {"weight": "1", "slices": one(src(m["C"], 0, 2),
                                                             src(m["W"], 0, 2))},
     ShapeMismatch, "must agree in shape"),
    ("slerp", "B", lambda m: {"t": "0.5", "slices": one(src(m["A"], 0, 2), src(m["C"], 0, 2))},
     BadParameter, "list it among the slice's sources"),
    ("slerp", "B", lambda m: {"slices": one(src(m["B"], 0, 2), src(m["C"], 0, 2))},
     BadParameter, "slices[0]: slerp recipe: parameter 't' is required"),
    ("slerp", "B", lambda m: {"t": "0.5", "slices": one(src(m["B"], 0, 2), src(m["C"], 0, 2),
                                                        parameters={"t": "2"})},
     BadParameter, "slices[0]: slerp recipe: parameter 't' is '2', outside"),
]


@pytest.fixture(scope="module")
def contributed(tiny, tmp_path_factory):
    """One replica holding A, C and W as contributions and B (imported) for an anchor;
    each case below only sets a new recipe."""
    r = Replica.create(tmp_path_factory.mktemp("errors") / "r", site="alpha", profile="test")
    ids = {n: imp(r, tiny[n]) for n in "ABCW"}
    for n in "ACW":
        r.contribute(ids[n], label=n)
    yield r, ids
    r.close()


@pytest.mark.parametrize("case", ERRORS, ids=[e[-1][:28] for e in ERRORS])
def test_bad_slices_fail_the_plan_with_a_clear_message(contributed, case) -> None:
    method, anchor, params, error, message = case
    r, ids = contributed
    r.set_recipe(method, params(ids), anchor=ids[anchor] if anchor else None)
    with pytest.raises(error) as info:
        plan(r)
    assert message in info.value.detail


def test_retracting_a_sliced_model_is_a_plan_error(tiny, tmp_path: Path) -> None:
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    a, b = imp(r, tiny["A"]), imp(r, tiny["B"])
    r.contribute(a, label="A")
    op = r.contribute(b, label="B")
    r.set_recipe("passthrough", {"slices": [{"sources": [src(a, 0, 2)]},
                                            {"sources": [src(b, 1, 4)]}]})
    plan(r)
    r.retract([op.id])
    with pytest.raises(PlanError, match=f"names model {b}, which no live contribution holds: "
                                        "its contribution was retracted"):
        plan(r)
    r.close()


def test_output_config_counts_the_layers_and_slices_layer_types() -> None:
    from crdt_merge.resolve.output import slice_config

    m, n = "a" * 64, "b" * 64
    slices = [{"sources": [src(m, 0, 3)]}, {"sources": [src(n, 1, 3), src(m, 1, 3)]}]
    own = {"num_hidden_layers": 4, "layer_types": ["f", "s", "f", "s"], "torch_dtype": "x"}
    got = json.loads(slice_config(json.dumps(own).encode(), slices,
                                  {m: own, n: {"layer_types": ["F", "S", "F"]}}))
    assert got == {"num_hidden_layers": 5, "layer_types": ["f", "s", "f", "S", "F"],
                   "torch_dtype": "x"}
    # the first source's config lacks layer_types: the reference's entry at that layer
    got = json.loads(slice_config(json.dumps(own).encode(), slices, {n: None}))
    assert got["layer_types"] == ["f", "s", "f", "s", "f"]
    gpt2 = json.loads(slice_config(b'{"n_layer": 2}', slices, {}))
    assert gpt2 == {"n_layer": 5}
    with pytest.raises(PlanError, match="layer_types of model"):
        slice_config(json.dumps(own).encode(), [{"sources": [src(m, 2, 6)]}], {})


# -- --from-mergekit ------------------------------------------------------------------------


def _yaml(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _status(replica: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["--json", "status", replica]) == 0
    return json.loads(capsys.readouterr().out)


def test_from_mergekit_turns_slices_into_contributions_and_a_recipe(tiny, tmp_path: Path,
                                                                      capsys) -> None:
    config = {"merge_method": "slerp", "base_model": str(tiny["B"]), "dtype": "float32",
              "parameters": {"t": 0.5},
              "slices": [{"sources": [{"model": str(tiny["B"]), "layer_range": [0, 2]},
                                      {"model": str(tiny["C"]), "layer_range": [2, 4]}]},
                         {"sources": [{"model": str(tiny["C"]), "layer_range": [0, 1]},
                                      {"model": str(tiny["B"]), "layer_range": [3, 4]}],
                          "parameters": {"t": [0.1, 0.7]}}]}
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    capsys.readouterr()
    assert main(["--json", "recipe", replica, "--from-mergekit", _yaml(tmp_path, config)]) == 0
    result = json.loads(capsys.readouterr().out)
    with Replica.open(replica) as r:
        b, c = imp(r, tiny["B"]), imp(r, tiny["C"])
    assert result["anchor"] == b
    assert [x.get("skipped") for x in result["contributions"]] == ["is the base model", None]
    assert result["params"]["slices"] == [
        {"sources": [src(b, 0, 2), src(c, 2, 4)]},
        {"sources": [src(c, 0, 1), src(b, 3, 4)], "parameters": {"t": ["0.1", "0.7"]}}]
    status = _status(replica, capsys)
    assert [x["manifest"] for x in status["contributions"]] == [c]
    assert main(["recipe", replica, "--from-mergekit", _yaml(tmp_path, config)]) == 0
    assert _status(replica, capsys)["ops"] == status["ops"]  # nothing new the second time


@pytest.mark.parametrize("change, feature", [
    (lambda s: s[0]["sources"][0].update(parameters={"scale": 2}), "per-source `parameters:`"),
    (lambda s: s[0].update(base_model="x"), "`base_model:`"),
    (lambda s: s[0].update(residual_weight=0.5), "`residual_weight:`"),
    (lambda s: s[0]["sources"][0].update(layer_range=[0, 3]), "outside model"),
])
def test_from_mergekit_refuses_what_slices_cannot_do(tiny, tmp_path: Path, capsys, change,
                                                     feature) -> None:
    slices = [{"sources": [{"model": str(tiny["A"]), "layer_range": [0, 2]}]}]
    change(slices)
    path = _yaml(tmp_path, {"merge_method": "passthrough", "slices": slices})
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    capsys.readouterr()
    assert main(["recipe", replica, "--from-mergekit", path]) == 2
    err = capsys.readouterr().err
    assert feature in err and err.count("\n") == 1, err
    assert _status(replica, capsys)["ops"] == 1  # nothing but the genesis


def test_cli_recipe_takes_a_required_value_from_the_slices(tiny, tmp_path: Path,
                                                             capsys) -> None:
    """``crdt-merge recipe --param slices=...`` checks the method's parameters per slice,
    as plan does: slerp's ``t`` given by every slice need not be given again at the top
    level; a slice without it (and no top-level ``t``) is refused by name."""
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    with Replica.open(replica) as r:
        b, c = imp(r, tiny["B"]), imp(r, tiny["C"])
        r.contribute(c, label="C")
    both = [{"sources": [src(b, 0, 2), src(c, 0, 2)], "parameters": {"t": 0.3}},
            {"sources": [src(b, 2, 4), src(c, 2, 4)], "parameters": {"t": 0.6}}]
    capsys.readouterr()
    assert main(["--json", "recipe", replica, "--method", "slerp", "--anchor", b,
                 "--param", f"slices={json.dumps(both)}"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["slices"][1]["parameters"] == {"t": "0.6"}
    with Replica.open(replica) as r:
        assert plan(r).slices is not None  # and plan accepts what the CLI authored
    one = [both[0], {"sources": both[1]["sources"]}]
    status = _status(replica, capsys)
    assert main(["recipe", replica, "--method", "slerp", "--anchor", b,
                 "--param", f"slices={json.dumps(one)}"]) == 2
    assert "slices[1]" in capsys.readouterr().err
    assert _status(replica, capsys)["ops"] == status["ops"]  # nothing authored
