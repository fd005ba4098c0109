"""Counter-based uniforms from BLAKE3's extendable output: any element, any order, any CPU.

Element ``j`` of a tensor (its flat, row-major index) under a 32-byte ``key`` gets

    u_j = LE32(X[4j : 4j + 4]) / 2**32,  X = BLAKE3-XOF(DOMAIN || key)

where ``LE32`` reads four bytes as an unsigned little-endian integer and ``DOMAIN`` is
``b"crdt-merge/methods/uniform32/v1\\x00"``. ``u_j`` is exact in float64 and lies in [0, 1).
A Bernoulli(p) draw keeps element ``j`` iff ``u_j < p``. The output for ``[start, stop)`` is
read with the XOF's seek, so a block costs what it covers, and the draws do not depend on
how a tensor is split into blocks, on threads or on the process.
"""

from __future__ import annotations

import blake3
import numpy as np

from crdt_merge.lazy import torch

DOMAIN = b"crdt-merge/methods/uniform32/v1\x00"
_SCALE = 2.0**-32


class Uniforms:
    """The uniform stream of one key."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError("a randomness key is 32 bytes")
        self._hasher = blake3.blake3(DOMAIN + key)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """``u_j`` for ``j`` in ``[start, stop)`` as a float64 tensor."""
        if not 0 <= start <= stop:
            raise ValueError(f"bad range [{start}, {stop})")
        raw = self._hasher.digest(length=4 * (stop - start), seek=4 * start)
        words = np.frombuffer(raw, dtype="<u4").astype(np.float64)
        return torch.from_numpy(words) * _SCALE
