"""Task arithmetic, and the shared core of TIES, DARE, breadcrumbs and DELLA.

Ilharco et al., "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089.

mergekit's "generalized task arithmetic", per tensor, with donors ``x_i``, base ``b``,
weights ``w_i`` and everything in float64:

1. ``d_i = x_i - b``; a sparsifier (see :mod:`.sparsify`) may keep only some entries:
   ``s_i = d_i`` where kept and ``0`` elsewhere, times ``c_i``, the L1 rescale factor when
   ``rescale`` is on (1 otherwise);
2. ``v_i = s_i * w_i``;
3. without consensus: ``m = sum_i v_i`` and ``D = sum_i w_i`` (a scalar; 1 if ``|D| < 1e-8``);
   with sign consensus (TIES): per entry, ``S`` = the sum of the ``v_i`` in ASCENDING ORDER
   OF VALUE (a symmetric function of the donors, so donor order cannot flip it), elected
   sign ``g = +1`` iff ``S >= 0``, else ``-1``; donor ``i`` agrees iff ``t_i = g*v_i > 0``;
   ``m = g * sum_i max(t_i, 0)`` (the sum of the agreeing ``v_i``),
   ``D = sum_i [t_i > 0] * w_i``, ``D = 1`` where ``D == 0``;
4. ``m = m / D`` if ``normalize``; ``m = m * lambda`` if ``lambda != 1``; out = ``b + m``.

Every sum over donors is ``((0 + t_0) + t_1) + ...`` in canonical order; the work is
blockwise, so temporaries stay a few blocks per donor whatever the tensor's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from crdt_merge.lazy import torch
from crdt_merge.methods.base import (
    Bound,
    Check,
    Method,
    ParamSpec,
    Raw,
    TensorJob,
    register,
    via_raw,
)
from crdt_merge.methods.reduce import BLOCK, blocks, f64, map_blocks, put
from crdt_merge.methods.select import Magnitudes
from crdt_merge.methods.sparsify import Keep, l1_rescale
from crdt_merge.numeric import round_raw, widen_raw

Sparsifier = Callable[[int, Magnitudes, Callable[[], "torch.Tensor"], TensorJob, Bound], "Keep | None"]
"""``sparsifier(i, mags, delta_of, job, bound) -> keep mask or None`` for donor ``i``."""

DIVISOR_EPS = 1e-8


def gta_params(normalize: bool, rescale: bool) -> tuple[ParamSpec, ...]:
    """The parameters every task-arithmetic method shares, with the method's defaults."""
    return (
        ParamSpec("weight", "per_model", float, doc="the donor's weight"),
        ParamSpec("normalize", "global", bool, normalize, doc="divide by the sum of weights"),
        ParamSpec("rescale", "global", bool, rescale, doc="L1-rescale sparsified deltas"),
        ParamSpec("lambda", "global", float, 1.0, doc="scale of the merged delta"),
        ParamSpec("int8_mask", "global", bool, False, doc="accepted; no effect here"),
        ParamSpec("density", "per_model", float, 1.0, low=0.0, high=1.0, doc="fraction kept"),
    )


def elected_sign(values: list[torch.Tensor]) -> torch.Tensor:
    """The sign (``+1.0``/``-1.0`` per entry) the donors' weighted deltas elect.

    ``+1`` where their sum in ascending order of value, from ``+0``, is ``>= 0``. With three
    or more donors the values are first sorted per entry by an odd-even transposition
    network of ``minimum``/``maximum`` (exact); two values commute anyway. Only the sign
    of a zero sum could depend on how equal values are swapped, and ``-0 >= 0`` holds,
    so the elected sign is a function of the multiset of values, not of donor order.
    """
    v = list(values)
    k = len(v)
    if k > 2:
        for rnd in range(k):
            for i in range(rnd % 2, k - 1, 2):
                v[i], v[i + 1] = torch.minimum(v[i], v[i + 1]), torch.maximum(v[i], v[i + 1])
    total = torch.zeros_like(v[0])
    for x in v:
        total.add_(x)
    # sign(sign(S) + 0.5): +1 for S >= 0 (-0 included), -1 below; exact
    return torch.sign(torch.sign(total).add_(0.5))


def merge_task_vectors(
    job: TensorJob, bound: Bound, sparsifier: Sparsifier | None, consensus: bool
) -> torch.Tensor:
    """The generalized task-arithmetic merge of one tensor (see the module docstring)."""
    if job.base is None:
        raise ValueError("task arithmetic needs a base")
    shape = job.base.shape
    base = job.base.reshape(-1)
    donors = [x.reshape(-1) for x in job.donors]
    n = base.numel()
    if not donors:
        return map_blocks(n, lambda s, e: f64(base, s, e), dtype=job.out_dtype,
                          out=job.output(n)).reshape(shape)
    weights = [float(w) for w in bound.column("weight")]
    opts = bound.options

    keeps: list[Keep | None] = []
    scales: list[float] = []
    for i, x in enumerate(donors):
        keep = None
        if sparsifier is not None:

            def mags(s: int, e: int, step: int = 1, x: torch.Tensor = x) -> torch.Tensor:
                return torch.sub(f64(x, s, e, step), f64(base, s, e, step)).abs_()

            def delta_of(x: torch.Tensor = x) -> torch.Tensor:
                return torch.sub(f64(x, 0, n), f64(base, 0, n)).reshape(shape)

            keep = sparsifier(i, mags, delta_of, job, bound)
            scale = l1_rescale(mags, keep, n) if keep is not None and opts["rescale"] else 1.0
        else:
            scale = 1.0
        keeps.append(keep)
        scales.append(scale)

    normalize = bool(opts["normalize"])
    lam = float(opts["lambda"])
    total_w = 0.0
    for w in weights:
        total_w = total_w + w
    if abs(total_w) < DIVISOR_EPS:
        total_w = 1.0

    out = job.output(n)
    for s, e in blocks(n):
        b = f64(base, s, e)
        vs = []
        for x, keep, scale, w in zip(donors, keeps, scales, weights, strict=True):
            v = torch.sub(f64(x, s, e), b)
            if keep is not None:
                v = keep.apply(v, s)  # dropped entries become zero
                if scale != 1.0:
                    v.mul_(scale)
            vs.append(v.mul_(w))
        mixed = torch.zeros_like(b)
        if consensus:
            # agree_i <=> t_i = sign * v_i > 0, and sum_i [agree_i] v_i = sign * sum_i max(t_i, 0)
            sign = elected_sign(vs)
            divisor = torch.zeros_like(b)
            for v, w in zip(vs, weights, strict=True):
                kept = v.mul_(sign).clamp_(min=0.0)  # max(t_i, 0)
                mixed.add_(kept)
                divisor.add_(torch.sign(kept).mul_(w))  # [t_i > 0] * w_i
            mixed.mul_(sign)
            if normalize:
                divisor.add_((divisor == 0).to(torch.float64))  # 0 -> 1
                mixed.div_(divisor)
        else:
            for v in vs:
                mixed.add_(v)
            if normalize:
                mixed.div_(total_w)
        if lam != 1.0:
            mixed.mul_(lam)
        put(out, s, mixed.add_(b))  # b + m
    return out.reshape(shape)


def _task_arithmetic(bound: Bound, base: Raw | None, donors: Sequence[Raw], out: Raw) -> None:
    """Task arithmetic without sparsification or consensus, elementwise on stored bits:
    ``b + lambda * (sum_i (x_i - b) * w_i) [/ D]``, every step as in
    :func:`merge_task_vectors`."""
    if base is None:
        raise ValueError("task arithmetic needs a base")
    n = out.values.size
    wide, acc, term = (np.empty(min(n, BLOCK)) for _ in range(3))
    weights = [float(w) for w in bound.column("weight")]
    normalize = bool(bound.options["normalize"])
    lam = float(bound.options["lambda"])
    total_w = 0.0
    for w in weights:
        total_w = total_w + w
    if abs(total_w) < DIVISOR_EPS:
        total_w = 1.0
    for s, e in blocks(n):
        b = widen_raw(base.values[s:e], base.dtype, wide[: e - s])
        if not donors:  # the base itself
            round_raw(b, out.dtype, out.values[s:e])
            continue
        mixed, t = acc[: e - s], term[: e - s]
        mixed.fill(0.0)
        for x, w in zip(donors, weights, strict=True):
            np.subtract(widen_raw(x.values[s:e], x.dtype, t), b, out=t)
            np.multiply(t, w, out=t)
            np.add(mixed, t, out=mixed)
        if normalize:
            np.divide(mixed, total_w, out=mixed)
        if lam != 1.0:
            np.multiply(mixed, lam, out=mixed)
        np.add(mixed, b, out=mixed)  # b + m
        round_raw(mixed, out.dtype, out.values[s:e])


TASK_ARITHMETIC = register(
    Method(
        name="task_arithmetic",
        paper="https://arxiv.org/abs/2212.04089",
        base="required",
        params=gta_params(normalize=False, rescale=False),
        kernel=via_raw(_task_arithmetic),
        raw_kernel=_task_arithmetic,
        min_donors=0,
        streaming=True,
    )
)


def register_gta(name: str, paper: str, sparsifier: Sparsifier, *, consensus: bool,
                 normalize: bool, rescale: bool, extra: Sequence[ParamSpec] = (),
                 random: bool = False, check: Check | None = None) -> Method:
    """Register one variant of generalized task arithmetic (TIES, DARE, breadcrumbs, DELLA
    and their linear forms): :func:`merge_task_vectors` with ``sparsifier``, with the TIES
    sign ``consensus`` or without, the :func:`gta_params` of its ``normalize``/``rescale``
    defaults plus ``extra`` parameters. A ``random`` sparsifier draws from ``job.keys``."""

    def kernel(job: TensorJob, bound: Bound) -> torch.Tensor:
        return merge_task_vectors(job, bound, sparsifier, consensus=consensus)

    kernel.__name__ = kernel.__qualname__ = f"_{name}"
    return register(
        Method(
            name=name,
            paper=paper,
            base="required",
            params=gta_params(normalize=normalize, rescale=rescale) + tuple(extra),
            kernel=kernel,
            streaming=True,
            min_donors=0,
            random=random,
            check=check,
        )
    )
