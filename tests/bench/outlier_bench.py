"""The outlier report's cost beside a linear resolve (issue 16), before and after.

Uses the synthetic models and the imported replica of tests/bench/resolve_bench.py (run it
once with the same ``--out``; four Llama-shaped models of 169.9M bf16 parameters: base,
ft1..ft3). Each step is a cold child process (``python -m crdt_merge``), measured like
resolve_bench (wall, CPU of the tree, peak RSS), on a copy of the imported replica with
base, ft1, ft2 and ft3 contributed (base as anchor: four task vectors) and:

1. ``linear`` (weights 0.4/0.2/0.2/0.2): ``resolve``, the reference of every ratio;
2. ``median`` with its default outlier report, its task-vector statistics removed from
   the replica's index first: ``plan`` (computes them: the cold cost), ``plan`` again and
   ``status`` (read from the index), then ``resolve``;
3. with ``--old REV`` (a git revision, e.g. the commit before the fast kernel and the
   cache): the same cold ``plan`` with that revision's package (a ``git worktree`` of it
   under ``--out``), and its report compared with this one's (it must be the same bytes).

Command (from the repository root, under ``nice -n 19``)::

    nice -n 19 .venv/bin/python tests/bench/outlier_bench.py --out /tmp/r/rb --old b59f08d

Prints a table and writes ``OUT/outlier_bench.json`` (docs/benchmarks.md, "Speed of the
outlier report").
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench import resolve_bench as rb  # noqa: E402


def clear_stats(replica: Path) -> int:
    """Remove the cached task-vector statistics from a replica's index; returns how many."""
    with sqlite3.connect(replica / "replica.sqlite") as db:
        n = db.execute("DELETE FROM meta WHERE key LIKE 'taskstats/%'").rowcount
    db.close()
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", type=Path, required=True, help="resolve_bench.py's --out")
    p.add_argument("--old", default="", help="a git revision to time the cold plan with")
    args = p.parse_args(argv)
    out = args.out.resolve()
    work = out / "work"
    imported = work / "imported"
    if not imported.is_dir():
        raise SystemExit(f"{imported} missing: run tests/bench/resolve_bench.py --out {out} first")
    paths = rb.build_models(out / "models")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    py = [sys.executable, "-m", "crdt_merge", "--json"]
    res: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                           "machine": rb.machine(), "runs": {}}

    def run(name: str, argv: list[str], run_env: dict[str, str] | None = None) -> rb.Run:
        r = rb.measure(argv, work / f"ob-{name}", run_env or env)
        if r.returncode != 0:
            raise RuntimeError(f"{name}: exit {r.returncode}, see {work / f'ob-{name}.err'}")
        res["runs"][name] = r.to_json()
        print(f"{name}: wall {r.wall_s:.1f} s, CPU {r.cpu_s:.1f} s, "
              f"peak RSS {r.peak_rss_mb:.0f} MB", flush=True)
        return r

    lin = work / "ob-replica-linear"
    rb.prepare(rb.CASES["linear"], paths, imported, lin)
    run("linear resolve", [*py, "resolve", str(lin), "--out", str(work / "ob-out-linear")])
    med = work / "ob-replica-median"
    rb.prepare(rb.CASES["median_report"], paths, imported, med)
    res["cleared_keys"] = clear_stats(med)
    cold = run("median plan (statistics computed)", [*py, "plan", str(med)])
    run("median plan again (from the index)", [*py, "plan", str(med)])
    run("status (from the index)", [*py, "status", str(med)])
    run("median resolve (report from the index)",
        [*py, "resolve", str(med), "--out", str(work / "ob-out-median")])
    report = json.loads(cold.stdout)["outliers"]
    res["report"] = report
    if args.old:
        tree = out / "old-tree"
        if tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                        args.old], check=True, capture_output=True)
        try:
            clear_stats(med)
            boot = (f"import sys; sys.path.insert(0, {str(tree)!r}); import crdt_merge, runpy; "
                    f"assert crdt_merge.__file__.startswith({str(tree)!r}), crdt_merge.__file__; "
                    f"sys.argv = ['crdt_merge', '--json', 'plan', {str(med)!r}]; "
                    "runpy.run_module('crdt_merge', run_name='__main__')")
            old = run(f"median plan at {args.old} (statistics computed)",
                      [sys.executable, "-c", boot])
            res["old_report_equal"] = json.loads(old.stdout)["outliers"] == report
            print(f"the old revision's report is the same: {res['old_report_equal']}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False)
    base = res["runs"]["linear resolve"]
    print("\n| step | wall s | CPU s | peak RSS MB | wall / linear | CPU / linear |")
    print("|---|---|---|---|---|---|")
    for name, r in res["runs"].items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:,.0f} | "
              f"{r['wall_s'] / base['wall_s']:.2f} | {r['cpu_s'] / base['cpu_s']:.2f} |")
    (out / "outlier_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    for d in (lin, med, work / "ob-out-linear", work / "ob-out-median"):
        subprocess.run(["rm", "-rf", str(d)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
