"""Run mergekit's own merge-method implementations on given tensors (the parity oracle).

Runs inside the mergekit environment (.venv-mergekit, made by setup_mergekit.sh), never
inside crdt-merge's. Usage::

    .venv-mergekit/bin/python tests/oracle/run_mergekit.py REQUEST.json

The request names an input safetensors file, an output file and a list of cases::

    {"inputs": "in.safetensors", "outputs": "out.safetensors",
     "cases": [{"id": "ties-1", "method": "ties",
                "tensors": ["base", "m0", "m1"],      # keys of the input file, in order
                "ids": ["base", "m0", "m1"],          # mergekit input ids
                "base": "base",                       # or null
                "parameters": {"density": {"m0": 0.5, "m1": 0.3}, "normalize": true},
                "seeds": [0, 1]}]}                    # optional: repeat under torch seeds

Each case calls ``mergekit.merge_methods.get(method)`` on one ``TensorGroup`` and writes the
result under the case id (``id/seed`` when seeds are given). Nothing here re-implements a
method: this file only feeds mergekit.
"""

from __future__ import annotations

import json
import sys

import torch
from mergekit.merge_methods import TensorGroup, get
from safetensors.torch import load_file, save_file


def run_case(case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    method = get(case["method"])
    ids = case["ids"]
    inputs = [tensors[key] for key in case["tensors"]]
    base = case.get("base")
    group = TensorGroup.from_tensors(
        inputs,
        ids=ids,
        base_index=None if base is None else ids.index(base),
        name=case.get("name", case["id"]),
    )
    results = {}
    seeds = case.get("seeds")
    for seed in seeds if seeds is not None else [None]:
        if seed is not None:
            torch.manual_seed(seed)
        (out,) = method([group], parameters=case.get("parameters", {}))
        key = case["id"] if seed is None else f"{case['id']}/{seed}"
        results[key] = out.contiguous()
    return results


def main(path: str) -> None:
    with open(path) as f:
        request = json.load(f)
    tensors = load_file(request["inputs"])
    results: dict[str, torch.Tensor] = {}
    for case in request["cases"]:
        results.update(run_case(case, tensors))
    save_file(results, request["outputs"])


if __name__ == "__main__":
    main(sys.argv[1])
