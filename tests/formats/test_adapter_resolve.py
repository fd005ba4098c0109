"""Adapter contributions through resolve: one adapter with linear / task_arithmetic weight 1
is PEFT's merge_and_unload() within one rounding of the output dtype; two adapters through
TIES equal TIES over their deltas given as float64 delta models; an adapter whose table
does not fit the plan's base is excluded by every replica; syncing one moves about the
adapter's size on the wire."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from crdt_merge.replica import Replica
from crdt_merge.resolve import execute, plan
from crdt_merge.store.importer import import_adapter, import_model
from tests.formats.peft_helpers import make_adapter, peft_merged, peft_scalings

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _project(tmp_path: Path) -> Replica:
    return Replica.create(tmp_path / "r", site="alpha", profile="test")


def _resolve(r: Replica, out: Path) -> dict[str, np.ndarray]:
    execute(r, plan(r), out)
    return load_file(str(out / "model.safetensors"))


def _contribute_adapter(r: Replica, base: Path, adapter: Path, weight: str = "1") -> str:
    b = import_model(r.store, str(base), r.piece_size)
    a = import_adapter(r.store, str(adapter), r.piece_size, b.manifest)
    r.contribute(a.manifest_id, form="adapter", base=b.manifest_id, params={"weight": weight})
    return b.manifest_id


CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA)),
    "rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 3},
                               alpha_pattern={"v_proj": 5}, modules_to_save=["lm_head"])),
    "gpt2_conv1d": ("gpt2", dict(r=2, lora_alpha=4, fan_in_fan_out=True,
                                 target_modules=["c_attn", "c_proj", "c_fc"])),
}


@pytest.mark.filterwarnings("ignore:.*fan_in_fan_out")
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_single_adapter_is_peft_merge_and_unload(tiny_models, tmp_path, case, method) -> None:
    family, lora = CASES[case]
    base = tiny_models.get(family)
    adapter = make_adapter(base, tmp_path / "ad", 1, **lora)
    r = _project(tmp_path)
    base_id = _contribute_adapter(r, base, adapter)
    r.set_recipe(method, {"lambda": "1"} if method == "task_arithmetic" else {}, anchor=base_id)
    ours = _resolve(r, tmp_path / "out")
    theirs = {k: v.numpy() for k, v in peft_merged(base, adapter).items()}
    plain = load_file(str(base / "model.safetensors"))
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    scalings = peft_scalings(base, adapter)  # PEFT's own scale per module
    changed = 0
    for name, t in ours.items():
        want = theirs[name]
        assert t.dtype == np.float32 and t.shape == want.shape, name
        changed += not np.array_equal(t, plain[name])
        if name not in scalings:  # untouched, or replaced (modules_to_save): PEFT's bytes
            assert t.tobytes() == want.tobytes(), name
            continue
        # an independent reference: numpy float64 (float32 factors, rank <= 4: every
        # product exact), rounded once to float32
        module = "base_model.model." + name.removesuffix(".weight")
        a = factors[module + ".lora_A.weight"].astype(np.float64)
        b = factors[module + ".lora_B.weight"].astype(np.float64)
        delta = scalings[name] * (b @ a)
        if lora.get("fan_in_fan_out"):
            delta = delta.T
        ref = (plain[name].astype(np.float64) + delta).astype(np.float32)
        assert np.array_equal(t, ref), name
        # PEFT (a float32 product, then a float32 add) within one rounding of the sizes it
        # adds: |W| and scale * |B| @ |A|
        size = scalings[name] * (np.abs(b) @ np.abs(a))
        size = np.abs(plain[name]) + (size.T if lora.get("fan_in_fan_out") else size)
        assert np.all(np.abs(t.astype(np.float64) - want) <= 2 * np.spacing(size.astype(np.float32))), name
    assert changed >= 4


def _independent_delta(adapter: Path, target: str, rank: int, alpha: float) -> np.ndarray:
    """scale * B @ A from the adapter file, in numpy float64 (rank 2: a single addition,
    so the order cannot matter)."""
    f = load_file(str(adapter / "adapter_model.safetensors"))
    module = "base_model.model." + target.removesuffix(".weight")
    a = f[module + ".lora_A.weight"].astype(np.float64)
    b = f[module + ".lora_B.weight"].astype(np.float64)
    assert a.shape[0] == rank == 2
    return (alpha / rank) * (b @ a)


def test_two_adapters_through_ties_equal_their_deltas_as_models(tiny_models, tmp_path) -> None:
    base = tiny_models.get("llama")
    lora = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"])
    adapters = [make_adapter(base, tmp_path / f"ad{i}", 10 + i, **lora) for i in range(2)]
    recipe = {"density": "0.6", "lambda": "1"}
    # adapters
    r = _project(tmp_path / "x")
    for i, ad in enumerate(adapters):
        base_id = _contribute_adapter(r, base, ad, weight=["1", "0.5"][i])
    r.set_recipe("ties", recipe, anchor=base_id)
    ours = _resolve(r, tmp_path / "out-adapters")
    # one worker or two: the same bytes
    execute(r, plan(r), tmp_path / "out-one", workers=1)
    assert ((tmp_path / "out-one" / "model.safetensors").read_bytes()
            == (tmp_path / "out-adapters" / "model.safetensors").read_bytes())
    # the same deltas as float64 delta models
    s = _project(tmp_path / "y")
    plain = load_file(str(base / "model.safetensors"))
    b = import_model(s.store, str(base), s.piece_size)
    for i, ad in enumerate(adapters):
        deltas = {}
        for name, t in plain.items():
            parts = name.split(".")
            if parts[-2] in lora["target_modules"]:
                deltas[name] = _independent_delta(ad, name, 2, 4.0)
            else:
                deltas[name] = np.zeros(t.shape, dtype=np.float64)
        folder = tmp_path / f"delta{i}"
        folder.mkdir()
        save_file(deltas, str(folder / "model.safetensors"))
        d = import_model(s.store, str(folder), s.piece_size)
        s.contribute(d.manifest_id, form="delta", base=b.manifest_id,
                     params={"weight": ["1", "0.5"][i]})
    s.set_recipe("ties", recipe, anchor=b.manifest_id)
    want = _resolve(s, tmp_path / "out-deltas")
    assert set(ours) == set(want)
    for name in ours:
        assert ours[name].tobytes() == want[name].tobytes(), name
    assert any(not np.array_equal(ours[n], plain[n]) for n in ours)


def test_adapter_pinned_to_another_base_is_excluded(tiny_models, tmp_path) -> None:
    """A site authors an adapter op naming a base the adapter does not fit (bypassing the
    CLI's check): every replica's plan excludes it, by name."""
    base = tiny_models.get("llama")
    other = tiny_models.get("llama", hidden_size=48, head_dim=12)
    adapter = make_adapter(base, tmp_path / "ad", 3, r=2, lora_alpha=4, target_modules=["q_proj"])
    r = _project(tmp_path)
    o = import_model(r.store, str(other), r.piece_size)
    a = import_adapter(r.store, str(adapter), r.piece_size, None)
    op = r.contribute(a.manifest_id, form="adapter", base=o.manifest_id, params={"weight": "1"})
    ft = import_model(r.store, str(tiny_models.get("llama", hidden_size=48, head_dim=12, seed=2)),
                      r.piece_size)
    r.contribute(ft.manifest_id, params={"weight": "1"})
    r.set_recipe("linear", {}, anchor=o.manifest_id)
    p = plan(r)
    assert [c.op_id for c in p.contributions] != [op.id]
    why = [d for d in p.decisions if d.get("op_id") == op.id]
    assert why and why[0]["decision"] == "excluded" and why[0]["detail"].startswith("adapter:")


def test_sync_of_an_adapter_moves_the_adapter_not_the_model(tiny_models, tmp_path) -> None:
    """alpha's replica served by uvicorn; beta, a replica already holding the base, syncs
    with it over HTTP after alpha contributes an adapter. The bytes on the wire (requests
    and responses, headers included) are about the adapter's size, a small fraction of
    the model's."""
    from crdt_merge.sync import sync
    from crdt_merge.sync.http import HttpPeer
    from tests.server.http_helpers import ServerProcess

    base = tiny_models.get("llama", hidden_size=64, head_dim=16, num_hidden_layers=4,
                           intermediate_size=256)
    adapter = make_adapter(base, tmp_path / "ad", 4, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    alpha = Replica.create(tmp_path / "alpha", site="alpha", profile="test")
    beta = Replica.join(tmp_path / "beta", site="beta", genesis=alpha.genesis_bytes())
    alpha.admit("beta", beta.public_key)
    b = import_model(alpha.store, str(base), alpha.piece_size)
    alpha.set_recipe("task_arithmetic", {"lambda": "1"}, anchor=b.manifest_id)
    servers = [ServerProcess(alpha.path).wait_ready()]
    try:
        with HttpPeer(servers[0].url) as peer:
            sync(beta, peer)  # beta holds the project and the base now
        model_bytes = sum(t.nbytes for t in b.manifest.tensors.values())
        a = import_adapter(alpha.store, str(adapter), alpha.piece_size, b.manifest)
        alpha.contribute(a.manifest_id, form="adapter", base=b.manifest_id, params={"weight": "1"})
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        with HttpPeer(servers[0].url) as src:
            stats = sync(beta, src)
            wire_bytes = sum(e.sent + e.received for e in src.log)
    finally:
        for s in servers:
            s.stop()
    assert stats.ops_received == 1 and beta.state_root() == alpha.state_root()
    print(f"adapter file {adapter_bytes} B, model tensors {model_bytes} B, "
          f"on the wire {wire_bytes} B")
    assert wire_bytes < 3 * adapter_bytes  # 4 KiB test pieces: HTTP headers per piece
    assert wire_bytes < model_bytes / 10
    beta.close()
    alpha.close()


def test_sync_of_an_adapter_between_two_servers_moves_the_adapter(tiny_models, tmp_path) -> None:
    """Two real servers (tests/bench/adapter_sync_bench.py): B pulls from A. After B holds
    the base, the round that brings alpha's adapter contribution moves less than three
    times the adapter file (4 KiB test pieces: one HTTP exchange each, headers included)
    and under a tenth of the model's tensor bytes; the first round moved the model."""
    from tests.bench.adapter_sync_bench import measure

    base = tiny_models.get("llama", hidden_size=64, head_dim=16, num_hidden_layers=4,
                           intermediate_size=256)
    adapter = make_adapter(base, tmp_path / "ad", 4, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    got = measure(base, adapter, tmp_path, "test")
    print(got)
    wire = got["adapter_round"]["sent"] + got["adapter_round"]["received"]
    assert got["same_state"] and got["adapter_round"]["ops_received"] == 1
    assert got["base_round"]["received"] > got["model_tensor_bytes"]  # the base came first
    assert wire < 3 * got["adapter_file_bytes"]
    assert wire < got["model_tensor_bytes"] / 10


@pytest.fixture
def adapter_and_models(tiny_models, tmp_path):
    """A replica with the tiny llama base imported, one adapter contribution and four
    fine-tunes of the base."""
    base = tiny_models.get("llama")
    adapter = make_adapter(base, tmp_path / "ad", 1, r=2, lora_alpha=4, target_modules=["q_proj"])
    r = _project(tmp_path)
    b = import_model(r.store, str(base), r.piece_size)
    a = import_adapter(r.store, str(adapter), r.piece_size, b.manifest)
    op = r.contribute(a.manifest_id, form="adapter", base=b.manifest_id, params={"weight": "1"})
    fts = []
    for seed in (1, 2, 3, 4):
        ft = import_model(r.store, str(tiny_models.get("llama", seed=seed)), r.piece_size)
        r.contribute(ft.manifest_id, base=b.manifest_id, params={"weight": "1"}, label=f"ft{seed}")
        fts.append(ft.manifest_id)
    yield r, b.manifest_id, a.manifest_id, op.id, fts
    r.close()


@pytest.mark.parametrize("method, params", [
    ("cross_family", {"preset": "asymmetric"}), ("linear", "slices"),
])
def test_adapters_with_whole_model_methods_and_slices_are_excluded_by_name(
        adapter_and_models, method, params) -> None:
    """cross_family and layer slices do not take adapters (krum and multi_krum do, issue
    16): the plan excludes the adapter contribution with a reason naming the method (or
    the slices), never silently;
    an exclusion rather than a plan error, so that one contribution cannot stop the
    merge of everyone else."""
    r, base, _, op_id, fts = adapter_and_models
    if params == "slices":
        params = {"slices": [{"sources": [{"model": fts[0], "layer_range": [0, 2]},
                                          {"model": fts[1], "layer_range": [0, 2]}]}]}
    r.set_recipe(method, params, anchor=base)
    p = plan(r)
    assert op_id not in [c.op_id for c in p.contributions]
    why = [d for d in p.decisions if d.get("op_id") == op_id and d["decision"] == "excluded"]
    assert len(why) == 1, p.decisions
    named = "layer slices" if "slices" in params else method
    assert why[0]["detail"].startswith(f"adapter: {named}"), why[0]["detail"]
    assert "adapter" in why[0]["detail"][len("adapter: "):]


def test_a_slice_naming_an_adapter_fails_the_plan(adapter_and_models) -> None:
    r, base, adapter_id, _, _ = adapter_and_models
    r.set_recipe("passthrough", {"slices": [{"sources": [{"model": adapter_id,
                                                          "layer_range": [0, 2]}]}]},
                 anchor=base)
    from crdt_merge.errors import PlanError
    with pytest.raises(PlanError, match="layer slices do not take adapter contributions"):
        plan(r)


def test_passthrough_of_one_adapter_is_its_materialised_model(tiny_models, tmp_path) -> None:
    """passthrough (no slices) over a lone adapter contribution writes base + delta, the
    same bytes as linear with weight 1 (itself PEFT's merge_and_unload, tested above)."""
    base = tiny_models.get("llama")
    adapter = make_adapter(base, tmp_path / "ad", 2, r=4, lora_alpha=8,
                           target_modules=["q_proj", "down_proj"])
    r = _project(tmp_path)
    base_id = _contribute_adapter(r, base, adapter)
    r.set_recipe("passthrough", {}, anchor=base_id)
    got = _resolve(r, tmp_path / "pass")
    r.set_recipe("linear", {}, anchor=base_id)
    want = _resolve(r, tmp_path / "linear")
    plain = load_file(str(base / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(got[k].tobytes() == want[k].tobytes() for k in got)
    assert not np.array_equal(got["model.layers.0.self_attn.q_proj.weight"],
                              plain["model.layers.0.self_attn.q_proj.weight"])
    r.close()
