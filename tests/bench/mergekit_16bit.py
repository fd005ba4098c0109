"""How often a 16-bit TIES merge keeps a different element than mergekit's.

crdt-merge computes every method in float64 and rounds once to the output dtype; mergekit
computes in the inputs' dtype (here bfloat16 or float16), rounding at every step. This
script merges the same bf16/fp16 tensors with both (mergekit through tests/oracle, in its
own environment) and counts the elements whose bits differ. Run::

    nice -n 19 .venv/bin/python tests/bench/mergekit_16bit.py [--elements N]

Results go to docs/mergekit.md (command, machine, date).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from crdt_merge.methods import TensorJob, get_method

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv-mergekit" / "bin" / "python"
ORACLE = ROOT / "tests" / "oracle" / "run_mergekit.py"
WEIGHTS = (1.0, 0.7, 0.5)
DENSITY = (0.5, 0.4, 0.6)


def inputs(n: int, dtype: torch.dtype, seed: int, delta: float) -> list[torch.Tensor]:
    """A base ~N(0, 0.02) and three fine-tunes: base + N(0, delta)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.02, n)
    out = [base] + [base + rng.normal(0, delta, n) for _ in WEIGHTS]
    return [torch.from_numpy(a).to(dtype) for a in out]


def ours(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    method = get_method("ties")
    per_model = [{"weight": repr(w), "density": repr(d)} for w, d in zip(WEIGHTS, DENSITY, strict=True)]
    job = TensorJob("t", tensors[0], tensors[1:], per_model, {}, out_dtype=dtype)
    return method.merge(job)


def theirs(tensors: list[torch.Tensor], tmp: Path) -> torch.Tensor:
    names = ["base", "m0", "m1", "m2"]
    save_file(dict(zip(names, tensors, strict=True)), str(tmp / "in.safetensors"))
    case = {"id": "ties", "method": "ties", "tensors": names, "ids": names, "base": "base",
            "parameters": {"weight": {f"m{i}": w for i, w in enumerate(WEIGHTS)},
                           "density": {f"m{i}": d for i, d in enumerate(DENSITY)}}}
    (tmp / "req.json").write_text(json.dumps({"inputs": str(tmp / "in.safetensors"),
                                              "outputs": str(tmp / "out.safetensors"),
                                              "cases": [case]}))
    subprocess.run([str(PYTHON), str(ORACLE), str(tmp / "req.json")], check=True)
    return load_file(str(tmp / "out.safetensors"))["ties"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=4_000_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--delta", type=float, default=0.002,
                        help="the fine-tunes' spread around the base (std)")
    args = parser.parse_args()
    for dtype in (torch.bfloat16, torch.float16):
        differ = total = over1 = far = not_exact = 0
        for seed in range(args.seeds):
            tensors = inputs(args.elements, dtype, seed, args.delta)
            with tempfile.TemporaryDirectory() as tmp:
                mk = theirs(tensors, Path(tmp))
            mine = ours(tensors, dtype).reshape(mk.shape)
            if mk.dtype != dtype:  # mergekit's own output dtype for these inputs
                print(f"note: mergekit returned {mk.dtype} for {dtype} inputs; rounded to "
                      f"{dtype} once for the comparison", flush=True)
                mk = mk.to(dtype)
            exact = ours(tensors, torch.float64).reshape(mk.shape).to(dtype)  # one rounding
            not_exact += int((mine.view(torch.int16) != exact.view(torch.int16)).sum())
            a, b = mine.view(torch.int16).long(), mk.view(torch.int16).long()
            differ += int((a != b).sum())
            same_sign = (a >= 0) == (b >= 0)
            ulps = torch.where(same_sign, (a - b).abs(), torch.full_like(a, 2**16))
            far = max(far, int(ulps.max()))
            over1 += int((ulps > 1).sum())
            total += mk.numel()
        print(f"delta {args.delta}: {str(dtype).split('.')[-1]}: {differ} of {total} elements differ "
              f"({100 * differ / total:.4f}%); {over1} by more than one unit in the last "
              f"place, at most {far}; ours differs from the float64 result rounded once on "
              f"{not_exact}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
