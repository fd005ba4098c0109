"""Shared helpers for the merge-method tests: deterministic inputs and jobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import blake3
import numpy as np
import torch

from crdt_merge.methods import TensorJob, get_method


def tensor(seed: str, shape: Sequence[int], scale: float = 1.0) -> torch.Tensor:
    """A float64 tensor uniform in [-scale, scale), the same on every machine (BLAKE3 bytes)."""
    n = int(np.prod(shape)) if shape else 1
    raw = blake3.blake3(seed.encode()).digest(length=8 * n)
    words = np.frombuffer(raw, dtype="<u8") >> np.uint64(11)
    u = words.astype(np.float64) * 2.0**-53
    return torch.from_numpy((u - 0.5) * (2 * scale)).reshape(tuple(shape))


def keys(count: int, tag: str = "k") -> list[bytes]:
    """``count`` distinct 32-byte randomness keys."""
    return [blake3.blake3(f"{tag}/{i}".encode()).digest() for i in range(count)]


def run(
    method: str,
    base: torch.Tensor | None,
    donors: Sequence[torch.Tensor],
    params: Sequence[Mapping[str, object]] | None = None,
    options: Mapping[str, object] | None = None,
    key_tag: str = "k",
    name: str = "model.layers.0.mlp.weight",
) -> torch.Tensor:
    """Merge one tensor with the registered method ``method``."""
    m = get_method(method)
    job = TensorJob(
        name=name,
        base=base,
        donors=list(donors),
        params=list(params) if params is not None else [{} for _ in donors],
        options=dict(options or {}),
        keys=keys(len(donors), key_tag) if m.random else [],
    )
    return m.merge(job)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two float64 tensors are byte-identical (signed zeros and NaN payloads too)."""
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int64), b.contiguous().view(torch.int64)
    )
