"""Robust merging end to end (issue 16): the outlier report in the plan, status and model
card, exclude_outliers as a recorded decision, krum/multi_krum, whole-model clipping, and
the same bytes whatever the order or duplication of the ops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt_merge.cli.main import main
from crdt_merge.replica import Replica
from crdt_merge.resolve import merge_plan as planning
from crdt_merge.resolve import resolve
from crdt_merge.sync import LocalPeer, sync
from tests.resolve.conftest import SHAPES, tensors, write_model
from tests.resolve.test_resolve import anchor, contribute, read


def _models(tmp_path: Path, kind: str) -> tuple[Path, list[Path], Path]:
    """A base, four honest fine-tunes (a shared signal plus their own noise) and one
    poisoned donor: ``x100`` (its task vector scaled), ``flip`` (negated) or ``noise``
    (random, of the same norm per tensor)."""
    base = tensors(0)
    signal = tensors(100, torch.float64, 0.05)
    honest = []
    for i in range(4):
        noise = tensors(200 + i, torch.float64, 0.01)
        honest.append({k: (base[k].double() + signal[k] + noise[k]).float() for k in SHAPES})
    own = {k: signal[k] + tensors(204, torch.float64, 0.01)[k] for k in SHAPES}
    rand = tensors(300, torch.float64, 1.0)
    poison = {
        "x100": {k: base[k].double() + own[k] * 100 for k in SHAPES},
        "flip": {k: base[k].double() - own[k] for k in SHAPES},
        "noise": {k: base[k].double() + rand[k] * (own[k].norm() / rand[k].norm())
                  for k in SHAPES},
    }[kind]
    folders = [write_model(tmp_path / f"honest{i}", h) for i, h in enumerate(honest)]
    bad = write_model(tmp_path / "poisoned", {k: v.float() for k, v in poison.items()})
    return write_model(tmp_path / "base", base), folders, bad


def _one_replica(tmp_path: Path, kind: str, method: str, params: dict, poisoned_at: int = 2):
    base, honest, bad = _models(tmp_path, kind)
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    donors = list(honest)
    donors.insert(poisoned_at, bad)
    ops = [contribute(r, d, base=base) for d in donors]
    r.set_recipe(method, params, anchor=anchor(r, base))
    return r, ops[poisoned_at].id, [op.id for i, op in enumerate(ops) if i != poisoned_at]


@pytest.mark.parametrize("kind", ["x100", "flip", "noise"])
def test_outlier_report_flags_exactly_the_poisoned_donor(tmp_path: Path, kind: str) -> None:
    r, bad, good = _one_replica(tmp_path, kind, "median", {})
    p = planning.plan(r)
    flagged = [e["op_id"] for e in p.outliers if e["flags"]]
    assert flagged == [bad], p.outliers
    assert len(p.outliers) == 5 and [c.op_id for c in p.contributions] == sorted([bad, *good])
    entry = next(e for e in p.outliers if e["op_id"] == bad)
    assert entry["flags"] == (["norm"] if kind == "x100" else ["direction"])
    # the report is in the plan's wire form, so the plan id covers it
    assert p.to_wire()["outliers"] == [dict(e) for e in p.outliers]
    r.close()


def test_exclude_outliers_is_a_recorded_decision_and_matches_leaving_it_out(tmp_path: Path) -> None:
    r, bad, good = _one_replica(tmp_path, "noise", "trimmed_mean",
                                {"exclude_outliers": True, "trim": "1"})
    p = planning.plan(r)
    assert [c.op_id for c in p.contributions] == sorted(good)
    (decision,) = [d for d in p.decisions if d["decision"] == "excluded"]
    assert decision["op_id"] == bad and decision["detail"].startswith("outlier (direction)")
    out = resolve(r, tmp_path / "out", workers=1)
    card = (out.out / "README.md").read_text()
    assert "Outlier report" in card and bad[:16] in card and "direction" in card
    merged = (out.out / "model.safetensors").read_bytes()
    # the same merge with the poisoned contribution retracted instead: same tensors
    r.retract([bad])
    r.set_recipe("trimmed_mean", {"trim": "1"}, anchor=p.base)
    again = resolve(r, tmp_path / "again", workers=1)
    assert (again.out / "model.safetensors").read_bytes() == merged
    r.close()


def test_status_shows_the_outlier_report(tmp_path: Path, capsys) -> None:
    r, bad, _ = _one_replica(tmp_path, "x100", "linear", {"outlier_report": True, "weight": "1"})
    path = str(r.path)
    r.close()
    capsys.readouterr()
    assert main(["--json", "status", path]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [e["op_id"] for e in status["outliers"] if e["flags"]] == [bad]
    assert main(["status", path]) == 0
    text = capsys.readouterr().out
    assert "Outlier report" in text and bad[:16] in text and "norm" in text


def test_multi_krum_keeps_the_honest_and_krum_one_of_them(tmp_path: Path) -> None:
    r, bad, good = _one_replica(tmp_path, "noise", "multi_krum", {"f": "1"})
    p = planning.plan(r)
    assert [c.op_id for c in p.contributions] == sorted(good)
    assert p.section["selected"] == sorted(good) and p.section["m"] == 4
    out = read(resolve(r, tmp_path / "mk", workers=1).out)
    r.set_recipe("krum", {"f": "1"}, anchor=p.base)
    p1 = planning.plan(r)
    assert len(p1.contributions) == 1 and p1.contributions[0].op_id in good
    # multi_krum's output is the mean of the kept task vectors, in float64, rounded once
    base = tensors(0)
    donors = {c.op_id: read(tmp_path / f"honest{i}") for i, c in enumerate(
        sorted(p.contributions, key=lambda c: good.index(c.op_id)))}
    for key in SHAPES:
        b = base[key].double()
        ref = b + sum((d[key].double() - b for d in donors.values()), torch.zeros_like(b)) / 4
        assert torch.allclose(out[key].double(), ref, atol=2e-7, rtol=0), key
    r.close()


def test_recipe_and_contribute_take_krum_without_force(tmp_path: Path, capsys) -> None:
    """krum leaves donors out by design (a ``by_recipe`` exclusion): ``recipe`` and
    ``contribute`` say so on stderr and go ahead; a contribution the plan would exclude
    for a problem of its own (a shape mismatch) is still refused without --force."""
    base, honest, bad = _models(tmp_path, "noise")
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    for folder in honest[:3]:
        assert main(["contribute", replica, str(folder), "--base", str(base)]) == 0
    capsys.readouterr()
    assert main(["recipe", replica, "--method", "krum", "--param", "f=0", "--anchor",
                 str(base)]) == 0, capsys.readouterr().err
    assert "the recipe leaves out" in capsys.readouterr().err
    assert main(["contribute", replica, str(bad), "--base", str(base)]) == 0
    assert "the recipe leaves out" in capsys.readouterr().err
    shapes = {k: torch.zeros(3) for k in SHAPES}
    odd = write_model(tmp_path / "odd", shapes)
    assert main(["contribute", replica, str(odd)]) == 2
    assert "would exclude" in capsys.readouterr().err


def test_krum_needs_enough_contributions(tmp_path: Path) -> None:
    from crdt_merge.errors import PlanError

    r, _, _ = _one_replica(tmp_path, "flip", "krum", {"f": "3"})
    with pytest.raises(PlanError, match="at least 6"):
        planning.plan(r)
    r.close()


def test_clipped_with_whole_model_norms_records_them(tmp_path: Path) -> None:
    r, bad, good = _one_replica(tmp_path, "x100", "clipped",
                                {"then": "trimmed_mean", "norms": "model"})
    p = planning.plan(r)
    norms = {e["op_id"]: float(e["norm"]) for e in p.outliers}
    for c in p.contributions:
        assert abs(float(c.params["model_norm"]) / norms[c.op_id] - 1) < 1e-5
    out = read(resolve(r, tmp_path / "out", workers=1).out)
    assert set(out) == set(SHAPES)
    r.close()


def _replicas(tmp_path: Path, n: int) -> list[Replica]:
    a = Replica.create(tmp_path / "s0", site="s0", profile="test")
    out = [a]
    for i in range(1, n):
        x = Replica.join(tmp_path / f"s{i}", site=f"s{i}", genesis=a.genesis_bytes())
        a.admit(f"s{i}", x.public_key)
        out.append(x)
    for x in out[1:]:
        sync(x, LocalPeer(a))
    return out


@pytest.mark.parametrize("method, params", [("median", {}), ("trimmed_mean", {"trim": "1"}),
                                            ("clipped", {"then": "median", "clip": "1"}),
                                            ("krum", {"f": "1"}),
                                            ("multi_krum", {"f": "1", "m": "3"})])
def test_same_bytes_whatever_the_order_and_duplication_of_ops(tmp_path: Path, method, params) -> None:
    base, honest, bad = _models(tmp_path, "flip")
    rs = _replicas(tmp_path, 5)
    for r, folder in zip(rs, [*honest, bad], strict=True):
        contribute(r, folder, base=base)
    rs[0].set_recipe(method, params, anchor=anchor(rs[0], base))
    # two replicas learn the ops in opposite orders, each op delivered more than once
    for x in rs[1:]:
        sync(rs[0], LocalPeer(x))
    for x in reversed(rs[:4]):
        sync(rs[4], LocalPeer(x))
        sync(rs[4], LocalPeer(x))
    sync(rs[4], LocalPeer(rs[0]))
    sync(rs[0], LocalPeer(rs[4]))
    one = resolve(rs[0], tmp_path / "o0", workers=1)
    two = resolve(rs[4], tmp_path / "o4", workers=2)
    assert one.checkpoint_id == two.checkpoint_id
    assert (one.out / "model.safetensors").read_bytes() == \
        (two.out / "model.safetensors").read_bytes()
    for r in rs:
        r.close()


@pytest.mark.parametrize("method, params", [
    ("median", []), ("trimmed_mean", ["trim=1"]), ("clipped", ["then=ties", "clip=2"]),
    ("krum", ["f=1"]), ("multi_krum", ["f=1", "m=3"]), ("sce", ["select_topk=0.5"]),
    ("nearswap", ["t=0.01"]), ("arcee_fusion", []), ("ram", []), ("ramplus_tl", ["r=0.2"]),
    ("median", ["exclude_outliers=true"]),
])
def test_recipe_accepts_the_new_methods(tmp_path: Path, capsys, method, params) -> None:
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    args = ["--json", "recipe", replica, "--method", method]
    for p in params:
        args += ["--param", p]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["method"] == method


def test_recipe_refuses_bad_robust_parameters(tmp_path: Path, capsys) -> None:
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    for params, word in ((["then=slerp"], "then"), (["exclude_outliers=maybe"], "exclude_outliers")):
        capsys.readouterr()
        args = ["recipe", replica, "--method", "clipped" if "then" in params[0] else "median"]
        assert main([*args, *(a for p in params for a in ("--param", p))]) == 2
        assert word in capsys.readouterr().err


def test_a_scaled_copy_of_one_donor_among_three_flags_only_the_copy(tmp_path: Path) -> None:
    """Two honest fine-tunes of different tasks (nearly orthogonal) and base + 100 x the
    first one's task vector: the copy is flagged for its norm, and it does not count as a
    peer for the cosines, so the second honest one is not flagged for its direction."""
    base = tensors(0)
    d1, d2 = tensors(400, torch.float64, 0.02), tensors(401, torch.float64, 0.02)
    folders = [write_model(tmp_path / "ft1", {k: (base[k].double() + d1[k]).float() for k in SHAPES}),
               write_model(tmp_path / "ft2", {k: (base[k].double() + d2[k]).float() for k in SHAPES}),
               write_model(tmp_path / "copy", {k: (base[k].double() + 100 * d1[k]).float()
                                               for k in SHAPES})]
    b = write_model(tmp_path / "base", base)
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    ops = [contribute(r, f, base=b) for f in folders]
    r.set_recipe("median", {}, anchor=anchor(r, b))
    report = {e["op_id"]: e["flags"] for e in planning.plan(r).outliers}
    assert report == {ops[0].id: [], ops[1].id: [], ops[2].id: ["norm"]}
    r.set_recipe("median", {"outlier_report": False}, anchor=anchor(r, b))
    assert planning.plan(r).outliers is None
    r.close()


def test_merge_command_takes_a_robust_method_that_from_mergekit_refuses(tmp_path: Path,
                                                                         capsys) -> None:
    import yaml

    base, honest, bad = _models(tmp_path, "flip")
    config = {"merge_method": "trimmed_mean", "base_model": str(base),
              "models": [{"model": str(m)} for m in [*honest, bad]],
              "parameters": {"trim": 1}}
    path = tmp_path / "robust.yml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["--json", "merge", str(path), str(tmp_path / "out")]) == 0, \
        capsys.readouterr().err
    merged = read(tmp_path / "out")
    assert set(merged) == set(SHAPES)
    # the same file through recipe --from-mergekit: refused by name, nothing written
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha", "--profile", "test"]) == 0
    capsys.readouterr()
    assert main(["recipe", replica, "--from-mergekit", str(path)]) == 2
    assert "'trimmed_mean' is crdt-merge's own" in capsys.readouterr().err


@pytest.mark.parametrize("method, params, donors", [
    ("median", {}, 5), ("trimmed_mean", {"trim": 1}, 5),
    ("clipped", {"then": "ties", "clip": 1.0}, 5), ("krum", {"f": 1}, 5),
    ("multi_krum", {"f": 1, "m": 3}, 5), ("sce", {"select_topk": 0.5}, 5),
    ("nearswap", {"t": 0.01}, 1), ("arcee_fusion", {}, 1), ("ram", {}, 5),
    ("ramplus_tl", {"r": 0.2}, 5),
])
def test_merge_command_takes_every_new_method(tmp_path: Path, capsys, method, params,
                                              donors) -> None:
    import yaml

    base, honest, bad = _models(tmp_path, "flip")
    per_model = {"weight": 1.0, "density": 0.5} if method == "clipped" else {}
    config = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(m), **({"parameters": per_model} if per_model else {})}
                         for m in [*honest, bad][:donors]],
              "parameters": params}
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["--json", "merge", str(path), str(tmp_path / "out")]) == 0, \
        capsys.readouterr().err
    if "krum" in method:  # leaving donors out is the method working: said, not refused
        assert "the recipe leaves out" in capsys.readouterr().err
    merged = read(tmp_path / "out")
    assert set(merged) == set(SHAPES)
    assert any(not torch.equal(merged[k], read(base)[k]) for k in SHAPES)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 700), k=st.integers(1, 4), block=st.sampled_from([4, 16, 64, 1024]),
       seed=st.integers(0, 1000))
def test_pair_sums_are_the_fixed_tree_of_each_product(n, k, block, seed) -> None:
    from crdt_merge.methods.reduce import tree_sum
    from crdt_merge.resolve.outliers import pair_sums

    gen = torch.Generator().manual_seed(seed)
    ds = [torch.randn(n, generator=gen, dtype=torch.float64) * 10 ** (i - 2) for i in range(k)]
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    got = pair_sums(ds, pairs, block)
    for (i, j), v in zip(pairs, got, strict=True):
        want = tree_sum(lambda s, e, i=i, j=j: ds[i][s:e] * ds[j][s:e], n, block)
        assert v == want or (v == 0 and want == 0), (i, j)
