"""Adapter contributions in the task-vector statistics (issue 16: "adapters and full
fine-tunes alike"): an adapter's outlier row and Krum distances are those of the same delta
contributed as a full model (equal floats, not close ones), a poisoned adapter among honest
ones is flagged, and multi_krum over adapters keeps the honest ones and merges them to the
bytes of the same merge over full models.

The values are dyadic (base: multiples of 2^-6 below 2; LoRA factors: multiples of 2^-3
in [-1, 1], rank 2, scale 1 or 100), so ``base + scale * B @ A`` is exact in float32: the
full model is exactly the adapter's donor, and every difference would be the code's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from crdt_merge.replica import Replica
from crdt_merge.resolve import execute
from crdt_merge.resolve import merge_plan as planning
from crdt_merge.resolve.outliers import cached_stats, task_vector_stats
from crdt_merge.store.importer import import_adapter, import_model
from tests.resolve.conftest import SHAPES, write_model

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
           "model.layers.1.self_attn.q_proj"]
RANK = 2


def _dyadic(gen: torch.Generator, shape: tuple[int, ...], lo: int, hi: int, step: float) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=gen).to(torch.float32) * step


def _factors(kind: str, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target module, (A, B): a shared A and B0 plus a small own part per donor;
    ``flip`` negates B, ``x100`` is the same factors with alpha 200 (scale 100)."""
    shared, own = torch.Generator().manual_seed(7), torch.Generator().manual_seed(100 + i)
    out = {}
    for module in TARGETS:
        out_dim, in_dim = SHAPES[module + ".weight"]
        a = _dyadic(shared, (RANK, in_dim), -8, 8, 1 / 8)
        b = _dyadic(shared, (out_dim, RANK), -8, 8, 1 / 8)
        b = (b + _dyadic(own, (out_dim, RANK), -1, 1, 1 / 8)).clamp(-1, 1)
        out[module] = (a, -b if kind == "flip" else b)
    return out


def _write_adapter(folder: Path, factors: dict, alpha: float) -> Path:
    folder.mkdir(parents=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": alpha, "bias": "none",
              "target_modules": ["q_proj", "up_proj"], "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _write_full(folder: Path, base: dict[str, torch.Tensor], factors: dict, scale: float) -> Path:
    """base + scale * B @ A as a float32 model; asserts the sum is exact."""
    out = {}
    for name, t in base.items():
        module = name.removesuffix(".weight")
        if module in factors:
            a, b = factors[module]
            wide = t.double() + scale * (b.double() @ a.double())
            out[name] = wide.float()
            assert torch.equal(out[name].double(), wide), name
        else:
            out[name] = t.clone()
    return write_model(folder, out)


def _base() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: _dyadic(gen, shape, -127, 127, 1 / 64) for name, shape in SHAPES.items()}


def _replicas(tmp_path: Path, kind: str) -> tuple[Replica, Replica, list[str]]:
    """Two replicas with the same five contributions (labels d0..d4; d2 is poisoned): as
    adapters in the first, as full float32 models in the second."""
    base = _base()
    base_dir = write_model(tmp_path / "base", base)
    ra = Replica.create(tmp_path / "ra", site="alpha", profile="test")
    rf = Replica.create(tmp_path / "rf", site="alpha", profile="test")
    labels = []
    for i in range(5):
        poisoned = i == 2
        factors = _factors(kind if poisoned else "honest", i)
        scale = 100.0 if poisoned and kind == "x100" else 1.0
        label = f"d{i}"
        labels.append(label)
        ad = _write_adapter(tmp_path / f"ad{i}", factors, RANK * scale)
        full = _write_full(tmp_path / f"full{i}", base, factors, scale)
        b = import_model(ra.store, str(base_dir), ra.piece_size)
        a = import_adapter(ra.store, str(ad), ra.piece_size, b.manifest)
        ra.contribute(a.manifest_id, form="adapter", base=b.manifest_id, label=label)
        fb = import_model(rf.store, str(base_dir), rf.piece_size)
        f = import_model(rf.store, str(full), rf.piece_size)
        rf.contribute(f.manifest_id, base=fb.manifest_id, label=label)
    return ra, rf, labels


def _base_id(r: Replica) -> str:
    return next(op.body["base"] for op in r.ops().values() if op.kind == "contribute")


def _by_label(r: Replica, p: planning.MergePlan) -> dict[str, dict]:
    labels = {c.op_id: c.label for c in p.contributions}
    for op_id, op in r.ops().items():
        if op.kind == "contribute":
            labels[op_id] = op.body["label"]
    return {labels[e["op_id"]]: {k: v for k, v in e.items() if k != "op_id"} for e in p.outliers}


@pytest.mark.parametrize("kind", ["x100", "flip"])
def test_an_adapter_row_is_that_of_the_same_delta_as_a_full_model(tmp_path: Path, kind: str) -> None:
    ra, rf, labels = _replicas(tmp_path, kind)
    for r in (ra, rf):
        r.set_recipe("median", {}, anchor=_base_id(r))
    pa, pf = planning.plan(ra), planning.plan(rf)
    assert [c.form for c in pa.contributions] == ["adapter"] * 5
    assert [c.form for c in pf.contributions] == ["full"] * 5
    rows_a, rows_f = _by_label(ra, pa), _by_label(rf, pf)
    assert rows_a == rows_f
    flagged = sorted(label for label, row in rows_a.items() if row["flags"])
    assert flagged == ["d2"], rows_a
    assert rows_a["d2"]["flags"] == (["norm"] if kind == "x100" else ["direction"])
    # the statistics themselves, float for float, donors matched by label
    def stats(r: Replica, p: planning.MergePlan):
        base = r.get_manifest(p.base)
        donors = [(r.get_manifest(c.manifest), c.form) for c in p.contributions]
        order = [c.label for c in p.contributions]
        return task_vector_stats(r.store, base, donors), order
    (sa, oa), (sf, of) = stats(ra, pa), stats(rf, pf)
    for x in labels:
        for y in labels:
            i, j, k, m = oa.index(x), oa.index(y), of.index(x), of.index(y)
            assert sa.gram[i][j] == sf.gram[k][m] and sa.dist2[i][j] == sf.dist2[k][m], (x, y)
            for name in SHAPES:
                assert sa.tensors[name][i][j] == sf.tensors[name][k][m], (name, x, y)
    assert sa.gram[oa.index("d0")][oa.index("d0")] > 0
    ra.close()
    rf.close()


def test_multi_krum_over_adapters_keeps_the_honest_and_merges_like_full_models(tmp_path: Path) -> None:
    ra, rf, _ = _replicas(tmp_path, "x100")
    outs = []
    for name, r in (("a", ra), ("f", rf)):
        r.set_recipe("multi_krum", {"f": "1", "m": "4"}, anchor=_base_id(r))
        p = planning.plan(r)
        assert sorted(c.label for c in p.contributions) == ["d0", "d1", "d3", "d4"], p.decisions
        assert [d["decision"] for d in p.decisions] == ["excluded"]
        execute(r, p, tmp_path / f"out-{name}")
        outs.append(load_file(str(tmp_path / f"out-{name}" / "model.safetensors")))
        r.close()
    assert set(outs[0]) == set(SHAPES)
    for name in SHAPES:
        assert outs[0][name].numpy().tobytes() == outs[1][name].numpy().tobytes(), name
    assert any(not torch.equal(outs[0][n], _base()[n]) for n in SHAPES)


@pytest.mark.parametrize("method, params", [
    ("clipped", {"then": "median", "norms": "model"}),
    ("median", {"exclude_outliers": True}),
])
def test_robust_merges_over_adapters_are_those_over_full_models(tmp_path: Path, method,
                                                                params) -> None:
    """Whole-model clip norms and outlier exclusion read an adapter's task vector like a
    full model's: same plan decisions, same output bytes."""
    ra, rf, _ = _replicas(tmp_path, "x100")
    outs, kept = [], []
    for name, r in (("a", ra), ("f", rf)):
        r.set_recipe(method, params, anchor=_base_id(r))
        p = planning.plan(r)
        kept.append(sorted((c.label, c.params.get("model_norm", "")) for c in p.contributions))
        execute(r, p, tmp_path / f"out-{name}")
        outs.append(load_file(str(tmp_path / f"out-{name}" / "model.safetensors")))
        r.close()
    assert kept[0] == kept[1]
    if method == "median":
        assert [label for label, _ in kept[0]] == ["d0", "d1", "d3", "d4"]
    else:
        assert all(norm for _, norm in kept[0])
    for name in SHAPES:
        assert outs[0][name].numpy().tobytes() == outs[1][name].numpy().tobytes(), name


def test_cached_pair_sums_give_the_fresh_statistics(tmp_path: Path) -> None:
    """The per-pair values kept in the replica's index give the statistics bit for bit,
    for the whole set and for any subset (a new contribution costs only its pairs)."""
    from crdt_merge.resolve import outliers

    ra, rf, _ = _replicas(tmp_path, "flip")
    for r in (ra, rf):
        base = r.get_manifest(_base_id(r))
        donors = [(r.get_manifest(op.body["manifest"]), op.body["form"])
                  for _, op in sorted(r.ops().items()) if op.kind == "contribute"]
        fresh = task_vector_stats(r.store, base, donors)
        for subset in (donors[:3], donors, donors[1:] + donors[:1], [donors[0], donors[0]]):
            outliers._CACHE.clear()
            got = cached_stats(r.store, base, subset)
            want = task_vector_stats(r.store, base, subset)
            assert got == want
        outliers._CACHE.clear()
        assert cached_stats(r.store, base, donors) == fresh
        keys = [k for k, in r.store.index.query("SELECT key FROM meta WHERE key LIKE 'taskstats/%'")]
        assert len(keys) == 15  # 5 donors: every pair once, with itself too
        r.close()


def _tree(x: list[float]) -> float:
    """The fixed tree of specs/methods.md section 3 in plain Python floats: pad with +0.0
    to a power of two, add the second half onto the first until one value is left."""
    size = 1
    while size < len(x):
        size *= 2
    v = list(x) + [0.0] * (size - len(x))
    while len(v) > 1:
        h = len(v) // 2
        v = [v[k] + v[k + h] for k in range(h)]
    return v[0] if v else 0.0


@pytest.mark.parametrize("block", [4, 64, 1 << 14])
def test_statistics_equal_an_independent_float64_reference(tmp_path: Path, monkeypatch,
                                                           block: int) -> None:
    """bfloat16 and float16 full models and a float32 delta against a bfloat16 base, the
    kernel's leaf block shrunk so the tree over blocks runs: every per-tensor and
    whole-model sum equals Python floats in the specified order."""
    from crdt_merge.resolve import outliers

    monkeypatch.setattr(outliers, "PAIR_BLOCK", block)
    gen = torch.Generator().manual_seed(3)
    base = {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in SHAPES.items()}
    fulls = [{n: (t.double() + 0.05 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
                  ).to(dtype) for n, t in base.items()}
             for dtype in (torch.bfloat16, torch.float16)]
    delta = {n: 0.05 * torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    b = import_model(r.store, str(write_model(tmp_path / "base", base)), r.piece_size)
    donors = [(import_model(r.store, str(write_model(tmp_path / f"f{i}", f)), r.piece_size).manifest,
               "full") for i, f in enumerate(fulls)]
    donors.append((import_model(r.store, str(write_model(tmp_path / "d", delta)),
                                r.piece_size).manifest, "delta"))
    got = task_vector_stats(r.store, b.manifest, donors)
    vecs = [[(f[n].double() - base[n].double()).reshape(-1).tolist() for n in sorted(SHAPES)]
            for f in fulls] + [[delta[n].double().reshape(-1).tolist() for n in sorted(SHAPES)]]
    gram = [[0.0] * 3 for _ in range(3)]
    for t, name in enumerate(sorted(SHAPES)):
        for i in range(3):
            for j in range(3):
                want = _tree([x * y for x, y in zip(vecs[i][t], vecs[j][t], strict=True)])
                assert got.tensors[name][i][j] == want, (name, i, j)
                gram[i][j] = gram[i][j] + want
    assert got.gram == gram
    for i in range(3):
        for j in range(3):
            want = 0.0 if i == j else max((gram[i][i] + gram[j][j]) - 2.0 * gram[i][j], 0.0)
            assert got.dist2[i][j] == want
    r.close()
