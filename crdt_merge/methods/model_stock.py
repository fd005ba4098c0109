"""Model Stock: move from the base toward the donors' average by their agreement angle.

Jang et al., "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522.

With base ``w_0`` and ``N >= 2`` donors ``w_i``, offsets ``o_i = w_i - w_0``, per vector (the
whole flattened tensor, or each row along the last dim with ``filter_wise: true``):
``cos_ij = clamp(<o_i, o_j> / max(|o_i| |o_j|, 1e-6), -1, 1)`` for ``i < j`` (fixed tree),
``cos`` = their mean (sum in pair order, then ``/ P``);
``t = N cos / (1 + (N - 1) cos)`` (``t = 0`` where ``|1 + (N - 1) cos| < 1e-6``);
``out = avg * t + w_0 * (1 - t)``, ``avg = (((0 + w_1) + w_2) + ...) / N``.
"""

from __future__ import annotations

from crdt_merge.lazy import torch
from crdt_merge.methods.base import Bound, Method, ParamSpec, TensorJob, register
from crdt_merge.methods.reduce import map_blocks, norm, tree_sum, tree_sum_rows

PRODUCT_MIN = 1e-6
SINGULAR = 1e-6


def _ratio(cos: float, count: int) -> float:
    denominator = 1 + (count - 1) * cos
    return 0.0 if abs(denominator) < SINGULAR else (count * cos) / denominator


def _flat(base: torch.Tensor, donors: list[torch.Tensor]) -> torch.Tensor:
    z = base.reshape(-1)
    xs = [x.reshape(-1) for x in donors]
    n, count = z.numel(), len(xs)
    norms = [norm(lambda s, e, x=x: x[s:e] - z[s:e], n) for x in xs]
    cos_sum, pairs = 0.0, 0
    for i in range(count):
        for j in range(i + 1, count):
            dot = tree_sum(lambda s, e, i=i, j=j: (xs[i][s:e] - z[s:e]) * (xs[j][s:e] - z[s:e]), n)
            cos_sum = cos_sum + min(1.0, max(-1.0, dot / max(norms[i] * norms[j], PRODUCT_MIN)))
            pairs += 1
    t = _ratio(cos_sum / pairs, count)

    def block(s: int, e: int) -> torch.Tensor:
        acc = torch.zeros(e - s, dtype=torch.float64)
        for x in xs:
            acc = acc + x[s:e]
        return (acc / count) * t + z[s:e] * (1 - t)

    return map_blocks(n, block).reshape(base.shape)


def _filter_wise(base: torch.Tensor, donors: list[torch.Tensor]) -> torch.Tensor:
    w0 = base.reshape(1, -1) if base.dim() < 2 else base.reshape(-1, base.shape[-1])
    ws = [x.reshape(w0.shape) for x in donors]
    count = len(ws)
    offsets = [w - w0 for w in ws]
    norms = [torch.sqrt(tree_sum_rows(o * o)) for o in offsets]
    cos_sum = torch.zeros(w0.shape[0], dtype=torch.float64)
    pairs = 0
    for i in range(count):
        for j in range(i + 1, count):
            dot = tree_sum_rows(offsets[i] * offsets[j])
            cos = torch.clamp(dot / torch.clamp(norms[i] * norms[j], min=PRODUCT_MIN), -1, 1)
            cos_sum = cos_sum + cos
            pairs += 1
    cos = (cos_sum / pairs).unsqueeze(1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    t = torch.where(singular, 0.0, (count * cos) / torch.where(singular, 1.0, denominator))
    acc = torch.zeros_like(w0)
    for w in ws:
        acc = acc + w
    return ((acc / count) * t + w0 * (1 - t)).reshape(base.shape)


def _model_stock(job: TensorJob, bound: Bound) -> torch.Tensor:
    if job.base is None:
        raise ValueError("model_stock needs a base")
    donors = list(job.donors)
    if bound.options["filter_wise"]:
        return _filter_wise(job.base, donors)
    return _flat(job.base, donors)


MODEL_STOCK = register(
    Method(
        name="model_stock",
        paper="https://arxiv.org/abs/2403.19522",
        base="required",
        params=(ParamSpec("filter_wise", "global", bool, False, doc="one ratio per row"),),
        kernel=_model_stock,
        min_donors=2,
    )
)
