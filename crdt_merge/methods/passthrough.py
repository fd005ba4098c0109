"""Passthrough: one input, copied (optionally scaled); the building block of layer slicing.

mergekit's ``passthrough`` (https://github.com/arcee-ai/mergekit), used with ``slices:`` to
stack layers of different models (frankenmerges, e.g. SOLAR's depth up-scaling,
https://arxiv.org/abs/2312.15166). Which source tensor feeds which output is decided by
:mod:`.slices`; this method only copies it, times ``scale`` when one is set.
"""

from __future__ import annotations

from crdt_merge.lazy import torch
from crdt_merge.methods.base import Bound, Method, ParamSpec, TensorJob, register


def _passthrough(job: TensorJob, bound: Bound) -> torch.Tensor:
    scale = bound.per_donor[0]["scale"]
    x = job.donors[0]
    return x.clone() if scale is None else x * float(scale)


PASSTHROUGH = register(
    Method(
        name="passthrough",
        paper="https://arxiv.org/abs/2312.15166",
        base="ignored",
        params=(ParamSpec("scale", "per_model", float, None, doc="multiply the tensor by"),),
        kernel=_passthrough,
        min_donors=1,
        max_donors=1,
    )
)
