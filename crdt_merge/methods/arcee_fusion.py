"""Arcee Fusion: take the donor's change only where it matters most.

Arcee AI (mergekit 0.1.5's ``arcee_fusion``; reference https://arcee.ai). Base ``b``, one
donor ``x``, rows along the last dimension (a 1-D tensor is one row):

1. ``p = softmax(x) + 1e-8``, ``q = softmax(b) + 1e-8`` per row, with
   ``softmax(v) = exp(v - max v) / fixed_sum(exp(v - max v))``;
   ``kl = fixed_sum(p * log(p / q))`` per row; importance ``I = |x - b| * kl``.
2. Over all of ``I`` (sorted, exact): ``Q(q) = sorted(I)[floor(q * (n - 1))]``;
   threshold ``T = Q(0.5) + 1.5 * (Q(0.75) - Q(0.25))``.
3. ``out = b + (x - b) * [I >= T]``.

``exp``/``log`` are :mod:`.explog`'s. mergekit samples 10^6 elements at random for the
quantiles of larger tensors; here they are exact over all elements.
"""

from __future__ import annotations

import numpy as np

from crdt_merge.lazy import torch
from crdt_merge.methods.base import Bound, Method, TensorJob, register
from crdt_merge.methods.explog import exp, log
from crdt_merge.methods.reduce import tree_sum_rows

SOFTMAX_EPS = 1e-8


def _row_sum(a: np.ndarray) -> np.ndarray:
    return tree_sum_rows(torch.from_numpy(np.ascontiguousarray(a))).numpy()[:, None]


def softmax_rows(v: np.ndarray) -> np.ndarray:
    """Softmax of each row of a 2-D array (see the module docstring)."""
    e = exp(v - v.max(axis=1, keepdims=True))
    return e / _row_sum(e)


def importance(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Step 1's ``I`` for 2-D (rows) arrays."""
    p = softmax_rows(x) + SOFTMAX_EPS
    q = softmax_rows(b) + SOFTMAX_EPS
    kl = _row_sum(p * log(p / q))
    return np.abs(x - b) * kl


def threshold(imp: np.ndarray) -> float:
    """Step 2's ``T``."""
    v = np.sort(imp.reshape(-1))
    last = v.size - 1
    q1, med, q3 = (float(v[int(q * last)]) for q in (0.25, 0.5, 0.75))
    return med + 1.5 * (q3 - q1)


def _arcee_fusion(job: TensorJob, bound: Bound) -> torch.Tensor:
    if job.base is None:
        raise ValueError("arcee_fusion needs a base")
    shape = job.base.shape
    cols = shape[-1] if len(shape) else 1
    b = job.base.reshape(-1, cols).numpy()
    x = job.donors[0].reshape(-1, cols).numpy()
    imp = importance(x, b)
    keep = imp >= threshold(imp)
    out = b + (x - b) * keep
    return torch.from_numpy(out).reshape(shape)


ARCEE_FUSION = register(
    Method(
        name="arcee_fusion",
        paper="https://arcee.ai",
        base="required",
        params=(),
        kernel=_arcee_fusion,
        min_donors=1,
        max_donors=1,
    )
)
