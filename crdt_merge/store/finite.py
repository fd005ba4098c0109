"""NaN/inf detection on raw tensor bytes, and its per-manifest cache (numpy only, so the
importer does not load torch)."""

from __future__ import annotations

import numpy as np

from crdt_merge.store.local import LocalStore

#: float dtype -> (integer view, exponent mask): a value is NaN or inf when all its exponent
#: bits are set, i.e. when its bits without the sign are at least the mask
_EXPONENT = {"F16": (np.int16, 0x7C00), "BF16": (np.int16, 0x7F80),
             "F32": (np.int32, 0x7F800000), "F64": (np.int64, 0x7FF0000000000000)}
#: the dtypes that can hold NaN or inf
FLOAT_DTYPES = frozenset(_EXPONENT)
_FINITE_KEY = "finite:"
_CHUNK = 1 << 18


def has_nonfinite(data: bytes | bytearray | memoryview, dtype: str) -> bool:
    """True when raw little-endian tensor bytes of ``dtype`` hold a NaN or an infinity
    (integer dtypes never do): the largest ``bits & ~sign`` reaches the exponent mask.
    Chunks small enough to stay in cache, two passes each and no boolean temporary."""
    if dtype not in _EXPONENT:
        return False
    int_type, mask = _EXPONENT[dtype]
    words = np.frombuffer(data, dtype=np.dtype(int_type).newbyteorder("<"))
    magnitude = int_type(np.iinfo(int_type).max)  # every bit but the sign
    buf = np.empty(min(words.size, _CHUNK), dtype=words.dtype)
    for i in range(0, words.size, _CHUNK):
        chunk = words[i:i + _CHUNK]
        out = buf[:chunk.size]
        np.bitwise_and(chunk, magnitude, out=out)
        if out.max() >= mask:
            return True
    return False


def first_nonfinite(store: LocalStore, manifest_id: str) -> str | None:
    """The first tensor (by name) of a manifest that holds NaN or inf, or None. The answer
    is a function of the manifest's bytes, so it is cached in the replica's index."""
    cached = store.index.get_meta(_FINITE_KEY + manifest_id)
    if cached is not None:
        return cached.decode() or None
    from crdt_merge.store.manifests import decode
    from crdt_merge.store.tensors import record_bytes

    manifest = decode(store.get(manifest_id))
    bad = ""
    for name, rec in manifest.tensors.items():
        if rec.dtype in _EXPONENT and rec.nbytes and has_nonfinite(record_bytes(store, rec), rec.dtype):
            bad = name
            break
    remember_finite(store, manifest_id, bad or None)
    return bad or None


def finite_known(store: LocalStore, manifest_id: str) -> bool:
    """Whether the NaN/inf answer for a manifest is already cached."""
    return store.index.get_meta(_FINITE_KEY + manifest_id) is not None


def remember_finite(store: LocalStore, manifest_id: str, bad: str | None) -> None:
    store.index.set_meta(_FINITE_KEY + manifest_id, (bad or "").encode())
