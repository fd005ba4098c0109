"""SLERP: spherical linear interpolation between the base and one other model.

Shoemake, "Animating rotation with quaternion curves" (SIGGRAPH 1985); mergekit's
reference is https://en.wikipedia.org/wiki/Slerp.

With ``a`` the base tensor and ``b`` the other, both flattened, float64:
``|a|, |b|`` by the fixed tree (a norm ``<= 1e-8`` counts as 1);
``c = clamp(sum(a*b) / (|a| |b|), -1, 1)``. If ``|c| > 0.9995`` the vectors are nearly
colinear and ``out = a*(1 - t) + b*t``; otherwise ``theta = acos(c)`` and
``out = a*(sin((1 - t)*theta) / sin(theta)) + b*(sin(t*theta) / sin(theta))``.
``t = 0`` gives the base, ``t = 1`` the other model, bit for bit. The angles come from
:mod:`.trig` (same bits on every CPU).
"""

from __future__ import annotations

import math

from crdt_merge.lazy import torch
from crdt_merge.methods import trig
from crdt_merge.methods.base import Bound, Method, ParamSpec, TensorJob, register
from crdt_merge.methods.reduce import map_blocks, tree_dot

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_coefficients(t: float, cos_theta: float) -> tuple[float, float]:
    """The weights of the two endpoints for interpolation ``t`` at angle ``acos(cos_theta)``."""
    c = min(1.0, max(-1.0, cos_theta))
    if abs(c) > DOT_THRESHOLD:
        return 1 - t, t
    theta = trig.acos(c)
    s = trig.sin(theta)
    return trig.sin((1 - t) * theta) / s, trig.sin(t * theta) / s


def _slerp(job: TensorJob, bound: Bound) -> torch.Tensor:
    if job.base is None:
        raise ValueError("slerp needs a base")
    t = float(bound.options["t"])
    shape = job.base.shape
    a, b = job.base.reshape(-1), job.donors[0].reshape(-1)
    if a.numel() == 0:
        return job.base.clone()
    na, nb = math.sqrt(tree_dot(a, a)), math.sqrt(tree_dot(b, b))
    na = na if na > NORM_EPS else 1.0
    nb = nb if nb > NORM_EPS else 1.0
    ca, cb = slerp_coefficients(t, tree_dot(a, b) / (na * nb))
    return map_blocks(a.numel(), lambda s, e: a[s:e] * ca + b[s:e] * cb).reshape(shape)


SLERP = register(
    Method(
        name="slerp",
        paper="https://en.wikipedia.org/wiki/Slerp",
        base="required",
        params=(ParamSpec("t", "global", float, low=0.0, high=1.0, doc="0 = base, 1 = the other"),),
        kernel=_slerp,
        min_donors=1,
        max_donors=1,
    )
)
