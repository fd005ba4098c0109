"""PyTorch checkpoints (``pytorch_model.bin``, sharded with ``pytorch_model.bin.index.json``)
read as raw tensor bytes, the same bytes a safetensors file of the same weights holds.

A ``.bin`` is a pickle. It is read with ``torch.load(weights_only=True)``, whose unpickler
only builds tensors, plain containers and numbers: a file that names any other class or
function (``os.system``, a model class, a numpy object...) is refused before anything in it
runs. The file must hold a flat map of tensor names to tensors; a tensor is stored as its
row-major little-endian bytes, so the same weights give the same pieces (and the same
manifest id) whether they came from a ``.bin`` or a ``.safetensors`` file.
"""

from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

from crdt_merge.dtypes import FROM_TORCH
from crdt_merge.errors import ModelImportError
from crdt_merge.lazy import torch
from crdt_merge.store.shards import indexed_shards

BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"

_DTYPES = FROM_TORCH  # the one table: crdt_merge/dtypes.py


def bin_files(path: Path) -> list[Path] | None:
    """The ``.bin`` weight files of a folder (or the file itself), or None when ``path`` is
    not a PyTorch checkpoint. A folder that holds safetensors weights is not one (they win,
    as in transformers).

    Raises:
        ModelImportError: a malformed shard index, or shards it names are missing.
    """
    if path.is_file():
        return [path] if path.suffix == ".bin" else None
    if not path.is_dir() or any(path.glob("*.safetensors")) or (
            path / "model.safetensors.index.json").exists():
        return None
    index = path / BIN_INDEX_NAME
    if index.is_file():
        return indexed_shards(path, index)
    if (path / BIN_NAME).is_file():
        return [path / BIN_NAME]
    found = sorted(path.glob("*.bin"))
    return found or None


def load_bin(path: Path) -> dict[str, Any]:
    """The tensors of one ``.bin`` file, by name (memory-mapped when the file is in the
    zip format torch has written since 1.6).

    Raises:
        ModelImportError: the file holds anything but tensors (refused unexecuted), is not a
            flat map of names to tensors, or is unreadable.
    """
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols it did not write
            warnings.simplefilter("ignore")
            try:
                value = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                value = torch.load(path, map_location="cpu", weights_only=True)  # legacy
    except pickle.UnpicklingError as exc:
        text = str(exc)
        why = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
        raise ModelImportError(f"{path}: not a checkpoint of tensors only; refused without "
                               f"running it (weights_only: {(why[0] if why else text)[:300]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise ModelImportError(f"{path}: not a readable PyTorch checkpoint "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(value, dict):
        raise ModelImportError(f"{path}: holds a {type(value).__name__}, not a map of tensor "
                               "names to tensors (a state_dict)")
    for name, t in value.items():
        if not isinstance(name, str) or not name:
            raise ModelImportError(f"{path}: key {name!r} is not a tensor name")
        if not isinstance(t, torch.Tensor):
            raise ModelImportError(f"{path}: {name!r} is a {type(t).__name__}, not a tensor "
                                   "(nested or non-tensor state dicts are not imported)")
        if t.layout != torch.strided or t.is_quantized or t.is_complex():
            raise ModelImportError(f"{path}: tensor {name!r} is sparse, quantized or complex")
        if str(t.dtype).removeprefix("torch.") not in _DTYPES:
            raise ModelImportError(f"{path}: tensor {name!r} has dtype {t.dtype}, which has no "
                                   "safetensors name")
    return value


def dtype_name(t: Any) -> str:
    """The safetensors dtype name of a torch tensor."""
    return _DTYPES[str(t.dtype).removeprefix("torch.")]


def raw_bytes(t: Any) -> memoryview:
    """A tensor's row-major little-endian bytes (no copy when it is contiguous)."""
    if sys.byteorder != "little":  # pragma: no cover - every supported CPU is little-endian
        raise ModelImportError("reading .bin checkpoints needs a little-endian machine")
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
