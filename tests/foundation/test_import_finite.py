"""Import and the plan's NaN/inf policy.

The importer caches, per manifest, the first tensor (by name) that holds NaN or inf. It
tests the pieces it writes while it hashes them, tests the pieces the store held already
only when the manifest's answer is not cached yet, and tests nothing when it is (a
re-import only hashes). These tests check the cached answer against torch's ``isfinite``
on the stored tensors, for new models, re-imports, models that share pieces with one
stored before (under the same or another dtype) and sharded checkpoints.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crdt_merge.store.importer as importer
import crdt_merge.store.local as local
from crdt_merge.errors import ModelImportError
from crdt_merge.hashing import digest
from crdt_merge.replica import Replica
from crdt_merge.store.importer import INDEX_NAME, import_model
from crdt_merge.store.safetensors_io import header_bytes
from crdt_merge.store.tensors import load_tensor

from .helpers import DTYPES, PIECE_SIZE, new_project, scratch, tensor_bytes

#: a tensor to write: (dtype name, raw little-endian bytes); its shape is 1-D
Raw = tuple[str, bytes]

SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I32": 4, "U8": 1}


def raw(t: torch.Tensor) -> Raw:
    return DTYPES[t.dtype], tensor_bytes(t)


def floats(n: int, dtype: torch.dtype = torch.float32, bad: int | None = None,
           value: float = float("nan"), seed: int = 0) -> Raw:
    """``n`` finite values, with ``value`` (NaN or inf) at index ``bad``."""
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if bad is not None:
        t[bad] = value
    return raw(t)


def write_file(path: Path, tensors: dict[str, Raw]) -> Path:
    """A safetensors file of 1-D tensors, written with crdt_merge's own header writer."""
    specs = [(name, dtype, (len(data) // SIZES[dtype],)) for name, (dtype, data) in tensors.items()]
    prefix, _ = header_bytes(specs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(prefix)
        for name in sorted(tensors):
            f.write(tensors[name][1])
    return path


def write_model(folder: Path, tensors: dict[str, Raw], shards: int = 1) -> Path:
    """A model folder: one file, or ``shards`` files and their index (names dealt round-robin)."""
    if shards == 1:
        write_file(folder / "model.safetensors", tensors)
        return folder
    weight_map = {}
    for k in range(shards):
        part = {name: tensors[name] for i, name in enumerate(sorted(tensors)) if i % shards == k}
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_file(folder / shard, part)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    return folder


def cached(replica: Replica, manifest_id: str) -> str | None:
    """The answer the import cached (a missing row fails the test)."""
    value = replica.store.index.get_meta("finite:" + manifest_id)
    assert value is not None, "the import cached no NaN/inf answer"
    return value.decode() or None


def forget(replica: Replica, manifest_id: str) -> None:
    """Drop the cached answer, as a replica that pulled the manifest has none."""
    with replica.store.index.write() as c:
        c.execute("DELETE FROM meta WHERE key = ?", ("finite:" + manifest_id,))


def oracle(replica: Replica, manifest_id: str) -> str | None:
    """The first tensor by name with a value torch does not call finite, read back from
    the stored pieces (shares no code with crdt_merge.store.finite)."""
    manifest = replica.get_manifest(manifest_id)
    for name in sorted(manifest.tensors):
        if not bool(torch.isfinite(load_tensor(replica.store, manifest.tensors[name])).all()):
            return name
    return None


def object_files(replica: Replica) -> dict[str, tuple[int, int]]:
    """Every object file with its inode and modification time: a rewrite changes them."""
    out = {}
    for f in (replica.path / "objects").rglob("*"):
        if f.is_file():
            st = f.stat()
            out[f.name] = (st.st_ino, st.st_mtime_ns)
    return out


@pytest.fixture
def replica(fast_tmp: Path):
    with new_project(fast_tmp / "replica") as r:
        yield r


# -- new models and re-imports ------------------------------------------------------------------


def test_new_models_are_flagged_by_their_first_bad_tensor(replica, fast_tmp: Path) -> None:
    n = 3000  # 12000 bytes of F32: three 4 KiB pieces, the last one short
    cases = {
        "finite": ({"a": floats(n), "b": floats(n, torch.bfloat16, seed=1)}, None),
        "nan in the last piece": ({"a": floats(n, seed=2), "b": floats(n, bad=n - 1, seed=3)}, "b"),
        "bf16 inf": ({"a": floats(n, torch.bfloat16, bad=5, value=float("inf"), seed=4)}, "a"),
        "f16 -inf": ({"m": floats(n, torch.float16, bad=0, value=float("-inf"), seed=5)}, "m"),
        "first by name": ({"z": floats(n, bad=1, seed=6), "y": floats(n, bad=2, seed=7),
                           "x": floats(n, seed=8)}, "y"),
        "integers": ({"i": raw(torch.full((n,), -1, dtype=torch.int32))}, None),
    }
    for label, (tensors, expected) in cases.items():
        imported = import_model(replica.store, str(write_model(fast_tmp / label, tensors)), PIECE_SIZE)
        assert cached(replica, imported.manifest_id) == expected == oracle(replica, imported.manifest_id), label


def test_reimport_hashes_only(replica, fast_tmp: Path, monkeypatch) -> None:
    """A model imported before: the same manifest and answer, and nothing tested, written,
    fsynced or committed."""
    n = 3000
    models = {"finite": write_model(fast_tmp / "f", {"a": floats(n), "b": floats(n, seed=1)}),
              "nan": write_model(fast_tmp / "n", {"a": floats(n), "b": floats(n, bad=n - 1, seed=2)})}
    first = {k: import_model(replica.store, str(p), PIECE_SIZE) for k, p in models.items()}
    assert cached(replica, first["finite"].manifest_id) is None
    assert cached(replica, first["nan"].manifest_id) == "b"
    files = object_files(replica)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a re-import must not do this")

    monkeypatch.setattr(importer, "has_nonfinite", refuse)
    monkeypatch.setattr(replica.store.files, "write_stream", refuse)
    monkeypatch.setattr(replica.store.index, "write", refuse)
    monkeypatch.setattr(local, "fsync_dir", refuse)
    for key, path in models.items():
        again = import_model(replica.store, str(path), PIECE_SIZE)
        assert again.manifest_id == first[key].manifest_id and again.new_pieces == 0
    monkeypatch.undo()
    assert object_files(replica) == files
    assert cached(replica, first["finite"].manifest_id) is None
    assert cached(replica, first["nan"].manifest_id) == "b"


@pytest.mark.parametrize("shards", [1, 2])
def test_reimport_without_the_answer_tests_again(replica, fast_tmp: Path, shards: int) -> None:
    """Every piece is held, the answer is not (a pulled manifest): it is found again from
    the source files, in whichever shard the bad tensor is."""
    n = 3000
    tensors = {"a": floats(n), "b": floats(n, seed=1), "c": floats(n, bad=n - 1, seed=2),
               "d": floats(n, bad=0, seed=3)}
    folder = write_model(fast_tmp / "m", tensors, shards)
    first = import_model(replica.store, str(folder), PIECE_SIZE)
    assert cached(replica, first.manifest_id) == "c"
    forget(replica, first.manifest_id)
    again = import_model(replica.store, str(folder), PIECE_SIZE)
    assert again.new_pieces == 0 and again.manifest_id == first.manifest_id
    assert cached(replica, first.manifest_id) == "c" == oracle(replica, first.manifest_id)


# -- models that share pieces with one stored before ----------------------------------------------


def _reinterpret(data: Raw, dtype: str) -> Raw:
    return dtype, data[1]


NAN = floats(3000, bad=2999, seed=10)           # F32 with a NaN in its last piece
FINE = floats(3000, seed=11)


@pytest.mark.parametrize(("stored", "new", "expected"), [
    # the bad tensor is the shared one: its pieces are not new, the model is
    ({"a": NAN, "b": FINE}, {"a": NAN, "b": floats(3000, seed=12)}, "a"),
    # shared under another name
    ({"q": NAN}, {"a": NAN, "b": FINE}, "a"),
    # the same bytes were integers in the stored model (never NaN), floats in the new one
    ({"a": _reinterpret(NAN, "I32")}, {"a": NAN, "b": FINE}, "a"),
    # ... and the other way round
    ({"a": NAN}, {"a": _reinterpret(NAN, "I32"), "b": FINE}, None),
    # a new bad tensor after a shared bad one: the first by name wins
    ({"a": NAN}, {"a": NAN, "z": floats(3000, bad=0, seed=13)}, "a"),
    # a shared bad tensor after a new bad one
    ({"z": NAN}, {"a": floats(3000, bad=0, seed=14), "z": NAN}, "a"),
    # two pieces of the tensor are shared, its NaN is in the third, which is not
    ({"a": FINE}, {"a": ("F32", FINE[1][:8192] + struct.pack("<f", float("nan")) * 952)}, "a"),
    # its NaN is in the one piece that is shared
    ({"a": NAN}, {"a": ("F32", FINE[1][:8192] + NAN[1][8192:])}, "a"),
    # shared and finite
    ({"a": FINE}, {"a": FINE, "b": floats(3000, seed=16)}, None),
])
@pytest.mark.parametrize("shards", [1, 2])
def test_shared_pieces(replica, fast_tmp: Path, stored: dict[str, Raw], new: dict[str, Raw],
                       expected: str | None, shards: int) -> None:
    one = import_model(replica.store, str(write_model(fast_tmp / "stored", stored)), PIECE_SIZE)
    two = import_model(replica.store, str(write_model(fast_tmp / "new", new, shards)), PIECE_SIZE)
    assert 0 < two.new_pieces < two.total_pieces, "the test needs shared and new pieces"
    assert cached(replica, one.manifest_id) == oracle(replica, one.manifest_id)
    assert cached(replica, two.manifest_id) == expected == oracle(replica, two.manifest_id)


def test_source_changed_before_shared_pieces_are_tested(replica, fast_tmp: Path, monkeypatch) -> None:
    """The held pieces are tested in the source file after hashing: a file changed in
    between is refused, not tested as though it were what was hashed."""
    import_model(replica.store, str(write_model(fast_tmp / "stored", {"a": FINE})), PIECE_SIZE)
    folder = write_model(fast_tmp / "new", {"a": FINE, "b": floats(3000, seed=1)})
    put_pieces = importer._put_pieces

    def then_touch(*args, **kwargs):
        out = put_pieces(*args, **kwargs)
        weights = folder / "model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
        return out

    monkeypatch.setattr(importer, "_put_pieces", then_touch)
    with pytest.raises(ModelImportError, match="changed while reading"):
        import_model(replica.store, str(folder), PIECE_SIZE)


# -- the store's side: which pieces are scanned ----------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_put_many_scan_scans_the_pieces_it_writes(replica, monkeypatch, split: bool) -> None:
    """Held pieces are neither written nor scanned; new ones are both, and so is a file a
    crash left unindexed (written again). The ids are the same whether or not BLAKE3 also
    splits each piece over threads (the pieces are large enough for it to)."""
    monkeypatch.setattr(local, "_SPLIT_HASHES", split)
    store = replica.store
    held, fresh, orphan = b"h" * (3 << 20), b"f" * (2 << 20), b"o" * 100
    held_id = store.put(held)
    orphan_id = store.files.write(orphan, digest(orphan))  # a file without its index row
    writes = []
    write_stream = store.files.write_stream

    def counted(object_id, *args, **kwargs):
        writes.append(object_id)
        return write_stream(object_id, *args, **kwargs)

    monkeypatch.setattr(store.files, "write_stream", counted)
    ids, new, flags = store.put_many_scan([held, fresh, orphan], lambda i, piece: (i, bytes(piece[:1])))
    assert ids == [held_id, digest(fresh), orphan_id]
    assert new == 2
    assert flags == [None, (1, b"f"), (2, b"o")]
    assert sorted(writes) == sorted([digest(fresh), orphan_id])
    assert store.missing(ids) == set()


# -- a property: the cached answer is the oracle's, whatever was stored before ----------------------


BLOCKS = [
    bytes(6144),                                                    # zeros
    tensor_bytes(torch.arange(1536, dtype=torch.float32)),          # finite as F32
    tensor_bytes(torch.arange(1536, dtype=torch.float32))[:-4] + struct.pack("<f", float("inf")),
    tensor_bytes(torch.randn(1536, generator=torch.Generator().manual_seed(9))),
    bytes(range(256)) * 24,                                         # every byte value
]

models = st.dictionaries(st.sampled_from(["a.w", "b.w", "c.w", "d.w"]),
                         st.tuples(st.sampled_from(sorted(SIZES)), st.integers(0, len(BLOCKS) - 1)),
                         min_size=1, max_size=4)
steps = st.lists(st.tuples(models, st.integers(1, 2), st.booleans()), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps, st.data())
def test_cached_answer_is_the_oracles(history, data) -> None:
    """Models built from a few blocks of bytes under several dtypes (so they share pieces),
    imported in turn, some again and some after their answer was forgotten."""
    with scratch() as tmp, new_project(Path(tmp) / "replica") as replica:
        imported: list[Path] = []
        for k, (spec, shards, drop) in enumerate(history):
            folder = Path(tmp) / f"m{k}"
            write_model(folder, {name: (dtype, BLOCKS[block]) for name, (dtype, block) in spec.items()},
                        min(shards, len(spec)))
            imported.append(folder)
            for source in (folder, data.draw(st.sampled_from(imported))):
                mid = import_model(replica.store, str(source), PIECE_SIZE).manifest_id
                assert cached(replica, mid) == oracle(replica, mid)
                if drop:
                    forget(replica, mid)
