"""Whole-model task-vector statistics: the outlier report, Krum scores, clip norms.

For sites that do not fully trust each other (issue 16). Over the plan's kept
contributions (canonical order) and every float tensor of the base, with ``d_i`` the task
vector of contribution ``i`` (donor minus base; a delta contribution's stored tensor; an
adapter's materialised delta, specs/methods.md section 10: ``scale * B @ A`` for a tensor
it adapts, its own tensor minus the base's for one it replaces, zero elsewhere):

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

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crdt_merge.errors import PlanError
from crdt_merge.hashing import digest
from crdt_merge.lazy import torch
from crdt_merge.methods.clipped import median_value
from crdt_merge.methods.lora import lora_delta, lora_scale
from crdt_merge.numeric import RAW_DTYPES, widen_raw
from crdt_merge.store.adapter import AdapterTable, adapter_table
from crdt_merge.store.manifests import Manifest, TensorRecord
from crdt_merge.store.tensors import record_bytes

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


#: elements per leaf block of the pair sums' tree: a product block of every pair stays in
#: the CPU's cache (the tree, hence every bit, is the same for any power of two)
PAIR_BLOCK = 1 << 14

Fill = Callable[[int, int, np.ndarray], None]
"""``fill(s, e, out)``: writes the float64 elements ``[s, e)`` of each of the ``k``
vectors into ``out[:, :e - s]`` (``out`` of shape ``(k, block)``)."""


def pair_sums(ds: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]],
              block: int | None = None) -> list[float]:
    """``fixed_sum(ds[i] * ds[j])`` for every pair (float64 vectors of one length)."""
    arrays = [d.reshape(-1).numpy() for d in ds]
    n = arrays[0].size if arrays else 0

    def fill(s: int, e: int, out: np.ndarray) -> None:
        for row, a in zip(out, arrays, strict=False):
            row[: e - s] = a[s:e]

    return pair_sums_of(fill, len(arrays), n, pairs, block)


def pair_sums_of(fill: Fill, k: int, n: int, pairs: Sequence[tuple[int, int]],
                 block: int | None = None) -> list[float]:
    """``fixed_sum(v_i * v_j)`` for every pair of the ``k`` virtual float64 vectors of
    length ``n`` that ``fill`` gives, bit for bit as
    :func:`crdt_merge.methods.reduce.tree_sum` computes each (specs/methods.md section 3),
    in one walk over the blocks: each block of the vectors is made once for all pairs.

    The tree over the ``M`` blocks (block ``j`` joins block ``j + M/2`` first) is walked as
    a binary counter: the ``t``-th leaf is block ``bitreverse(t)``, and two partial sums of
    one level are added (in place, numpy: one correctly rounded add per element) as soon
    as both exist, so at most ``log2(M) + 1`` partial sums are held. Blocks past the end
    are zeros (a subtree of them is a zero, added as ``+0.0``); the last levels are the
    same tree within the one remaining block."""
    block = block or PAIR_BLOCK
    if block & (block - 1) or block < 1:
        raise ValueError(f"block must be a power of two, got {block}")
    if not pairs:
        return []
    if n == 0:
        return [0.0] * len(pairs)
    size = 1 << (n - 1).bit_length()
    width = min(size, block)
    v = np.zeros((k, width), dtype=np.float64)
    free: list[np.ndarray] = []

    def products(s: int, e: int) -> np.ndarray:
        fill(s, e, v)
        if e - s < width:
            v[:, e - s:] = 0.0
        out = free.pop() if free else np.empty((len(pairs), width), dtype=np.float64)
        for row, (i, j) in zip(out, pairs, strict=True):
            np.multiply(v[i], v[j], out=row)
        return out

    if size <= block:
        return _rows_tree(products(0, n))
    count = size // block
    bits = count.bit_length() - 1
    used = -(-n // block)  # blocks holding elements; the others are zeros
    stack: list[tuple[int, np.ndarray | None]] = []
    for t in range(count):
        j = int(f"{t:0{bits}b}"[::-1], 2)
        item = products(j * block, min(n, (j + 1) * block)) if j < used else None
        level = 0
        while stack and stack[-1][0] == level:
            _, left = stack.pop()
            item = _add(left, item, free)
            level += 1
        stack.append((level, item))
    ((_, root),) = stack
    return [0.0] * len(pairs) if root is None else _rows_tree(root)


def _add(a: np.ndarray | None, b: np.ndarray | None, free: list[np.ndarray]) -> np.ndarray | None:
    """``a + b`` of two partial sums (None: a subtree of zeros), into ``a``'s buffer."""
    if a is None and b is None:
        return None
    if a is None or b is None:
        x = a if b is None else b
        np.add(x, 0.0, out=x)  # + (+0.0): a -0 becomes +0, as in the padded tree
        return x
    np.add(a, b, out=a)
    free.append(b)
    return a


def _rows_tree(x: np.ndarray) -> list[float]:
    """The fixed tree of each row of ``x`` (its width a power of two), in place."""
    w = x.shape[1]
    while w > 1:
        h = w // 2
        np.add(x[:, :h], x[:, h:w], out=x[:, :h])
        w = h
    return x[:, 0].tolist()


def task_vector_stats(store: Any, base: Manifest, donors: Sequence[tuple[Manifest, str]]) -> Stats:
    """The statistics of the donors ``(manifest, form)`` against ``base`` (see the module
    docstring), computed afresh. A tensor the base has and a donor lacks (or shapes
    otherwise) is skipped for every donor (the plan has excluded such donors already)."""
    return _assemble(base, donors, _pair_values(store, base, _unique(donors)))


def cached_stats(store: Any, base: Manifest, donors: Sequence[tuple[Manifest, str]]) -> Stats:
    """:func:`task_vector_stats`, with every pair's per-tensor sums kept in the replica's
    index (its local metadata, never replicated) under a key of the base's and the two
    donors' manifest ids and forms: ``plan``, ``status`` and ``resolve`` compute them once,
    and a new contribution costs only its own pairs. The values are a function of those
    contents alone (fixed-order float64), so a cached value is never stale; a process also
    remembers whole results."""
    key = (str(base.id), tuple((str(m.id), form) for m, form in donors))
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        unique = _unique(donors)
        keys = {(a, b): _pair_key(base, unique[a], unique[b])
                for a in range(len(unique)) for b in range(a, len(unique))}
        known: dict[tuple[int, int], np.ndarray] = {}
        for pair, k in keys.items():
            raw = store.index.get_meta(k)
            if raw is not None and len(raw) == 8 * len(_names(base)):
                known[pair] = np.frombuffer(raw, dtype="<f8")
        missing = [p for p in keys if p not in known]
        if missing:
            fresh = _pair_values(store, base, unique, missing)
            store.index.set_metas({keys[p]: fresh[p].astype("<f8").tobytes() for p in missing})
            known.update(fresh)
        _CACHE[key] = _assemble(base, donors, known)
    return _CACHE[key]


_CACHE: dict[tuple[str, tuple[tuple[str, str], ...]], Stats] = {}
_META = "taskstats/v1:"


def _names(base: Manifest) -> list[str]:
    """The base's float tensors in ascending name order (the order of the sums)."""
    return [n for n in sorted(base.tensors) if base.tensors[n].dtype in FLOATS]


def _unique(donors: Sequence[tuple[Manifest, str]]) -> list[tuple[Manifest, str]]:
    """The distinct donors ``(manifest, form)``, by manifest id and form."""
    seen: dict[tuple[str, str], tuple[Manifest, str]] = {}
    for m, form in donors:
        if form not in ("full", "delta", "adapter"):
            raise PlanError(f"the task-vector statistics read full, delta and adapter "
                            f"contributions, not a {form!r} one")
        seen.setdefault((str(m.id), form), (m, form))
    return [seen[k] for k in sorted(seen)]


def _pair_key(base: Manifest, a: tuple[Manifest, str], b: tuple[Manifest, str]) -> str:
    ends = sorted([[str(a[0].id), a[1]], [str(b[0].id), b[1]]])
    return _META + digest(json.dumps([str(base.id), *ends]).encode())


def _has(base: Manifest, donor: tuple[Manifest, str], name: str) -> bool:
    """Whether the donor has a task vector for the base's tensor ``name`` (an adapter has
    one for every tensor: zero where it changes nothing)."""
    m, form = donor
    if form == "adapter":
        return True
    other = m.tensors.get(name)
    return other is not None and tuple(other.shape) == tuple(base.tensors[name].shape)


def _assemble(base: Manifest, donors: Sequence[tuple[Manifest, str]],
              values: Mapping[tuple[int, int], np.ndarray]) -> Stats:
    """The statistics of ``donors`` from the per-tensor pair sums of their distinct
    members (``values[(a, b)]``, ``a <= b``: one float per name of :func:`_names`)."""
    unique = _unique(donors)
    index = {(str(m.id), form): u for u, (m, form) in enumerate(unique)}
    at = [index[(str(m.id), form)] for m, form in donors]
    n = len(donors)
    gram, dist2 = _zeros(n), _zeros(n)
    per_tensor: dict[str, list[list[float]]] = {}
    for t, name in enumerate(_names(base)):
        if not all(_has(base, u, name) for u in unique):
            continue
        g = _zeros(n)
        for i in range(n):
            for j in range(n):
                a, b = sorted((at[i], at[j]))
                g[i][j] = float(values[(a, b)][t])
        for i in range(n):
            for j in range(n):
                gram[i][j] = gram[i][j] + g[i][j]
        per_tensor[name] = g
    for i in range(n):
        for j in range(n):
            if i != j:
                dist2[i][j] = max((gram[i][i] + gram[j][j]) - 2.0 * gram[i][j], 0.0)
    return Stats(gram, dist2, per_tensor)


def _pair_values(store: Any, base: Manifest, unique: Sequence[tuple[Manifest, str]],
                 pairs: Sequence[tuple[int, int]] | None = None,
                 ) -> dict[tuple[int, int], np.ndarray]:
    """Per pair ``(a, b)`` of distinct donors (default: all, ``a <= b``), the
    ``fixed_sum(d_a * d_b)`` of every tensor of :func:`_names` both have (0.0 elsewhere),
    each tensor read once for all pairs."""
    if pairs is None:
        pairs = [(a, b) for a in range(len(unique)) for b in range(a, len(unique))]
    names = _names(base)
    out = {p: np.zeros(len(names), dtype=np.float64) for p in pairs}
    tables = {u: adapter_table(m, base) for u, (m, form) in enumerate(unique)
              if form == "adapter"}
    for t, name in enumerate(names):
        here = [(a, b) for a, b in pairs
                if _has(base, unique[a], name) and _has(base, unique[b], name)]
        if not here:
            continue
        rows = sorted({u for p in here for u in p})
        rec = base.tensors[name]
        fill = _task_vectors(store, rec, [_source(store, base, unique[u], tables.get(u), name)
                                          for u in rows])
        local = {u: r for r, u in enumerate(rows)}
        with np.errstate(invalid="ignore"):
            sums = pair_sums_of(fill, len(rows), math.prod(rec.shape),
                                [(local[a], local[b]) for a, b in here])
        for p, v in zip(here, sums, strict=True):
            out[p][t] = v
    return out


#: one donor's task vector of one tensor: ("full", raw bits, dtype) minus the base,
#: ("delta", raw bits, dtype) as stored, ("dense", float64) materialised, ("zero",)
Source = tuple[Any, ...]


def _raw(store: Any, rec: TensorRecord) -> np.ndarray:
    """A tensor's stored bits (each piece verified as it is read), flat."""
    return np.frombuffer(record_bytes(store, rec), dtype=RAW_DTYPES[rec.dtype])


def _wide(store: Any, rec: TensorRecord) -> np.ndarray:
    """A tensor widened exactly to float64, in its shape."""
    raw = _raw(store, rec)
    return widen_raw(raw, rec.dtype, np.empty(raw.size, dtype=np.float64)).reshape(rec.shape)


def _source(store: Any, base: Manifest, donor: tuple[Manifest, str],
            table: AdapterTable | None, name: str) -> Source:
    m, form = donor
    if form != "adapter":
        rec = m.tensors[name]
        return (form, _raw(store, rec), rec.dtype)
    assert table is not None
    if name in table.replace:  # modules_to_save: a full tensor of the adapter's own
        rec = m.tensors[table.replace[name]]
        return ("full", _raw(store, rec), rec.dtype)
    mod = table.lora.get(name)
    if mod is None:
        return ("zero",)
    delta = lora_delta(_wide(store, m.tensors[mod.a]), _wide(store, m.tensors[mod.b]),
                       lora_scale(mod.alpha, mod.rank, mod.rslora), mod.transpose)
    return ("dense", delta.reshape(-1))


def _task_vectors(store: Any, base: TensorRecord, sources: Sequence[Source]) -> Fill:
    """The :data:`Fill` of the donors' task vectors of one tensor: stored bits widened
    exactly to float64 a block at a time, a full donor's minus the base's."""
    b_raw = _raw(store, base) if any(s[0] == "full" for s in sources) else None
    scratch: dict[str, np.ndarray] = {}

    def buf(slot: str, dtype: type, m: int) -> np.ndarray:
        b = scratch.get(slot)
        if b is None or b.size < m:
            b = scratch[slot] = np.empty(m, dtype=dtype)
        return b[:m]

    def fill(s: int, e: int, out: np.ndarray) -> None:
        m = e - s
        bw = None
        if b_raw is not None:
            bw = widen_raw(b_raw[s:e], base.dtype, buf("base", np.float64, m))
        for row, src in zip(out, sources, strict=True):
            dst = row[:m]
            if src[0] == "zero":
                dst.fill(0.0)
            elif src[0] == "dense":
                dst[...] = src[1][s:e]
            else:
                w = widen_raw(src[1][s:e], src[2], dst)
                if src[0] == "full":
                    np.subtract(w, bw, out=dst)
                elif w is not dst:
                    dst[...] = w

    return fill


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
