"""Resolve: correctness against float64 references, determinism, plan decisions, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from crdt_merge import maintenance
from crdt_merge.errors import BadParameter, OutputExists, PlanError, UnknownMethod
from crdt_merge.methods import reduce
from crdt_merge.replica import Replica
from crdt_merge.resolve import plan, resolve, resolve_recorded
from crdt_merge.store.importer import import_model
from crdt_merge.sync import LocalPeer, sync
from tests.resolve.conftest import SHAPES, tensors, write_model


def contribute(replica: Replica, folder: Path, base: Path | None = None, **params: str):
    donor = import_model(replica.store, str(folder), replica.piece_size)
    base_id = import_model(replica.store, str(base), replica.piece_size).manifest_id if base else None
    return replica.contribute(donor.manifest_id, base=base_id, params=params, label=folder.name)


def anchor(replica: Replica, folder: Path) -> str:
    return import_model(replica.store, str(folder), replica.piece_size).manifest_id


def read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            out[k] = f.get_tensor(k)
    return out


def within_one_rounding(ours: torch.Tensor, ref64: torch.Tensor) -> bool:
    """Each element is one of the two representable neighbours of the exact value."""
    o = ours.to(torch.float64)
    up = torch.nextafter(ours, torch.full_like(ours, float("inf"))).to(torch.float64)
    down = torch.nextafter(ours, torch.full_like(ours, float("-inf"))).to(torch.float64)
    return bool(((ref64 >= down) & (ref64 <= up) & ((o - ref64).abs() <= (up - down))).all())


def sync_all(*rs: Replica) -> None:
    for _ in range(2):
        for x in rs:
            for y in rs:
                if x is not y:
                    sync(x, LocalPeer(y))


def test_linear_matches_float64_reference(replicas, models, tmp_path: Path) -> None:
    a, b, c = replicas
    weights = {"ft0": "0.5", "ft1": "0.3", "ft2": "0.2"}
    for r, name in zip((a, b, c), ("ft0", "ft1", "ft2"), strict=True):
        contribute(r, models[name], weight=weights[name])
    a.set_recipe("linear", {"normalize": True})
    sync_all(a, b, c)
    out = resolve(a, tmp_path / "out", workers=1)
    got = read(out.out)
    donors = {n: read(models[n]) for n in weights}
    total = sum(float(w) for w in weights.values())
    for key in SHAPES:
        ref = sum(donors[n][key].to(torch.float64) * float(w) for n, w in weights.items()) / total
        assert got[key].dtype == torch.float32
        assert within_one_rounding(got[key], ref), key


def test_task_arithmetic_matches_float64_reference_bf16(replicas, tmp_path: Path) -> None:
    a, b, _ = replicas
    base_t = tensors(0, dtype=torch.bfloat16)
    base = write_model(tmp_path / "base", base_t)
    fts = [write_model(tmp_path / f"ft{i}", tensors(20 + i, dtype=torch.bfloat16, scale=0.05,
                                                     base=base_t)) for i in range(2)]
    contribute(a, fts[0], base=base, weight="0.7")
    contribute(b, fts[1], base=base, weight="0.4")
    a.set_recipe("task_arithmetic", {"lambda": "0.8", "normalize": False},
                 anchor=anchor(a, base))
    sync_all(a, b)
    got = read(resolve(b, tmp_path / "out", workers=1).out)
    d = [read(f) for f in fts]
    for key in SHAPES:
        b64 = base_t[key].to(torch.float64)
        delta = (d[0][key].to(torch.float64) - b64) * 0.7 + (d[1][key].to(torch.float64) - b64) * 0.4
        ref = b64 + delta * 0.8
        assert got[key].dtype == torch.bfloat16
        assert within_one_rounding(got[key], ref), key


def _resolve_in_subprocess(replica_dir: Path, out: Path, env_extra: dict[str, str],
                           workers: int) -> dict:
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, "-m", "crdt_merge", "--json", "resolve",
                           str(replica_dir), "--out", str(out), "--workers", str(workers)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_same_bytes_across_processes_threads_and_cpu_kernels(replicas, models, tmp_path: Path) -> None:
    a, b, c = replicas
    for r, name in zip((a, b, c), ("ft0", "ft1", "ft2"), strict=True):
        contribute(r, models[name], base=models["base"], weight="1")
    c.set_recipe("task_arithmetic", {"lambda": "0.5"}, anchor=anchor(c, models["base"]))
    sync_all(a, b, c)
    runs = [
        (a.path, {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}, 1),
        (b.path, {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"}, 2),
        (c.path, {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}, 1),
    ]
    results = [_resolve_in_subprocess(d, tmp_path / f"out{i}", env, w)
               for i, (d, env, w) in enumerate(runs)]
    assert len({r["checkpoint_id"] for r in results}) == 1
    files = [(tmp_path / f"out{i}" / "model.safetensors").read_bytes() for i in range(3)]
    assert files[0] == files[1] == files[2]
    # and in this process, after a restart of the replica
    reopened = Replica.open(a.path)
    assert resolve(reopened, tmp_path / "again", workers=1).checkpoint_id == results[0]["checkpoint_id"]
    reopened.close()


def test_unrelated_ops_keep_the_checkpoint_and_retract_restores_it(replicas, models, tmp_path: Path) -> None:
    a, b, c = replicas
    contribute(a, models["ft0"], base=models["base"], weight="1")
    contribute(b, models["ft1"], base=models["base"], weight="1")
    a.set_recipe("task_arithmetic", {"lambda": "1"}, anchor=anchor(a, models["base"]))
    sync_all(a, b, c)
    before = resolve(a, tmp_path / "before", workers=1)

    # a retract of another site's op changes the state but nothing computed
    a_op = next(x for x in maintenance.status(a)["contributions"] if x["site"] == "alpha")
    c.retract([a_op["op_id"]])  # gamma cannot retract alpha's contribution
    sync_all(a, b, c)
    same = resolve(b, tmp_path / "same", workers=1)
    assert same.state_root != before.state_root
    assert same.plan_id == before.plan_id and same.checkpoint_id == before.checkpoint_id
    assert any(d["decision"] == "retract_ignored" for d in plan(b).decisions)

    extra = contribute(c, models["ft2"], base=models["base"], weight="1")
    sync_all(a, b, c)
    with_extra = resolve(a, tmp_path / "extra", workers=1)
    assert with_extra.checkpoint_id != before.checkpoint_id
    c.retract([extra.id])
    sync_all(a, b, c)
    for r in (a, b, c):
        assert resolve(r, tmp_path / f"restored-{r.site}", workers=1).checkpoint_id == before.checkpoint_id


def test_retract_arriving_before_its_target(replicas, models, tmp_path: Path) -> None:
    a, b, _ = replicas
    contribute(a, models["ft0"], base=models["base"], weight="1")
    a.set_recipe("task_arithmetic", {"lambda": "1"}, anchor=anchor(a, models["base"]))
    sync_all(a, b)
    only_a = resolve(a, tmp_path / "out-a", workers=1).checkpoint_id
    op = contribute(b, models["ft1"], base=models["base"], weight="1")
    retract = b.retract([op.id])
    # a receives the retract alone first: it waits (its deps name the contribution, op
    # format v2), then the contribution arrives and both join together, the contribution
    # without its objects: its own member retracted it
    a.stage(b.get_op(retract.id).data)
    a.commit_staged()
    assert retract.id not in a.ops()
    a.stage(b.get_op(op.id).data)
    a.commit_staged()
    assert {retract.id, op.id} <= set(a.ops())
    assert not a.store.has(op.body["manifest"])
    assert a.state_root() == b.state_root()
    assert resolve(a, tmp_path / "out-a2", workers=1).checkpoint_id == only_a
    assert resolve(b, tmp_path / "out-b2", workers=1).checkpoint_id == only_a
    # resolve never replaces a folder it did not write (here: a replica)
    with pytest.raises(OutputExists):
        resolve(a, b.path, workers=1)
    assert b.state_root() == a.state_root()


def test_plan_excludes_nan_and_shape_mismatch_donors(replicas, models, tmp_path: Path) -> None:
    a, _, _ = replicas
    good = contribute(a, models["ft0"], base=models["base"], weight="1")
    nan_t = tensors(30)
    nan_t["model.norm.weight"][3] = float("nan")
    nan_op = contribute(a, write_model(tmp_path / "nan", nan_t), base=models["base"], weight="1")
    wide = tensors(31)
    wide["model.norm.weight"] = torch.zeros(17)
    donor = import_model(a.store, str(write_model(tmp_path / "wide", wide)), a.piece_size)
    wide_op = a.contribute(donor.manifest_id, label="wide", params={"weight": "1"})
    unweighted = contribute(a, models["ft1"], base=models["base"])
    a.set_recipe("task_arithmetic", {}, anchor=anchor(a, models["base"]))
    p = plan(a)
    assert [c.op_id for c in p.contributions] == [good.id]
    excluded = {d["op_id"]: d["detail"] for d in p.decisions if d["decision"] == "excluded"}
    assert "NaN" in excluded[nan_op.id] and "shape" in excluded[wide_op.id]
    assert "'weight' is required" in excluded[unweighted.id]
    # a replica that received the donors by sync (and never read them at import) agrees
    b = replicas[1]
    sync(b, LocalPeer(a))
    assert plan(b).decisions == p.decisions and plan(b).id == p.id
    a.set_recipe("task_arithmetic", {"allow_nonfinite": True}, anchor=anchor(a, models["base"]))
    assert nan_op.id in [c.op_id for c in plan(a).contributions]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_bit_test_agrees_with_torch(dtype: torch.dtype) -> None:
    from crdt_merge.store.finite import has_nonfinite
    from crdt_merge.store.tensors import dtype_name

    gen = torch.Generator().manual_seed(7)
    base = torch.randn(1000, generator=gen, dtype=torch.float64).to(dtype)
    big = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny,
                        0.0, -0.0], dtype=dtype)
    for special in (None, float("nan"), float("inf"), float("-inf")):
        t = torch.cat([base, big])
        if special is not None:
            t[500] = special
        raw = t.view(torch.uint8).numpy().tobytes()
        assert has_nonfinite(raw, dtype_name(dtype)) == (not bool(torch.isfinite(t).all()))


def test_bad_recipes_and_missing_base(replicas, models) -> None:
    a, _, _ = replicas
    with pytest.raises(PlanError, match="no recipe"):
        plan(a)
    contribute(a, models["ft0"], weight="1")
    a.set_recipe("no_such_method", {})
    with pytest.raises(UnknownMethod):
        plan(a)
    a.set_recipe("task_arithmetic", {})
    with pytest.raises(PlanError, match="needs a base"):
        plan(a)
    a.set_recipe("linear", {"dtype": "float8"})
    with pytest.raises(BadParameter):
        plan(a)
    a.set_recipe("linear", {"normalize": "sometimes"})
    with pytest.raises(BadParameter, match="normalize"):
        plan(a)


def test_recorded_plan_rederives_the_checkpoint(replicas, models, tmp_path: Path) -> None:
    a, _, _ = replicas
    contribute(a, models["ft0"], weight="2")
    contribute(a, models["ft1"], weight="1")
    a.set_recipe("linear", {"dtype": "bfloat16"})
    first = resolve(a, tmp_path / "first", workers=1, max_shard_size=4096)
    assert (first.out / "model.safetensors.index.json").is_file()
    again = resolve_recorded(a, first.out / "merge_manifest.json", tmp_path / "again", workers=1)
    assert again.checkpoint_id == first.checkpoint_id
    record = json.loads((first.out / "merge_manifest.json").read_text())
    record["plan"]["params"] = {"normalize": False}
    (tmp_path / "tampered.json").write_text(json.dumps(record))
    with pytest.raises(PlanError, match="hashes to"):
        resolve_recorded(a, tmp_path / "tampered.json", tmp_path / "x", workers=1)
    config = json.loads((first.out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert "## Contributions" in (first.out / "README.md").read_text()


@pytest.mark.parametrize("method, params", [
    ("linear", {}), ("task_arithmetic", {"lambda": "0.7"}), ("ties", {"density": "0.4"}),
    ("dare_ties", {"density": "0.6"}), ("breadcrumbs", {"density": "0.7", "gamma": "0.1"}),
])
def test_blockwise_execution_gives_the_same_bytes(replicas, models, tmp_path: Path, monkeypatch,
                                                  method: str, params: dict) -> None:
    """Streaming methods widen their inputs and round their output a block at a time: the
    bytes do not depend on the block size."""
    a, _, _ = replicas
    contribute(a, models["ft0"], base=models["base"], weight="0.6")
    contribute(a, models["ft1"], base=models["base"], weight="0.4")
    a.set_recipe(method, {**params, "dtype": "bfloat16"}, anchor=anchor(a, models["base"]))
    whole = resolve(a, tmp_path / "whole", workers=1)
    monkeypatch.setattr(reduce, "BLOCK", 8)  # blocks that cut rows and pieces anywhere
    blocks = resolve(a, tmp_path / "blocks", workers=1)
    assert blocks.checkpoint_id == whole.checkpoint_id
    assert (whole.out / "model.safetensors").read_bytes() == (blocks.out / "model.safetensors").read_bytes()


def test_cached_checkpoints_are_keyed_by_numeric_profile() -> None:
    """A cross_family checkpoint id cached by a process with another numeric profile (here
    another MKL_CBWR) is not reported as this one's; its profile names MKL's version. An
    exact method's profile (linear) names no BLAS: MKL_CBWR cannot change its bytes."""
    code = ("import json; from crdt_merge.resolve import checkpoint_key; "
            "from crdt_merge.resolve.profile import numeric_profile; "
            "print(json.dumps([checkpoint_key('ab' * 32, 'cross_family'), "
            "numeric_profile('cross_family'), checkpoint_key('ab' * 32, 'linear'), "
            "numeric_profile('linear')]))")

    def run(cbwr: str) -> list:
        env = {**os.environ, "MKL_CBWR": cbwr}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True)
        return json.loads(done.stdout)

    (key_a, profile_a, exact_a, plain_a) = run("COMPATIBLE")
    (key_b, profile_b, exact_b, plain_b) = run("AVX2")
    assert run("COMPATIBLE")[0] == key_a
    assert key_a != key_b and key_a.startswith("checkpoint/v2:" + "ab" * 32)
    assert (profile_a["mkl_cbwr"], profile_b["mkl_cbwr"]) == ("COMPATIBLE", "AVX2")
    assert profile_a["mkl"] == profile_b["mkl"] != ""
    assert exact_a == exact_b and plain_a == plain_b and exact_a != key_a
    assert "mkl" not in plain_a and "mkl_cbwr" not in plain_a
    assert plain_a["torch"] == profile_a["torch"] == torch.__version__
    assert exact_a == exact_b and plain_a == plain_b and exact_a != key_a
    assert "mkl" not in plain_a and "mkl_cbwr" not in plain_a
    assert plain_a["torch"] == profile_a["torch"] == torch.__version__
