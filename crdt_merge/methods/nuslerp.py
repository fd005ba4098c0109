"""NuSLERP: SLERP between two models (or two task vectors) with weights instead of ``t``.

mergekit's "NuSLERP", after Shoemake, "Animating rotation with quaternion curves"
(SIGGRAPH 1985), https://doi.org/10.1145/325165.325242. ``t = w_1 / (w_0 + w_1)`` (``0.5`` if ``|w_0 + w_1| < 1e-6``). With a base,
the two task vectors ``v_i = x_i - base`` are interpolated and the base added back.

Vectors are the whole flattened tensor (``nuslerp_flatten: true``, the default), else each
row along the last dim, or along dim 0 with ``nuslerp_row_wise: true``. Per vector:
``n_i = max(|v_i|, 1e-7)`` (fixed tree), ``c = clamp(sum(v_0*v_1) / (n_0 n_1), -1, 1)``;
colinear iff ``1 - c*c <= 1e-16``, then ``out = v_0*(1 - t) + v_1*t``; otherwise
``theta = acos(c)`` and ``out = (v_0*sin((1 - t) theta) + v_1*sin(t theta)) / sin(theta)``.
"""

from __future__ import annotations

from crdt_merge.lazy import torch
from crdt_merge.methods import trig
from crdt_merge.methods.base import Bound, Method, ParamSpec, TensorJob, register
from crdt_merge.methods.reduce import map_blocks, norm, tree_sum, tree_sum_rows

NORM_MIN = 1e-7
COLINEAR_EPS2 = 1e-8**2


def _flat(t: float, x0: torch.Tensor, x1: torch.Tensor, base: torch.Tensor | None):
    a, b = x0.reshape(-1), x1.reshape(-1)
    z = None if base is None else base.reshape(-1)
    n = a.numel()

    def v(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return x[s:e] if z is None else x[s:e] - z[s:e]

    n0 = max(norm(lambda s, e: v(a, s, e), n), NORM_MIN)
    n1 = max(norm(lambda s, e: v(b, s, e), n), NORM_MIN)
    c = min(1.0, max(-1.0, tree_sum(lambda s, e: v(a, s, e) * v(b, s, e), n) / (n0 * n1)))
    if 1 - c * c <= COLINEAR_EPS2:

        def block(s: int, e: int) -> torch.Tensor:
            return v(a, s, e) * (1 - t) + v(b, s, e) * t
    else:
        theta = trig.acos(c)
        s0, s1, st = trig.sin((1 - t) * theta), trig.sin(t * theta), trig.sin(theta)

        def block(s: int, e: int) -> torch.Tensor:
            return (v(a, s, e) * s0 + v(b, s, e) * s1) / st

    if z is None:
        return map_blocks(n, block).reshape(x0.shape)
    return map_blocks(n, lambda s, e: z[s:e] + block(s, e)).reshape(x0.shape)


def nuslerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Row-by-row NuSLERP of two 2-D float64 tensors (each row one vector)."""
    n0 = torch.clamp(torch.sqrt(tree_sum_rows(v0 * v0)), min=NORM_MIN)
    n1 = torch.clamp(torch.sqrt(tree_sum_rows(v1 * v1)), min=NORM_MIN)
    c = torch.clamp(tree_sum_rows(v0 * v1) / (n0 * n1), -1.0, 1.0)
    colinear = (1 - c * c) <= COLINEAR_EPS2
    theta = trig.acos_t(torch.where(colinear, 0.0, c))
    s0 = trig.sin_t((1 - t) * theta).unsqueeze(1)
    s1 = trig.sin_t(t * theta).unsqueeze(1)
    st = trig.sin_t(theta).unsqueeze(1)
    spherical = (v0 * s0 + v1 * s1) / st
    linear = v0 * (1 - t) + v1 * t
    return torch.where(colinear.unsqueeze(1), linear, spherical)


def _rows(t: float, x0: torch.Tensor, x1: torch.Tensor, base, row_wise: bool):
    v0, v1 = (x0, x1) if base is None else (x0 - base, x1 - base)
    if v0.dim() == 0:
        v0, v1 = v0.reshape(1), v1.reshape(1)
    if row_wise and v0.dim() > 1:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    moved = v0.shape
    out = nuslerp_rows(t, v0.reshape(-1, moved[-1]), v1.reshape(-1, moved[-1])).reshape(moved)
    if row_wise and out.dim() > 1:
        out = out.transpose(0, -1)
    out = out.reshape(x0.shape)
    return out if base is None else base + out


def _nuslerp(job: TensorJob, bound: Bound) -> torch.Tensor:
    w0, w1 = (float(w) for w in bound.column("weight"))
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    x0, x1 = job.donors
    if bound.options["nuslerp_flatten"]:
        return _flat(t, x0, x1, job.base)
    return _rows(t, x0, x1, job.base, bool(bound.options["nuslerp_row_wise"])).contiguous()


NUSLERP = register(
    Method(
        name="nuslerp",
        paper="https://doi.org/10.1145/325165.325242",
        base="optional",
        params=(
            ParamSpec("weight", "per_model", float, doc="the model's weight"),
            ParamSpec("nuslerp_flatten", "global", bool, True, doc="one vector per tensor"),
            ParamSpec("nuslerp_row_wise", "global", bool, False, doc="vectors along dim 0"),
        ),
        kernel=_nuslerp,
        min_donors=2,
        max_donors=2,
    )
)
