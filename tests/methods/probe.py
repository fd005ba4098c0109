"""Run every method on fixed inputs and print the BLAKE3 of each output's bytes, as JSON.

``python -m tests.methods.probe [BLOCK] [--env]`` — used by test_determinism.py in subprocesses with
different torch thread counts and ``ATEN_CPU_CAPABILITY`` values, and with different block
sizes; all runs must print the same hashes, and the same as tests/methods/golden.json.
Regenerate that file (only on purpose, when a formula changes) with
``python -m tests.methods.probe > tests/methods/golden.json``.
"""

from __future__ import annotations

import json
import sys

import blake3
import torch

import crdt_merge.methods.reduce as reduce
import crdt_merge.methods.select as select
from tests.methods.helpers import run, tensor

SHAPE = (192, 200)  # over torch's 32768-element grain: its sums would change with threads

CASES: list[tuple[str, str, int, dict, dict]] = [
    # (case id, method, donors, per-donor params, options)
    ("linear", "linear", 3, {"weight": "0.4"}, {}),
    ("task_arithmetic", "task_arithmetic", 3, {"weight": "0.7"}, {"lambda": "0.9"}),
    ("ties", "ties", 3, {"weight": "0.5", "density": "0.35"}, {}),
    ("ties_rescale", "ties", 3, {"weight": "0.5", "density": "0.2"}, {"rescale": True}),
    ("dare_ties", "dare_ties", 3, {"weight": "0.6", "density": "0.4"}, {}),
    ("dare_linear", "dare_linear", 3, {"weight": "0.6", "density": "0.7"}, {"normalize": True}),
    ("breadcrumbs", "breadcrumbs", 3, {"weight": "0.5", "density": "0.6", "gamma": "0.05"}, {}),
    ("breadcrumbs_ties", "breadcrumbs_ties", 3, {"weight": "0.5", "density": "0.5"}, {}),
    ("della", "della", 3, {"weight": "0.5", "density": "0.5", "epsilon": "0.2"}, {}),
    ("della_linear", "della_linear", 3, {"weight": "0.5", "density": "0.4"}, {}),
    ("slerp", "slerp", 1, {}, {"t": "0.3"}),
    ("nuslerp", "nuslerp", 2, {"weight": "0.3"}, {}),
    ("nuslerp_rows", "nuslerp", 2, {"weight": "0.3"}, {"nuslerp_flatten": False}),
    (
        "nuslerp_cols",
        "nuslerp",
        2,
        {"weight": "0.3"},
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    ),
    ("multislerp", "multislerp", 3, {"weight": "0.4"}, {}),
    ("karcher", "karcher", 3, {}, {}),
    ("model_stock", "model_stock", 3, {}, {}),
    ("model_stock_rows", "model_stock", 3, {}, {"filter_wise": True}),
    ("passthrough", "passthrough", 1, {"scale": "0.5"}, {}),
    ("median", "median", 3, {}, {}),
    ("median_even", "median", 2, {}, {}),
    ("trimmed_mean", "trimmed_mean", 3, {}, {"trim": 1}),
    ("trimmed_mean_weighted", "trimmed_mean", 3, {"weight": "0.5"}, {"trim": 0}),
    ("clipped_ties", "clipped", 3, {"weight": "0.5", "density": "0.4"},
     {"then": "ties", "clip": "0.8"}),
    ("sce", "sce", 3, {}, {"select_topk": "0.4"}),
    ("nearswap", "nearswap", 1, {}, {"t": "0.01"}),
    ("arcee_fusion", "arcee_fusion", 1, {}, {}),
    ("ram", "ram", 3, {}, {"epsilon": "0.005"}),
    ("ramplus_tl", "ramplus_tl", 3, {}, {"epsilon": "0.005"}),
]


def hashes() -> dict[str, str]:
    """The case id -> BLAKE3 hex of the float64 output's little-endian bytes."""
    base = tensor("probe/base", SHAPE, 0.05)
    donors = [base + tensor(f"probe/delta{i}", SHAPE, 0.02) for i in range(3)]
    # a bf16-like donor adds exact ties of magnitude
    donors[2] = donors[2].to(torch.bfloat16).to(torch.float64)
    out = {}
    for case, method, count, params, options in CASES:
        use_base = None if method in ("linear", "karcher", "passthrough") else base
        merged = run(
            method,
            use_base,
            donors[:count],
            [dict(params)] * count,
            options,
            key_tag=f"probe/{case}",
        )
        out[case] = blake3.blake3(merged.contiguous().numpy().tobytes()).hexdigest()
    return out


def main() -> None:
    sizes = [a for a in sys.argv[1:] if a.isdigit()]
    if sizes:
        reduce.BLOCK = int(sizes[0])
        select._SAMPLE = 64  # small enough that the sampled selection path runs
    report = hashes()
    if "--env" in sys.argv:
        report["_env"] = f"{torch.get_num_threads()} {torch.backends.cpu.get_cpu_capability()}"
    print(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
