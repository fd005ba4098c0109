"""A sharded checkpoint's index (``*.index.json``): the shard files it names, checked."""

from __future__ import annotations

import json
from pathlib import Path

from crdt_merge.errors import ModelImportError


def indexed_shards(path: Path, index: Path) -> list[Path]:
    """The shard files ``index`` maps weights to, sorted, each a plain file name that
    exists in the folder ``path``.

    Raises:
        ModelImportError: the index is malformed, names a path, or names a missing file.
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    # ValueError: not JSON or not UTF-8, or a number too long to read; RecursionError:
    # nesting too deep
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise ModelImportError(f"{index}: malformed shard index ({exc})") from None
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise ModelImportError(f"{index}: shard name {shard!r} is not a plain file name")
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise ModelImportError(f"{path}: shards named by the index are missing: {missing}")
    return [path / s for s in shards]
