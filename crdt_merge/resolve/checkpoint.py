"""The checkpoint id of a resolved folder, computed from its files alone (specs/checkpoint.md).

The checkpoint id names every byte a user downloads: it is the id of the *checkpoint
manifest*, a manifest (specs/formats.md section 5) whose

- ``tensors`` are the tensors of every ``*.safetensors`` file, their data cut into pieces;
- ``files`` are every other file of the folder (config, tokenizer, index, model card, ...)
  byte for byte, except ``merge_manifest.json``, the receipt that records the id;
- ``meta`` is ``{"checkpoint": 1, "safetensors": {file: {"header": [pieces], "size": n}}}``:
  each safetensors file's header bytes (the 8-byte length and the JSON with its padding)
  cut into pieces, and its size.

A safetensors file whose tensors do not tile its data exactly (a gap, an overlap, bytes
after the last tensor) has bytes no record would cover: it is refused, not measured.

``resolve`` computes this manifest from the folder it wrote (the tensor pieces it hashed
while writing, the rest read back); ``crdt-merge verify-folder`` computes it from a
downloaded folder, no replica needed, and compares it with ``merge_manifest.json``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crdt_merge import codec
from crdt_merge.crdt.ops import PROFILES
from crdt_merge.errors import CrdtMergeError, ModelImportError, PlanError, SchemaError
from crdt_merge.hashing import PlanId, digest
from crdt_merge.store.manifests import FileRecord, Manifest, TensorRecord, from_wire
from crdt_merge.store.safetensors_io import MappedFile, iter_pieces, read_header

MANIFEST_FILE = "merge_manifest.json"
CHECKPOINT_VERSION = 1


def _pieces(data: memoryview | bytes, piece_size: int) -> tuple[str, ...]:
    return tuple(digest(p) for p in iter_pieces(memoryview(data), piece_size))


def _safetensors(path: Path, piece_size: int,
                 known: Mapping[str, TensorRecord] | None) -> tuple[dict[str, Any],
                                                                    dict[str, TensorRecord]]:
    """One safetensors file's meta entry and tensor records.

    Raises:
        PlanError: the file is not a safetensors file, or its tensors do not tile its data.
    """
    try:
        infos, _ = read_header(path)
    except ModelImportError as exc:
        raise PlanError(f"{path.name}: {exc.detail}") from None
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        prefix = struct.pack("<Q", n) + f.read(n)
    pos = len(prefix)
    for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            raise PlanError(f"{path.name}: tensor {info.name!r} starts at byte {info.begin}, "
                            f"not {pos}: the tensors do not tile the file")
        pos = info.end
    if pos != size:
        raise PlanError(f"{path.name}: {size - pos} bytes after the last tensor")
    tensors: dict[str, TensorRecord] = {}
    with MappedFile(path) as mapped:
        for name, info in infos.items():
            have = known.get(name) if known is not None else None
            if have is not None and (have.dtype, have.shape) == (info.dtype, info.shape):
                tensors[name] = have  # hashed while it was written
            else:
                tensors[name] = TensorRecord(info.dtype, info.shape, _pieces(
                    mapped.view[info.begin:info.end], piece_size))
    return {"header": list(_pieces(prefix, piece_size)), "size": size}, tensors


def checkpoint_manifest(folder: str | Path, piece_size: int,
                        known: Mapping[str, TensorRecord] | None = None) -> Manifest:
    """The checkpoint manifest of ``folder`` (see the module docstring).

    ``known`` are tensor records already hashed (by resolve, while writing); a tensor whose
    dtype and shape match its header takes its record from there instead of being read.

    Raises:
        PlanError: the folder holds a sub-folder or a link, a file name a manifest cannot
            hold, a tensor named twice, or a safetensors file with uncovered bytes.
    """
    folder = Path(folder)
    tensors: dict[str, TensorRecord] = {}
    files: dict[str, FileRecord] = {}
    layout: dict[str, Any] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name.encode()):
        name = path.name
        if name == MANIFEST_FILE:
            continue
        if path.is_symlink() or not path.is_file():
            raise PlanError(f"{folder}: {name} is not a plain file; a checkpoint folder holds "
                            "only files")
        if name.endswith(".safetensors"):
            layout[name], found = _safetensors(path, piece_size, known)
            for tensor in found:
                if tensor in tensors:
                    raise PlanError(f"{folder}: tensor {tensor!r} is in two safetensors files")
            tensors.update(found)
        else:
            data = path.read_bytes()
            files[name] = FileRecord(len(data), _pieces(data, piece_size))
    manifest = Manifest(piece_size, dict(sorted(tensors.items())), files,
                        {"checkpoint": CHECKPOINT_VERSION, "safetensors": layout})
    try:  # names a manifest cannot hold (a path, a very long name) are refused here
        from_wire(manifest.to_wire())
    except SchemaError as exc:
        raise PlanError(f"{folder}: {exc.detail}") from None
    return manifest


def plan_id(plan_wire: Mapping[str, Any]) -> PlanId:
    """The plan id of a plan's wire form: BLAKE3 of its canonical msgpack (no prefix)."""
    return PlanId(digest(codec.encode(dict(plan_wire))))


@dataclass
class FolderCheck:
    """What ``verify-folder`` found: the recomputed ids and each disagreement."""

    checkpoint_id: str
    piece_size: int
    recorded_checkpoint_id: str | None = None
    plan_id: str | None = None
    recorded_plan_id: str | None = None
    problems: list[str] = field(default_factory=list)
    #: how the piece size was chosen when no ``merge_manifest.json`` records it (else None)
    piece_size_note: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _differences(found: Manifest, recorded: Mapping[str, Any]) -> list[str]:
    """Which files of the folder differ from the recorded checkpoint manifest."""
    out: list[str] = []
    mine = found.to_wire()
    for section in ("files", "tensors"):
        theirs = recorded.get(section) if isinstance(recorded.get(section), dict) else {}
        for name in sorted(set(mine[section]) | set(theirs)):
            if name not in theirs:
                out.append(f"{section[:-1]} {name} is not in the recorded checkpoint")
            elif name not in mine[section]:
                out.append(f"{section[:-1]} {name} of the recorded checkpoint is missing")
            elif mine[section][name] != theirs[name]:
                out.append(f"{section[:-1]} {name} differs from the recorded checkpoint")
    layout = recorded.get("meta", {}).get("safetensors", {}) if isinstance(
        recorded.get("meta"), dict) else {}
    for name, entry in sorted(mine["meta"]["safetensors"].items()):
        if isinstance(layout, dict) and name in layout and layout[name] != entry:
            out.append(f"safetensors header or size of {name} differs from the recorded "
                       "checkpoint")
    return out


def check_folder(folder: str | Path, expect: str | None = None,
                 piece_size: int | None = None) -> FolderCheck:
    """Recompute the checkpoint id (and plan id) of a downloaded folder from its files.

    The piece size is ``piece_size``, else the one ``merge_manifest.json`` records, else
    (no receipt) the profile's piece size that gives ``expect``, else 16 MiB (profile v1);
    :attr:`FolderCheck.piece_size_note` then says which was taken. Problems: ``expect`` given and different; the recorded ids in
    ``merge_manifest.json`` differ from the recomputed ones (which files differ is named).

    Raises:
        PlanError: not a folder, or a folder that is not a checkpoint (see
            :func:`checkpoint_manifest`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PlanError(f"{folder} is not a folder")
    record: dict[str, Any] | None = None
    problems: list[str] = []
    receipt = folder / MANIFEST_FILE
    if receipt.is_file():
        try:
            record = json.loads(receipt.read_bytes())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            problems.append(f"{MANIFEST_FILE} is not readable JSON ({str(exc)[:80]})")
            record = None
    recorded_manifest = (record or {}).get("manifest")
    if not isinstance(recorded_manifest, dict):
        recorded_manifest = {}
    note = None
    if piece_size is None:
        size = recorded_manifest.get("piece_size")
        if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 2**31:
            piece_size = size
    if piece_size is None:  # no receipt says: each profile's piece size, v1's first
        profiles = sorted(PROFILES.items(), key=lambda kv: -kv[1])
        names = ", ".join(f"{n}: {size}" for n, size in profiles)
        manifest = checkpoint_manifest(folder, profiles[0][1])
        taken = profiles[0][0]
        for name, size in profiles[1:]:
            if expect is None or manifest.id == expect:
                break
            other = checkpoint_manifest(folder, size)
            if other.id == expect:
                manifest, taken = other, name
        piece_size = manifest.piece_size
        if expect is None:
            note = (f"no {MANIFEST_FILE}: took {piece_size}-byte pieces (profile {taken}); "
                    f"a checkpoint of a replica with another profile ({names}) needs "
                    "--piece-size")
        elif manifest.id == expect:
            note = f"no {MANIFEST_FILE}: {piece_size}-byte pieces (profile {taken})"
        else:
            note = (f"no {MANIFEST_FILE}: tried each profile's piece size ({names}); for "
                    "another, give --piece-size")
    else:
        manifest = checkpoint_manifest(folder, piece_size)
    check = FolderCheck(manifest.id, piece_size, problems=problems, piece_size_note=note)
    if record is not None:
        check.recorded_checkpoint_id = record.get("checkpoint_id")
        check.recorded_plan_id = record.get("plan_id")
        if check.recorded_checkpoint_id != check.checkpoint_id:
            problems.append(f"{MANIFEST_FILE} records checkpoint {check.recorded_checkpoint_id},"
                            f" the files hash to {check.checkpoint_id}")
            problems.extend(_differences(manifest, recorded_manifest))
        if isinstance(record.get("plan"), dict):
            try:
                check.plan_id = plan_id(record["plan"])
            except (CrdtMergeError, TypeError, ValueError) as exc:  # no canonical encoding
                problems.append(f"{MANIFEST_FILE}: the plan cannot be encoded ({exc})")
            if check.plan_id is not None and check.plan_id != check.recorded_plan_id:
                problems.append(f"{MANIFEST_FILE}: the plan hashes to {check.plan_id}, not the "
                                f"recorded {check.recorded_plan_id}")
    if expect is not None and expect != check.checkpoint_id:
        problems.append(f"the files hash to {check.checkpoint_id}, not the expected {expect}"
                        + ("" if note is None else " (with any profile's piece size)"))
    return check
