"""Whole-model task-vector statistics: the outlier report, Krum scores, clip norms.

For sites that do not fully trust each other (issue 16). Over the plan's kept
contributions (canonical order) and every float tensor of the base, with ``d_i`` the task
vector of contribution ``i`` (donor minus base; a delta contribution's stored tensor):

* per tensor ``t``: ``G_t[i][j] = fixed_sum(d_i * d_j)`` (the fixed tree of
  specs/methods.md section 3);
* whole model: ``G[i][j] = ((0 + G_t1[i][j]) + G_t2[i][j]) + ...`` over the tensors in
  ascending name order, and the squared distances
  ``D[i][j] = max((G[i][i] + G[j][j]) - 2 * G[i][j], 0)``.

From these (specs/methods.md, "Outlier report"):

* ``norm_i = sqrt(G[i][i])``; flag ``norm`` (three or more contributions) when
  ``norm_i > 3 * median_{j != i} norm_j``;
* ``cos_i``, the cosine of ``d_i`` and the mean of the task vectors of the *peers* ``P``
  (the contributions not flagged ``norm``), other than ``i`` itself:
  ``(sum_{j in P, j != i} G[i][j]) / (norm_i * sqrt(sum_{j, k in P, != i} G[j][k]))`` (0 when
  a norm is 0), so one huge task vector does not become everyone's "mean of the others";
  the same per tensor gives the worst tensor (lowest cosine; ties: the first name);
  flag ``direction`` (three or more peers) when ``cos_i < median_{j in P, j != i} cos_j
  - 0.5``.

Every number is a float64 from correctly rounded operations in a fixed order, so every
replica computes the same bits; the plan holds them as 6-significant-digit strings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from crdt_merge.errors import PlanError
from crdt_merge.lazy import torch
from crdt_merge.methods.clipped import median_value
from crdt_merge.methods.reduce import BLOCK, tree_sum_rows
from crdt_merge.store.manifests import Manifest
from crdt_merge.store.tensors import load_tensor

NORM_FACTOR = 3.0
COSINE_MARGIN = 0.5
FLOATS = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class Stats:
    """``gram``/``dist2``: whole-model ``G`` and ``D``; ``tensors``: per tensor name, its
    ``G_t`` (for the worst-tensor cosine)."""

    gram: list[list[float]]
    dist2: list[list[float]]
    tensors: dict[str, list[list[float]]]


def _zeros(n: int) -> list[list[float]]:
    return [[0.0] * n for _ in range(n)]


def pair_sums(ds: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]],
              block: int | None = None) -> list[float]:
    """``fixed_sum(ds[i] * ds[j])`` for every pair (float64 vectors of one length)."""
    n = ds[0].numel() if ds else 0
    return pair_sums_of(lambda s, e: [d[s:e] for d in ds], n, pairs, block)


def pair_sums_of(vectors: Any, n: int, pairs: Sequence[tuple[int, int]],
                 block: int | None = None) -> list[float]:
    """``fixed_sum(v_i * v_j)`` for every pair of the virtual float64 vectors whose
    elements ``[s, e)`` ``vectors(s, e)`` gives (a list), bit for bit as
    :func:`crdt_merge.methods.reduce.tree_sum` computes each, in one walk over the blocks:
    each block is made once for all pairs, and nothing of full size is held."""
    block = block or BLOCK
    if not pairs:
        return []
    if n == 0:
        return [0.0] * len(pairs)

    def products(s: int, e: int) -> torch.Tensor:
        v = vectors(s, e)
        return torch.stack([v[i] * v[j] for i, j in pairs])

    size = 1 << (n - 1).bit_length()
    if size <= block:
        return tree_sum_rows(products(0, n)).tolist()
    count = size // block
    zeros = torch.zeros(len(pairs), block, dtype=torch.float64)

    def leaf(k: int) -> torch.Tensor:
        s = k * block
        if s >= n:
            return zeros
        e = min(n, s + block)
        v = products(s, e)
        if e - s < block:
            v = torch.cat([v, zeros[:, : block - (e - s)]], dim=1)
        return v

    def node(offset: int, stride: int) -> torch.Tensor:
        if stride == count:
            return leaf(offset)
        return node(offset, 2 * stride) + node(offset + stride, 2 * stride)

    return tree_sum_rows(node(0, 1)).tolist()


def task_vector_stats(store: Any, base: Manifest, donors: Sequence[tuple[Manifest, str]]) -> Stats:
    """The statistics of the donors ``(manifest, form)`` against ``base`` (see the module
    docstring). A tensor the base has and a donor lacks (or shapes otherwise) is skipped
    for every donor (the plan has excluded such donors already)."""
    n = len(donors)
    for _, form in donors:
        if form not in ("full", "delta"):  # an adapter's delta is materialised by resolve
            raise PlanError(f"the task-vector statistics read full and delta contributions; "
                            f"a {form!r} contribution is not supported by them yet")
    gram, dist2 = _zeros(n), _zeros(n)
    per_tensor: dict[str, list[list[float]]] = {}
    for name in sorted(base.tensors):
        rec = base.tensors[name]
        if rec.dtype not in FLOATS:
            continue
        others = [m.tensors.get(name) for m, _ in donors]
        if any(o is None or tuple(o.shape) != tuple(rec.shape) for o in others):
            continue
        b = load_tensor(store, rec).reshape(-1)  # stored dtypes, widened a block at a time
        xs = [load_tensor(store, o).reshape(-1) for o in others]
        deltas = [form == "delta" for _, form in donors]

        def vectors(s: int, e: int, b: torch.Tensor = b, xs: list = xs,
                    deltas: list = deltas) -> list[torch.Tensor]:
            bb = b[s:e].to(torch.float64)
            return [x[s:e].to(torch.float64) if delta else torch.sub(x[s:e].to(torch.float64), bb)
                    for x, delta in zip(xs, deltas, strict=True)]

        g = _zeros(n)
        pairs = [(i, j) for i in range(n) for j in range(i, n)]
        for (i, j), v in zip(pairs, pair_sums_of(vectors, b.numel(), pairs), strict=True):
            g[i][j] = g[j][i] = v
        for i in range(n):
            for j in range(n):
                gram[i][j] = gram[i][j] + g[i][j]
        per_tensor[name] = g
    for i in range(n):
        for j in range(n):
            if i != j:
                dist2[i][j] = max((gram[i][i] + gram[j][j]) - 2.0 * gram[i][j], 0.0)
    return Stats(gram, dist2, per_tensor)


def _cosines(g: list[list[float]], peers: Sequence[int]) -> list[float]:
    n = len(g)
    out = []
    for i in range(n):
        others = [j for j in peers if j != i]
        dot = 0.0
        for j in others:
            dot = dot + g[i][j]
        mm = 0.0
        for j in others:
            for k in others:
                mm = mm + g[j][k]
        ni = math.sqrt(max(g[i][i], 0.0))
        nm = math.sqrt(max(mm, 0.0))
        out.append(0.0 if ni == 0 or nm == 0 else dot / (ni * nm))
    return out


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def report(stats: Stats, op_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The outlier report, one entry per contribution (see the module docstring)."""
    n = len(op_ids)
    norms = [math.sqrt(max(stats.gram[i][i], 0.0)) for i in range(n)]
    long = [n >= 3 and norms[i] > NORM_FACTOR * median_value(
        [norms[j] for j in range(n) if j != i]) for i in range(n)]
    peers = [i for i in range(n) if not long[i]]
    cos = _cosines(stats.gram, peers) if n > 1 else [1.0] * n
    worst: list[tuple[float, str]] = [(math.inf, "")] * n
    if n > 1:
        for name in sorted(stats.tensors):
            for i, c in enumerate(_cosines(stats.tensors[name], peers)):
                if c < worst[i][0]:
                    worst[i] = (c, name)
    out = []
    for i, op_id in enumerate(op_ids):
        flags = ["norm"] if long[i] else []
        others = [j for j in peers if j != i]
        if len(peers) >= 3 and i in peers and cos[i] < median_value(
                [cos[j] for j in others]) - COSINE_MARGIN:
            flags.append("direction")
        entry = {"op_id": op_id, "norm": _fmt(norms[i]), "cosine": _fmt(cos[i]),
                 "flags": flags}
        if worst[i][1]:
            entry["worst_tensor"] = worst[i][1]
            entry["worst_cosine"] = _fmt(worst[i][0])
        out.append(entry)
    return out


def krum_scores(dist2: list[list[float]], f: int) -> list[float]:
    """Each donor's Krum score: the sum of its ``n - f - 2`` smallest squared distances
    to the others, added in ascending order from 0."""
    n = len(dist2)
    near = n - f - 2
    scores = []
    for i in range(n):
        ds = sorted(dist2[i][j] for j in range(n) if j != i)[:near]
        acc = 0.0
        for v in ds:
            acc = acc + v
        scores.append(acc)
    return scores


def krum_select(scores: Sequence[float], m: int) -> list[int]:
    """The ``m`` lowest scores' indices (ties: the lower index, i.e. the lower op id),
    in canonical order."""
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(ranked[:m])


_CACHE: dict[tuple[str, tuple[tuple[str, str], ...]], Stats] = {}


def cached_stats(store: Any, base: Manifest, donors: Sequence[tuple[Manifest, str]]) -> Stats:
    """:func:`task_vector_stats`, remembered per (base, donors) for this process (a plan
    and the whole-model method's section read the same tensors once). The key is
    content-addressed (manifest ids), so a cached value is never stale."""
    key = (str(base.id), tuple((str(m.id), form) for m, form in donors))
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = task_vector_stats(store, base, donors)
    return _CACHE[key]
