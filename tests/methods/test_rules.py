"""Rules stated in specs/methods.md, with expected values computed here independently
(numpy float64 on dyadic inputs, exact), not taken from golden files the code wrote:
one donor at weight 1 gives ``base + lambda * delta`` for task arithmetic and the methods
built on it, on the tensor path and on the raw (streamed) path alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crdt_merge.methods import TensorJob, get_method
from crdt_merge.methods.base import Raw


def dyadic(seed: int, n: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)  # only draws small integers: the same everywhere
    return (rng.integers(-64, 65, n) * scale).astype(np.float32)


BASE = dyadic(1, 257, 1 / 16)
DELTA = dyadic(2, 257, 1 / 32)


@pytest.mark.parametrize("lam", ["0.5", "3", "-0.25"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "breadcrumbs"])
def test_one_donor_at_weight_one_gives_base_plus_lambda_delta(method: str, lam: str) -> None:
    expect = (BASE.astype(np.float64) + float(lam) * DELTA.astype(np.float64)).astype(np.float32)
    m = get_method(method)
    params = [{"weight": "1"} | ({"density": "1"} if method in ("ties", "dare_linear") else {})
              | ({"density": "1", "gamma": "0"} if method == "breadcrumbs" else {})]
    options = {"lambda": lam} | ({"normalize": False} if "normalize" in
                                 {p.name for p in m.params} else {})
    donor = torch.from_numpy(BASE + DELTA)
    job = TensorJob("t", torch.from_numpy(BASE), [donor], params, options,
                    [bytes(32)], out_dtype=torch.float32)
    got = m.merge(job).numpy()
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("lam", ["0.5", "3"])
def test_the_raw_path_applies_lambda_once(lam: str) -> None:
    m = get_method("task_arithmetic")
    out = Raw(np.empty_like(BASE), "F32")
    m.merge_raw("t", {"lambda": lam}, [{"weight": "1"}], Raw(BASE.copy(), "F32"),
                [Raw(BASE + DELTA, "F32")], out)
    expect = (BASE.astype(np.float64) + float(lam) * DELTA.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(out.values, expect)
