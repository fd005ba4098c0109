"""Report how far our bf16 outputs are from mergekit's, in bf16 ulps (a report, not a test).

mergekit computes most methods in the inputs' dtype (bf16 arithmetic for bf16 models); we
compute in float64 and round once. Equality is not expected, so this prints the
distribution of the differences per method instead::

    .venv/bin/python -m tests.oracle.bf16_ulps

It needs .venv-mergekit (tests/oracle/setup_mergekit.sh).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from crdt_merge.methods import TensorJob, get_method
from crdt_merge.numeric import round_to

ROOT = Path(__file__).resolve().parents[2]
CASES = [
    ("linear", False, {"weight": [0.5, 0.3, 0.2]}, {}),
    ("task_arithmetic", True, {"weight": [0.61, 0.37, 0.83]}, {}),
    ("ties", True, {"weight": [0.61, 0.37, 0.83], "density": [0.5, 0.5, 0.5]}, {}),
    ("breadcrumbs_ties", True, {"weight": [1.0, 1.0, 1.0], "density": [0.6] * 3}, {}),
    ("slerp", True, {}, {"t": 0.3}),
    ("model_stock", True, {}, {}),
    ("multislerp", True, {"weight": [1.0, 1.0, 1.0]}, {}),
]


def ulps(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """|a - b| in bf16 ulps of the larger magnitude (8 significant bits)."""
    x, y = a.double().numpy(), b.double().numpy()
    big = np.maximum(np.abs(x), np.abs(y))
    ulp = np.exp2(np.floor(np.log2(np.where(big > 0, big, 1.0))) - 7)
    return np.abs(x - y) / ulp


def main() -> None:
    rng = np.random.Generator(np.random.PCG64(5))
    shape = (256, 192)
    base = torch.from_numpy(rng.normal(0, 0.02, shape)).to(torch.bfloat16)
    donors = [
        (base.double() + torch.from_numpy(rng.normal(0, 0.002, shape))).to(torch.bfloat16)
        for _ in range(3)
    ]
    tensors = {"base": base, **{f"m{i}": d for i, d in enumerate(donors)}}
    tensors.update({f"{k}/f32": v.float() for k, v in list(tensors.items())})
    cases = []
    for method, with_base, per_model, shared in CASES:
        count = 1 if method == "slerp" else 3
        ids = (["base"] if with_base else []) + [f"m{i}" for i in range(count)]
        params = dict(shared)
        for name, values in per_model.items():
            params[name] = {f"m{i}": v for i, v in enumerate(values[:count])}
        cases.append(
            {
                "id": method,
                "method": method,
                "tensors": ids,
                "ids": ids,
                "base": "base" if with_base else None,
                "parameters": params,
            }
        )
        cases.append(
            {
                "id": f"{method}/f32",
                "method": method,
                "tensors": [f"{i}/f32" for i in ids],
                "ids": ids,
                "base": "base" if with_base else None,
                "parameters": params,
            }
        )
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        save_file(tensors, str(t / "in.safetensors"))
        (t / "req.json").write_text(
            json.dumps(
                {
                    "inputs": str(t / "in.safetensors"),
                    "outputs": str(t / "out.safetensors"),
                    "cases": cases,
                }
            )
        )
        subprocess.run(
            [
                str(ROOT / ".venv-mergekit/bin/python"),
                str(ROOT / "tests/oracle/run_mergekit.py"),
                str(t / "req.json"),
            ],
            check=True,
        )
        theirs = load_file(str(t / "out.safetensors"))
    for suffix, label in (
        ("", "mergekit in bf16 (its default for bf16 models)"),
        ("/f32", "mergekit with dtype: float32, rounded to bf16"),
    ):
        print(f"\n{label}: |ours - mergekit| in bf16 ulps, share of entries")
        print(f"{'method':18s} {'0':>7s} {'1':>7s} {'2':>7s} {'3-7':>7s} {'>=8':>7s}  max")
        for method, with_base, per_model, shared in CASES:
            m = get_method(method)
            count = 1 if method == "slerp" else 3
            per = [{k: repr(v[i]) for k, v in per_model.items()} for i in range(count)]
            opts = {k: repr(v) for k, v in shared.items()}
            job = TensorJob(
                method,
                base.double() if with_base else None,
                [d.double() for d in donors[:count]],
                per,
                opts,
            )
            ours = round_to(m.merge(job), torch.bfloat16)
            other = round_to(theirs[method + suffix].double(), torch.bfloat16)
            diff = np.round(ulps(ours, other)).astype(np.int64)
            c = Counter(np.minimum(diff, 8).ravel().tolist())
            share = [c[0], c[1], c[2], sum(c[k] for k in range(3, 8)), c[8]]
            print(
                f"{method:18s} "
                + " ".join(f"{100 * x / diff.size:6.2f}%" for x in share)
                + f"  {int(diff.max())}"
            )


if __name__ == "__main__":
    main()
