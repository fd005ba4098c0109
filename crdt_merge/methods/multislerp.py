"""Multi-SLERP: barycentric interpolation of several models (or task vectors) on a sphere.

Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (as
implemented by mergekit).

With ``v_i`` the donors (minus the base, if one is given), weights ``w_i`` (divided by
their sum when ``normalize_weights``) and ``eps`` (default 1e-8), all sums by the fixed
tree or in canonical order:

1. ``n_i = |v_i|``, ``u_i = v_i / (n_i + eps)``, ``m = sum_i u_i * w_i``;
2. ``|m| < eps``: with two donors ``v_0*w_0 + v_1*w_1`` (plus the base), else an error;
3. ``m = m / |m|``; ``g = sum_i (u_i - m * <u_i, m>) * w_i``; ``r = |g| + eps``;
4. ``out = (m*cos(r) + g*(sin(r)/r)) * sum_i n_i*w_i``, plus the base.

One donor is returned as it is (mergekit's rule, base or not).
"""

from __future__ import annotations

import math

from crdt_merge.errors import BadParameter
from crdt_merge.lazy import torch
from crdt_merge.methods import trig
from crdt_merge.methods.base import Bound, Method, ParamSpec, TensorJob, register
from crdt_merge.methods.reduce import blocks, map_blocks, squares, tree_sum


def _multislerp(job: TensorJob, bound: Bound) -> torch.Tensor:
    shape = job.donors[0].shape
    if len(job.donors) == 1:
        return job.donors[0].clone()
    xs = [x.reshape(-1) for x in job.donors]
    z = None if job.base is None else job.base.reshape(-1)
    n = xs[0].numel()
    eps = float(bound.options["eps"])
    ws = [float(w) for w in bound.column("weight")]
    if bound.options["normalize_weights"]:
        total = 0.0
        for w in ws:
            total = total + w
        if total == 0:
            raise BadParameter(
                f"multislerp on {job.name}: the weights sum to zero and cannot be normalized"
            )
        ws = [w / total for w in ws]

    def v(i: int, s: int, e: int) -> torch.Tensor:
        return xs[i][s:e] if z is None else xs[i][s:e] - z[s:e]

    norms = [math.sqrt(tree_sum(squares(lambda s, e, i=i: v(i, s, e)), n)) for i in range(len(xs))]

    def unit(i: int, s: int, e: int) -> torch.Tensor:
        return v(i, s, e) / (norms[i] + eps)

    def weighted_units(s: int, e: int) -> torch.Tensor:
        acc = torch.zeros(e - s, dtype=torch.float64)
        for i, w in enumerate(ws):
            acc = acc + unit(i, s, e) * w
        return acc

    mean = map_blocks(n, weighted_units)
    mean_norm = math.sqrt(tree_sum(squares(lambda s, e: mean[s:e]), n))
    if mean_norm < eps:
        if len(xs) == 2:
            out = map_blocks(n, lambda s, e: v(0, s, e) * ws[0] + v(1, s, e) * ws[1])
            return (out if z is None else out + z).reshape(shape)
        raise BadParameter(
            f"multislerp on {job.name}: the weighted sum of the inputs' directions is zero "
            "(antipodal inputs whose weights balance out); use different weights"
        )
    for s, e in blocks(n):
        mean[s:e] = mean[s:e] / mean_norm
    dots = [tree_sum(lambda s, e, i=i: unit(i, s, e) * mean[s:e], n) for i in range(len(xs))]

    def tangent(s: int, e: int) -> torch.Tensor:
        acc = torch.zeros(e - s, dtype=torch.float64)
        for i, w in enumerate(ws):
            acc = acc + (unit(i, s, e) - mean[s:e] * dots[i]) * w
        return acc

    r = math.sqrt(tree_sum(squares(tangent), n)) + eps
    cos_r, sin_r_over_r = trig.cos(r), trig.sin(r) / r
    avg_norm = 0.0
    for norm, w in zip(norms, ws, strict=True):
        avg_norm = avg_norm + norm * w
    for s, e in blocks(n):
        res = (mean[s:e] * cos_r + tangent(s, e) * sin_r_over_r) * avg_norm
        mean[s:e] = res if z is None else res + z[s:e]
    return mean.reshape(shape)


MULTISLERP = register(
    Method(
        name="multislerp",
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        base="optional",
        params=(
            ParamSpec("weight", "per_model", float, doc="the model's weight"),
            ParamSpec("normalize_weights", "global", bool, True, doc="divide weights by their sum"),
            ParamSpec("eps", "global", float, 1e-8, low=0.0, low_open=True, doc="stabilizer"),
        ),
        kernel=_multislerp,
        min_donors=1,
    )
)
