"""Import a model into a replica's store: tensors as pieces, config and tokenizer as files.

Sources: a ``.safetensors`` file, a folder holding one (or a sharded checkpoint with
``model.safetensors.index.json``) plus config and tokenizer files, a PyTorch checkpoint
(``pytorch_model.bin`` or sharded with ``pytorch_model.bin.index.json``, read with
``torch.load(weights_only=True)``, see :mod:`crdt_merge.store.torch_bin`; the same weights
give the same manifest id as in safetensors), or a Hugging Face repo id resolved through
huggingface_hub's local cache (``org/name`` or ``org/name@revision``).
Tensors are read through a memory map, one piece at a time, and only pieces the store lacks
are written, so importing the same model twice writes nothing. The NaN/inf test of the
plan's policy runs on the pieces written, while they are hashed, and on the others only when
the manifest's answer is not cached yet: a re-import only hashes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from crdt_merge import testpoints
from crdt_merge.errors import ModelImportError, PieceMissing
from crdt_merge.hashing import ManifestId
from crdt_merge.store.finite import FLOAT_DTYPES, finite_known, has_nonfinite, remember_finite
from crdt_merge.store.local import LocalStore
from crdt_merge.store.manifests import FileRecord, Manifest, TensorRecord
from crdt_merge.store.safetensors_io import MappedFile, TensorInfo, iter_pieces, read_header
from crdt_merge.store.shards import indexed_shards
from crdt_merge.store.torch_bin import bin_files

#: files of a model folder kept beside the tensors (config, tokenizer, chat template)
KEPT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "preprocessor_config.json",
    "adapter_config.json",
)
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Imported:
    manifest_id: ManifestId
    manifest: Manifest
    source: str
    new_pieces: int
    total_pieces: int


#: a Hugging Face repo id as a label holds it: ``org/name``, optionally ``@revision``
HUB_ID = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,95})/([A-Za-z0-9][A-Za-z0-9._-]{0,95})(@[^\s/]+)?")


def model_label(source: str) -> str:
    """The label a model gets by default: a Hugging Face repo id as given (``org/name`` or
    ``org/name@rev``), a local file or folder by its own name only, so that no path of the
    user's machine reaches an op or a model card."""
    path = Path(source).expanduser()
    if not path.exists() and HUB_ID.fullmatch(source):
        return source
    return path.resolve().name or source


def hub_repo(label: str) -> str | None:
    """The repo id (``org/name``, without a revision) a label names, or None."""
    match = HUB_ID.fullmatch(label)
    return f"{match.group(1)}/{match.group(2)}" if match else None


def resolve_source(source: str) -> Path:
    """A local path, or a Hugging Face repo id (``org/name[@revision]``) found in the local
    huggingface_hub cache. Never downloads when ``HF_HUB_OFFLINE`` is set.

    Raises:
        ModelImportError: neither a local path nor a cached repo.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    repo, _, revision = source.partition("@")
    if repo.count("/") != 1 or repo.startswith(("/", ".")):
        raise ModelImportError(f"{source}: no such file or folder (and not an org/name repo id)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - the hub extra is not installed
        raise ModelImportError(f"{source}: install crdt-model-merge[hub] to import by repo id") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        # the environment is read now, not when huggingface_hub was imported
        folder = snapshot_download(repo, revision=revision or None, local_files_only=offline,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise ModelImportError(f"{source}: not in the local Hugging Face cache and not "
                               f"downloadable here ({type(exc).__name__})") from None
    return Path(folder)


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelImportError(f"{path}: only .safetensors and .bin files can be imported "
                                   "as files (a .gguf file: see crdt_merge.formats.gguf)")
        return [path]
    index = path / INDEX_NAME
    if index.is_file():
        return indexed_shards(path, index)
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise ModelImportError(f"{path}: no .safetensors or pytorch_model.bin files")
    return found


def _put_bytes(store: LocalStore, data: memoryview, piece_size: int) -> tuple[list[str], int]:
    """Store ``data`` as pieces; return their ids and how many were new."""
    ids, new, _ = _put_pieces(store, list(iter_pieces(data, piece_size)))
    return ids, new


def _put_pieces(store: LocalStore, pieces: list[memoryview],
                scan: Callable[[int, memoryview], bool] | None = None,
                ) -> tuple[list[str], int, list[Any]]:
    """Store pieces a batch at a time; return their ids, how many were new and, with
    ``scan``, ``scan(i, piece)`` for each piece written (None for the others, see
    :meth:`LocalStore.put_many_scan`)."""
    ids: list[str] = []
    flags: list[Any] = []
    new = 0
    for i in range(0, len(pieces), _BATCH):
        batch_scan = None if scan is None else (lambda j, piece, i=i: scan(i + j, piece))
        batch_ids, n_new, batch_flags = store.put_many_scan(pieces[i:i + _BATCH], batch_scan)
        ids.extend(batch_ids)
        flags.extend(batch_flags)
        new += n_new
        if i + _BATCH < len(pieces):
            testpoints.pause("import.batch")
    return ids, new, flags


#: pieces written before their directories are fsynced and their index rows committed
_BATCH = 256


class _FileId(NamedTuple):
    """What tells a file from the same path changed or replaced since it was read."""

    device: int
    inode: int
    size: int
    mtime_ns: int


def _identity(path: Path) -> _FileId:
    st = path.stat()
    return _FileId(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class _Cut:
    """One tensor cut into pieces for its import: where its pieces sit in its file's list
    of pieces, their ids and, per piece, whether the NaN/inf test found one (None: not
    tested, as the store held that piece already)."""

    file: Path
    identity: _FileId
    info: TensorInfo
    start: int
    count: int
    ids: list[str] = field(default_factory=list)
    found: list[bool | None] = field(default_factory=list)


def _first_nonfinite(cuts: dict[str, _Cut], piece_size: int) -> str | None:
    """The first tensor by name that holds NaN or inf, as :func:`finite.first_nonfinite`
    would find it in the stored manifest, or None.

    Pieces tested while they were written are not tested again. The others (pieces this
    model shares with one stored before) are tested in their weight file, mapped again
    and first checked to be the file that was hashed; tensors after one already known to
    hold NaN or inf are skipped.

    Raises:
        ModelImportError: a weight file changed since its pieces were hashed.
    """
    bad = min((name for name, cut in cuts.items() if any(cut.found)), default=None)
    untested: dict[Path, list[_Cut]] = {}
    for name, cut in cuts.items():
        if (bad is None or name < bad) and cut.info.dtype in FLOAT_DTYPES and None in cut.found:
            untested.setdefault(cut.file, []).append(cut)
    if not untested:
        return bad
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for weights, group in untested.items():
            with MappedFile(weights) as mf:
                if _identity(weights) != group[0].identity or len(mf.view) != group[0].identity.size:
                    raise ModelImportError(f"{weights}: file changed while reading")
                jobs = [(cut, k) for cut in group for k, f in enumerate(cut.found) if f is None]
                views = [mf.view[cut.info.begin + k * piece_size:
                                 min(cut.info.end, cut.info.begin + (k + 1) * piece_size)]
                         for cut, k in jobs]
                try:
                    found = list(pool.map(has_nonfinite, views, [cut.info.dtype for cut, _ in jobs]))
                finally:
                    for view in views:
                        view.release()
                for (cut, k), f in zip(jobs, found, strict=True):
                    cut.found[k] = f
    return min((name for name, cut in cuts.items() if any(cut.found)), default=None)


def _model_type(path: Path) -> str | None:
    """The ``model_type`` of a model folder's config.json, if it names one.

    Raises:
        ModelImportError: config.json is not a JSON object (or not UTF-8, or nests too
            deep, or holds a number too long to read).
    """
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return None
    try:
        value = json.loads(config.read_bytes())
        model_type = value.get("model_type")
        if isinstance(model_type, str):
            model_type.encode()  # a lone surrogate (JSON "\ud800") has no UTF-8 form
    except (ValueError, RecursionError, AttributeError):
        raise ModelImportError(f"{config}: not valid JSON") from None
    return model_type if isinstance(model_type, str) else None


def import_model(store: LocalStore, source: str, piece_size: int,
                 meta: dict[str, Any] | None = None) -> Imported:
    """Import ``source`` and store its manifest. See the module docstring.

    Raises:
        ModelImportError: unreadable, truncated or inconsistent files, or a tensor name
            that appears in two shards.
    """
    path = resolve_source(source)
    bins = bin_files(path)
    if bins is not None:
        return _import_bin(store, path, bins, piece_size, meta)
    new = total = 0
    # every header is read and checked, and the config parsed, before a byte is stored: an
    # import refused for any of them leaves the store as it was
    headers = [(weights, read_header(weights)[0]) for weights in _weight_files(path)]
    seen: set[str] = set()
    for _, infos in headers:
        for name in infos:
            if name in seen:
                raise ModelImportError(f"{path}: tensor {name!r} appears in two shards")
            seen.add(name)
    info_meta: dict[str, Any] = dict(meta or {})
    model_type = _model_type(path)
    if model_type is not None:
        info_meta.setdefault("model_type", model_type)
    # every tensor cut into pieces (views of its file's mapping, no copy) and stored in
    # batches: fsyncs and index commits are shared across tensors
    cuts: dict[str, _Cut] = {}
    for weights, infos in headers:
        with MappedFile(weights) as mf:
            identity = _identity(weights)
            if len(mf.view) != identity.size:
                raise ModelImportError(f"{weights}: file changed while reading")
            pieces: list[memoryview] = []
            dtypes: list[str] = []
            try:
                for name in sorted(infos):
                    info = infos[name]
                    if name in cuts:
                        raise ModelImportError(f"{path}: tensor {name!r} appears in two shards")
                    parts = list(iter_pieces(mf.view[info.begin:info.end], piece_size))
                    cuts[name] = _Cut(weights, identity, info, len(pieces), len(parts))
                    pieces.extend(parts)
                    dtypes.extend([info.dtype] * len(parts))
                # pieces new to the store are tested for NaN/inf while they are written
                ids, n_new, found = _put_pieces(
                    store, pieces, lambda i, piece, kinds=dtypes: has_nonfinite(piece, kinds[i]))
            finally:
                for piece in pieces:
                    piece.release()
            for name in infos:
                cut = cuts[name]
                cut.ids = ids[cut.start:cut.start + cut.count]
                cut.found = found[cut.start:cut.start + cut.count]
            new += n_new
            total += len(ids)
    tensors = {name: TensorRecord(cut.info.dtype, cut.info.shape, tuple(cut.ids))
               for name, cut in cuts.items()}
    return _finish(store, path, piece_size, tensors, info_meta, new, total,
                   lambda: _first_nonfinite(cuts, piece_size))


def _kept_files(store: LocalStore, path: Path, piece_size: int) -> tuple[dict[str, FileRecord], int, int]:
    """The config and tokenizer files of a model folder stored; their records, how many
    pieces were new and how many there are."""
    files: dict[str, FileRecord] = {}
    new = total = 0
    if path.is_dir():
        for name in KEPT_FILES:
            f = path / name
            if f.is_file():
                data = memoryview(f.read_bytes())
                ids, n_new = _put_bytes(store, data, piece_size)
                files[name] = FileRecord(len(data), tuple(ids))
                new += n_new
                total += len(ids)
    return files, new, total


def _finish(store: LocalStore, path: Path, piece_size: int, tensors: dict[str, TensorRecord],
            meta: dict[str, Any], new: int, total: int,
            first_bad: Callable[[], str | None]) -> Imported:
    """Store the kept files and the manifest; cache the manifest's NaN/inf answer."""
    files, n_new, n_total = _kept_files(store, path, piece_size)
    manifest = Manifest(piece_size, dict(sorted(tensors.items())), files, meta)
    mid = ManifestId(store.put(manifest.encode()))
    if not finite_known(store, mid):
        # the plan's NaN/inf policy, cached per manifest; a re-import finds it cached and
        # tests nothing
        remember_finite(store, mid, first_bad())
    return Imported(mid, manifest, str(path), new + n_new, total + n_total)


def _import_bin(store: LocalStore, path: Path, shards: list[Path], piece_size: int,
                meta: dict[str, Any] | None) -> Imported:
    """Import a PyTorch checkpoint: every shard loaded (``weights_only``) and checked
    before a byte is stored, then each tensor's raw bytes cut into pieces exactly as a
    safetensors file's would be."""
    from crdt_merge.store.torch_bin import dtype_name, load_bin, raw_bytes

    loaded: dict[str, Any] = {}
    for shard in shards:
        for name, t in load_bin(shard).items():
            if name in loaded:
                raise ModelImportError(f"{path}: tensor {name!r} appears in two shards")
            loaded[name] = t
    if not loaded:
        raise ModelImportError(f"{path}: the checkpoint holds no tensors")
    info_meta: dict[str, Any] = dict(meta or {})
    model_type = _model_type(path)
    if model_type is not None:
        info_meta.setdefault("model_type", model_type)
    names = sorted(loaded)
    kinds = {name: dtype_name(loaded[name]) for name in names}
    parts: dict[str, list[memoryview]] = {
        name: list(iter_pieces(raw_bytes(loaded[name]), piece_size)) for name in names}
    pieces = [p for name in names for p in parts[name]]
    piece_kinds = [kinds[name] for name in names for _ in parts[name]]
    # pieces new to the store are tested for NaN/inf while they are written (as for
    # safetensors), the ones already held only if the manifest's answer is not cached
    ids, new, found = _put_pieces(
        store, pieces, lambda i, piece: has_nonfinite(piece, piece_kinds[i]))
    tensors: dict[str, TensorRecord] = {}
    flags: dict[str, list[bool | None]] = {}
    at = 0
    for name in names:
        count = len(parts[name])
        shape = tuple(int(d) for d in loaded[name].shape)
        tensors[name] = TensorRecord(kinds[name], shape, tuple(ids[at:at + count]))
        flags[name] = found[at:at + count]
        at += count

    def first_bad() -> str | None:
        for name in names:
            if kinds[name] in FLOAT_DTYPES and any(
                    has_nonfinite(p, kinds[name]) if f is None else f
                    for p, f in zip(parts[name], flags[name], strict=True)):
                return name
        return None

    return _finish(store, path, piece_size, tensors, info_meta, new, len(ids), first_bad)


def import_adapter(store: LocalStore, source: str, piece_size: int,
                   base: Manifest | None) -> Imported:
    """Import a PEFT LoRA folder as an adapter manifest (:mod:`crdt_merge.store.adapter`):
    its factors as tensors, ``adapter_config.json`` as a file, its table in ``meta``.
    Everything is checked (the config, the tensors, and against ``base`` when given)
    before a byte is stored.

    Raises:
        ModelImportError: not a PEFT folder, a refused PEFT feature (named), or a base whose
            tensors do not match the adapter's target shapes.
    """
    from crdt_merge.store import adapter as ad

    path = resolve_source(source)
    if not ad.is_peft_folder(path):
        raise ModelImportError(f"{path}: not a PEFT adapter folder (no {ad.CONFIG_NAME})")
    config = ad.read_config(path, (path / ad.CONFIG_NAME).read_bytes())
    weights = next((path / n for n in ad.WEIGHT_NAMES if (path / n).is_file()), None)
    if weights is None:
        raise ModelImportError(f"{path}: no {' or '.join(ad.WEIGHT_NAMES)}")
    others = sorted(p.name for p in path.glob("*.safetensors")) + sorted(p.name for p in path.glob("*.bin"))
    if others != [weights.name]:
        raise ModelImportError(f"{path}: expected one adapter weight file, found {others}")
    if weights.suffix == ".safetensors":
        shapes = {n: (i.dtype, tuple(i.shape)) for n, i in read_header(weights)[0].items()}
    else:
        from crdt_merge.store.torch_bin import dtype_name, load_bin
        shapes = {n: (dtype_name(t), tuple(int(d) for d in t.shape))
                  for n, t in load_bin(weights).items()}
    meta = ad.build_table(path, config, shapes)
    probe = Manifest(piece_size, {n: TensorRecord(d, s, ()) for n, (d, s) in shapes.items()},
                     {}, meta)
    try:
        ad.adapter_table(probe, base)
    except ModelImportError as exc:
        raise ModelImportError(f"{path}: {exc.detail}") from None
    return import_model(store, str(path), piece_size, meta)


def read_file(store: LocalStore, record: FileRecord) -> bytes:
    """The bytes of a file record (pieces joined, each verified)."""
    data = b"".join(store.get(p) for p in record.pieces)
    if len(data) != record.size:
        raise PieceMissing(record.pieces[-1] if record.pieces else "")
    return data
