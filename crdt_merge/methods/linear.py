"""Linear merging ("model soups"): the weighted average of the inputs.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", https://arxiv.org/abs/2203.05482.

``out = ((0 + x_0*w_0) + x_1*w_1) + ...``, divided by ``W = ((0 + w_0) + w_1) + ...`` when
``normalize`` (the default). A base model, if the recipe names one, is just another input
(mergekit's rule), so the caller passes it among the donors with its own weight.
"""

from __future__ import annotations

import torch

from crdt_merge.errors import BadParameter
from crdt_merge.methods.base import Bound, Method, ParamSpec, TensorJob, register
from crdt_merge.methods.reduce import map_blocks


def _linear(job: TensorJob, bound: Bound) -> torch.Tensor:
    weights = [float(w) for w in bound.column("weight")]
    shape = job.donors[0].shape
    xs = [x.reshape(-1) for x in job.donors]
    total = 0.0
    for w in weights:
        total = total + w
    normalize = bool(bound.options["normalize"])
    if normalize and total == 0:
        raise BadParameter(
            f"linear on {job.name}: the weights sum to zero, so normalize would divide by "
            "zero; change the weights or set normalize: false"
        )

    def block(s: int, e: int) -> torch.Tensor:
        acc = torch.zeros(e - s, dtype=torch.float64)
        term = torch.empty(e - s, dtype=torch.float64)
        for x, w in zip(xs, weights, strict=True):
            acc.add_(term.copy_(x[s:e]).mul_(w))  # acc + widen(x) * w, each op rounded
        return acc.div_(total) if normalize else acc

    return map_blocks(xs[0].numel(), block, dtype=job.out_dtype).reshape(shape)


LINEAR = register(
    Method(
        name="linear",
        paper="https://arxiv.org/abs/2203.05482",
        base="ignored",
        params=(
            ParamSpec("weight", "per_model", float, doc="the input's weight"),
            ParamSpec("normalize", "global", bool, True, doc="divide by the sum of weights"),
        ),
        kernel=_linear,
        min_donors=1,
        streaming=True,
    )
)
