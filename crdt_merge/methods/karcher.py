"""Karcher mean: the Riemannian centre of mass of the inputs' directions, times their mean norm.

Karcher, "Riemannian center of mass and mollifier smoothing" (1977); mergekit cites
https://arxiv.org/abs/2603.04972. Every input has weight ``1/N`` (mergekit has no weights
for this method), and a base model, if named, is one more input.

With ``x_i`` flattened, float64, norms by the fixed tree:
``u_i = x_i / |x_i|`` (0 if the norm is 0); only inputs with ``|x_i| > tol`` steer; their
weights ``a_i = (1/N) / sum(1/N)``. Start ``m = sum a_i u_i`` normalized (``u`` of the first
valid input if ``|m| < tol``). Then up to ``max_iter`` times: for each valid ``i``,
``c_i = clamp(<m, u_i>, -1, 1)``, ``theta_i = acos(c_i)``, skipped if ``theta_i < tol``;
``g = sum_i (u_i - m*c_i) * (a_i * (theta_i / sin(theta_i)))``; stop if ``|g| < tol``;
``m = m*cos(|g|) + (g / |g|)*sin(|g|)``, renormalized if ``|m| > tol``.
``out = m * sum_i (1/N)|x_i|``.
"""

from __future__ import annotations

from crdt_merge.lazy import torch
from crdt_merge.methods import trig
from crdt_merge.methods.base import Bound, Method, ParamSpec, TensorJob, register
from crdt_merge.methods.reduce import blocks, map_blocks, norm, tree_sum


def _karcher(job: TensorJob, bound: Bound) -> torch.Tensor:
    shape = job.donors[0].shape
    if len(job.donors) == 1:
        return job.donors[0].clone()
    max_iter = int(bound.options["max_iter"])
    tol = float(bound.options["tol"])
    xs = [x.reshape(-1) for x in job.donors]
    n = xs[0].numel()
    count = len(xs)
    alphas = [1.0 / count] * count
    norms = [norm(lambda s, e, x=x: x[s:e], n) for x in xs]

    def unit(i: int, s: int, e: int) -> torch.Tensor:
        if norms[i] == 0.0:
            return torch.zeros(e - s, dtype=torch.float64)
        return xs[i][s:e] / norms[i]

    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return torch.zeros(shape, dtype=torch.float64)
    alpha_sum = 0.0
    for i in valid:
        alpha_sum = alpha_sum + alphas[i]
    a = {i: alphas[i] / alpha_sum for i in valid}

    def start(s: int, e: int) -> torch.Tensor:
        acc = torch.zeros(e - s, dtype=torch.float64)
        for i in valid:
            acc = acc + unit(i, s, e) * a[i]
        return acc

    mean = map_blocks(n, start)
    m_norm = norm(lambda s, e: mean[s:e], n)
    for s, e in blocks(n):
        mean[s:e] = unit(valid[0], s, e) if m_norm < tol else mean[s:e] / m_norm

    for _ in range(max_iter):
        terms = []
        for i in valid:
            c = min(1.0, max(-1.0, tree_sum(lambda s, e, i=i: mean[s:e] * unit(i, s, e), n)))
            theta = trig.acos(c)
            if theta < tol:
                continue
            terms.append((i, c, a[i] * (theta / trig.sin(theta))))

        def tangent(s: int, e: int, terms=terms) -> torch.Tensor:
            acc = torch.zeros(e - s, dtype=torch.float64)
            for i, c, coef in terms:
                acc = acc + (unit(i, s, e) - mean[s:e] * c) * coef
            return acc

        g = map_blocks(n, tangent)
        g_norm = norm(lambda s, e, g=g: g[s:e], n)
        if g_norm < tol:
            break
        cos_g, sin_g = trig.cos(g_norm), trig.sin(g_norm)
        for s, e in blocks(n):
            mean[s:e] = mean[s:e] * cos_g + (g[s:e] / g_norm) * sin_g
        m_norm = norm(lambda s, e: mean[s:e], n)
        if m_norm > tol:
            for s, e in blocks(n):
                mean[s:e] = mean[s:e] / m_norm

    scale = 0.0
    for alpha, x_norm in zip(alphas, norms, strict=True):
        scale = scale + alpha * x_norm
    for s, e in blocks(n):
        mean[s:e] = mean[s:e] * scale
    return mean.reshape(shape)


KARCHER = register(
    Method(
        name="karcher",
        paper="https://arxiv.org/abs/2603.04972",
        base="ignored",
        params=(
            ParamSpec("max_iter", "global", int, 10, low=0, doc="iterations at most"),
            ParamSpec("tol", "global", float, 1e-5, low=0.0, low_open=True, doc="tolerance"),
        ),
        kernel=_karcher,
        min_donors=1,
    )
)
