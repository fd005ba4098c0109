"""Linear merging ("model soups"): the weighted average of the inputs.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", https://arxiv.org/abs/2203.05482.

``out = ((0 + x_0*w_0) + x_1*w_1) + ...``, divided by ``W = ((0 + w_0) + w_1) + ...`` when
``normalize`` (the default). A base model, if the recipe names one, is just another input
(mergekit's rule), so the caller passes it among the donors with its own weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crdt_merge.errors import BadParameter
from crdt_merge.methods.base import Bound, Method, ParamSpec, Raw, register, via_raw
from crdt_merge.methods.reduce import BLOCK, blocks
from crdt_merge.numeric import round_raw, widen_raw


def _linear(bound: Bound, base: Raw | None, donors: Sequence[Raw], out: Raw) -> None:
    weights = [float(w) for w in bound.column("weight")]
    total = 0.0
    for w in weights:
        total = total + w
    normalize = bool(bound.options["normalize"])
    if normalize and total == 0:
        raise BadParameter(
            "linear: the weights sum to zero, so normalize would divide by zero; change "
            "the weights or set normalize: false"
        )
    n = out.values.size
    acc = np.empty(min(n, BLOCK))
    term = np.empty_like(acc)
    for s, e in blocks(n):
        a, t = acc[: e - s], term[: e - s]
        a.fill(0.0)
        for x, w in zip(donors, weights, strict=True):
            np.multiply(widen_raw(x.values[s:e], x.dtype, t), w, out=t)
            np.add(a, t, out=a)  # acc + widen(x) * w, each op rounded
        if normalize:
            np.divide(a, total, out=a)
        round_raw(a, out.dtype, out.values[s:e])


LINEAR = register(
    Method(
        name="linear",
        paper="https://arxiv.org/abs/2203.05482",
        base="ignored",
        params=(
            ParamSpec("weight", "per_model", float, doc="the input's weight"),
            ParamSpec("normalize", "global", bool, True, doc="divide by the sum of weights"),
        ),
        kernel=via_raw(_linear),
        raw_kernel=_linear,
        min_donors=1,
        streaming=True,
    )
)
