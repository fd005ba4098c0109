"""Robust merging on real weights (issue 16): three poisons, six methods, bits per byte.

The SmolLM2-135M fine-tunes of tests/bench/merge_quality.py (news, wiki; run that first
with the same ``--out``, e.g. ``--methods linear --steps 8 --eval-total 6000``) and one
poisoned donor of each kind the issue names, each made from the news fine-tune's task
vector ``d = news - base``:

- ``x100``: ``base + 100 d`` (a delta scaled by mistake, or on purpose);
- ``flip``: ``base - d`` (the sign flipped);
- ``noise``: ``base + r`` with ``r`` Gaussian noise of ``d``'s norm, tensor by tensor
  (``torch.Generator`` seeded with ``SEED + tensor index`` in name order).

One replica per donor set (``clean``: news and wiki; ``x100``/``flip``/``noise``: news, wiki
and that poison), every donor contributed with ``--base`` and weight 1, then per method a
recipe (anchor: the base) and ``resolve``: ``linear``, ``median``, ``trimmed_mean``
(trim 1; with two donors it would trim nothing and be linear, so it runs on the poisoned
sets only), ``clipped`` (``then=linear``, clip 1, per-tensor norms), ``krum`` and
``multi_krum`` (``f=0``, ``multi_krum`` ``m=2``: Krum scores each donor on its
``n - f - 2`` nearest others, so with three donors only ``f = 0`` is defined, and with two
none). The outlier report comes from ``crdt-merge --json plan`` of the ``median`` recipe
(where it is on by default): which donors it flags, and how long the plan took the first
time (computing the task-vector statistics) and the second (read from the replica's index).

Every model (base, fine-tunes, merges) is scored in this run as in merge_quality.py (same
held-out text and settings). Scores are cached by the model file's BLAKE3
(``scores/by-content/``), so a rerun or a merge that equals another one (trimmed_mean with
trim 1 of three donors *is* the median) is not scored twice. merge_quality.py's own scores
are not reused: scoring the same ft-news bytes gave bits per byte 0.9238 in its run of Dec 7
and 0.9424 here (cause not found), so only scores from one run are compared.
Command (from the repository root, under ``nice -n 19``)::

    nice -n 19 .venv/bin/python tests/bench/robust_quality.py --out /tmp/r/mq --eval-total 6000

Results: ``robust.json`` under ``--out`` and a Markdown table on stdout
(docs/benchmarks.md, "Robust merging on real weights").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench import merge_quality as mq  # noqa: E402

SEED = 0
KINDS = ("x100", "flip", "noise")
# (name, method, recipe params, on the clean set too)
METHODS: list[tuple[str, str, dict[str, str], bool]] = [
    ("linear", "linear", {}, True),
    ("median", "median", {}, True),
    ("trimmed_mean", "trimmed_mean", {"trim": "1"}, False),
    ("clipped", "clipped", {"then": "linear", "clip": "1.0"}, True),
    ("krum", "krum", {"f": "0"}, False),
    ("multi_krum", "multi_krum", {"f": "0", "m": "2"}, False),
]


def poison(base: Path, tuned: Path, target: Path, kind: str) -> Path:
    """The poisoned donor of ``kind`` (module docstring), float32, with ``tuned``'s other files."""
    if (target / ".complete").exists():
        return target
    import torch
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(tuned, target)
    b: dict[str, torch.Tensor] = {}
    for g in sorted(base.glob("*.safetensors")):
        b.update(load_file(str(g)))
    for f in sorted(target.glob("*.safetensors")):
        t = load_file(str(f))
        out = {}
        for index, name in enumerate(sorted(t)):
            v = t[name]
            if name not in b or not v.is_floating_point():
                out[name] = v
                continue
            z = b[name].double()
            d = v.double() - z
            if kind == "x100":
                p = z + 100.0 * d
            elif kind == "flip":
                p = z - d
            else:
                gen = torch.Generator().manual_seed(SEED + index)
                r = torch.randn(d.shape, generator=gen, dtype=torch.float64)
                norm, rn = float(d.norm()), float(r.norm())
                p = z + (r * (norm / rn) if rn > 0 else r * 0)
            out[name] = p.to(v.dtype)
        save_file(out, str(f), metadata={"format": "pt"})
    (target / ".complete").write_text(kind + "\n")
    return target


def content_id(folder: Path) -> str:
    from crdt_merge.hashing import digest

    return digest(b"".join(digest(f.read_bytes()).encode()
                           for f in sorted(folder.glob("*.safetensors"))))[:16]


def cli_json(*argv: str) -> Any:
    return json.loads(mq.cli("--json", *argv))


def build(out: Path, name: str, base: Path, donors: dict[str, Path], methods: list) -> dict:
    """One replica for the donor set ``name``; each method's recipe, plan and resolve."""
    info_file = out / "robust" / f"{name}.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    replica = out / "robust" / "replicas" / name
    if replica.exists():
        shutil.rmtree(replica)
    replica.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"donors": {k: str(v) for k, v in donors.items()}, "merges": {}}
    t0 = time.perf_counter()
    mq.cli("init", str(replica), "--site", "bench")
    labels: dict[str, str] = {}
    for label, path in donors.items():
        done = cli_json("contribute", str(replica), str(path), "--base", str(base),
                        "--label", label, "--weight", "1")
        labels[done["op_id"]] = label
    info["labels"] = labels
    info["contribute_s"] = round(time.perf_counter() - t0, 1)
    for mname, method, params, _ in methods:
        recipe = ["recipe", str(replica), "--method", method, "--anchor", str(base)]
        for key, value in params.items():
            recipe += ["--param", f"{key}={value}"]
        mq.cli(*recipe)
        entry: dict[str, Any] = {"method": method, "params": params}
        t = time.perf_counter()
        plan = cli_json("plan", str(replica))
        entry["plan_s"] = round(time.perf_counter() - t, 1)
        entry["excluded"] = sorted(labels[d["op_id"]] for d in plan.get("decisions", [])
                                   if d["decision"] == "excluded")
        if plan.get("outliers"):
            entry["outliers"] = [{**e, "label": labels[e["op_id"]]} for e in plan["outliers"]]
            entry["flagged"] = sorted(labels[e["op_id"]] for e in plan["outliers"] if e["flags"])
            t = time.perf_counter()
            cli_json("plan", str(replica))
            entry["plan_again_s"] = round(time.perf_counter() - t, 1)
        if method in ("krum", "multi_krum"):
            entry["selected"] = sorted(labels[i] for i in plan[method]["selected"])
            entry["scores"] = {labels.get(s["op_id"], s["op_id"]): s["score"]
                               for s in plan[method]["scores"]}
        entry["kept"] = sorted(labels[c["op_id"]] for c in plan["contributions"])
        target = out / "robust" / "merges" / name / mname
        if target.exists():
            shutil.rmtree(target)
        t = time.perf_counter()
        mq.cli("resolve", str(replica), "--out", str(target), "--workers", str(mq.THREADS))
        entry["resolve_s"] = round(time.perf_counter() - t, 1)
        entry["content"] = content_id(target)
        info["merges"][mname] = entry
        mq.log(f"{name}/{mname}: plan {entry['plan_s']} s, resolve {entry['resolve_s']} s, "
               f"kept {entry['kept']}, flagged {entry.get('flagged')}")
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/merge-quality"))
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--eval-chars", type=int, default=1500)
    p.add_argument("--eval-total", type=int, default=10000)
    p.add_argument("--kinds", default=",".join(KINDS))
    args = p.parse_args(argv)

    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tests.bench.real_models import real_model

    started = time.perf_counter()
    out: Path = args.out.resolve()
    base = real_model("smollm2-135m")
    tuned = {d: out / f"ft-{d}" for d in mq.DOMAINS}
    for path in tuned.values():
        if not (path / ".complete").exists():
            raise SystemExit(f"{path} missing: run tests/bench/merge_quality.py --out {out} first")
    data = mq.texts()
    kinds = [k for k in args.kinds.split(",") if k]
    sets: dict[str, dict[str, Path]] = {"clean": dict(tuned)}
    for kind in kinds:
        target = out / "ft-poison" if kind == "x100" else out / f"ft-poison-{kind}"
        sets[kind] = {**tuned, kind: poison(base, tuned["news"], target, kind)}
    results: dict[str, Any] = {"settings": vars(args) | {"out": str(out)}, "sets": {},
                               "scores": {}}
    for name, donors in sets.items():
        methods = [m for m in METHODS if name != "clean" or m[3]]
        results["sets"][name] = build(out, name, base, donors, methods)

    # scores, by content (merge_quality.py's name-keyed scores of the same bytes reused)
    key = f"len{args.eval_len}-chars{args.eval_chars}-total{args.eval_total}"
    cache = out / "scores" / "by-content"
    cache.mkdir(parents=True, exist_ok=True)
    models: dict[str, Path] = {"base": base, "ft-news": tuned["news"], "ft-wiki": tuned["wiki"]}
    for name, info in results["sets"].items():
        for mname in info["merges"]:
            models[f"{name}/{mname}"] = out / "robust" / "merges" / name / mname
    ids = {name: content_id(path) for name, path in models.items()}
    pool = ProcessPoolExecutor(max_workers=mq.THREADS, mp_context=get_context("spawn"),
                               initializer=mq._one_thread)
    pending: dict[tuple[str, str], Any] = {}
    with pool:
        for name, path in models.items():
            for d in mq.DOMAINS:
                f = cache / f"{ids[name]}.{d}.{key}.json"
                if (ids[name], d) in pending or f.exists():
                    continue
                pending[ids[name], d] = (f, pool.submit(mq.score, path, base, data[d][1], args))
        for (cid, d), (f, future) in pending.items():
            s = future.result()
            f.write_text(json.dumps(s, indent=2) + "\n")
            mq.log(f"scored {cid} on {d}: bpb {s['bpb']:.4f} ({s['seconds']} s)")
    for name in models:
        results["scores"][name] = {d: json.loads((cache / f"{ids[name]}.{d}.{key}.json").read_text())
                                   for d in mq.DOMAINS}
    results["content"] = ids
    results["machine"] = mq.machine()
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "robust.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    mq.log(f"done in {results['seconds']} s")
    return 0


def table(results: dict[str, Any]) -> str:
    sc = results["scores"]
    sets = list(results["sets"])
    head = "| method | " + " | ".join(f"{s} news | {s} wiki" for s in sets) + " |"
    rows = [head, "|---" * (1 + 2 * len(sets)) + "|"]
    for ref in ("base", "ft-news", "ft-wiki"):
        rows.append(f"| {ref} | " + " | ".join(
            f"{sc[ref]['news']['bpb']:.4f} | {sc[ref]['wiki']['bpb']:.4f}" for _ in sets) + " |")
    for mname, *_ in METHODS:
        cells = []
        for s in sets:
            key = f"{s}/{mname}"
            cells.append(f"{sc[key]['news']['bpb']:.4f} | {sc[key]['wiki']['bpb']:.4f}"
                         if key in sc else "- | -")
        rows.append(f"| {mname} | " + " | ".join(cells) + " |")
    flags = [f"{s}: flagged {results['sets'][s]['merges']['median'].get('flagged')}"
             for s in sets]
    return "\n".join(rows) + "\n\n" + "; ".join(flags)


if __name__ == "__main__":
    sys.exit(main())
