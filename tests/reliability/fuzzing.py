"""What the reliability fuzz tests share: example budgets, a count of the cases each target
ran, Hypothesis strategies for msgpack values and for damaged bytes, and replica snapshots.

Budgets are small by default (the whole default test run stays fast) and scale with
``CRDT_MERGE_FUZZ_SCALE`` (a float, default 1). Runs are derandomized by default, so CI sees
the same cases every time; ``CRDT_MERGE_FUZZ_RANDOM=1`` draws fresh ones. With
``CRDT_MERGE_FUZZ_REPORT=FILE`` the number of cases each target ran is written to FILE as
JSON when the test process exits (docs/reliability.md quotes such a run).
"""

from __future__ import annotations

import atexit
import json
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

SCALE = float(os.environ.get("CRDT_MERGE_FUZZ_SCALE", "1") or 1)
RANDOM = os.environ.get("CRDT_MERGE_FUZZ_RANDOM", "") not in ("", "0")
REPORT = os.environ.get("CRDT_MERGE_FUZZ_REPORT", "")

#: cases run per fuzz target in this process, and how they ended (HTTP statuses, or
#: "accepted"/"refused" for decoders and imports)
COUNTS: Counter[str] = Counter()
OUTCOMES: dict[str, Counter[str]] = {}


def budget(n: int) -> int:
    """``n`` examples, scaled by CRDT_MERGE_FUZZ_SCALE."""
    return max(1, round(n * SCALE))


def fuzz_settings(n: int, shrink: bool = True) -> settings:
    """Settings for a fuzz target of ``n`` examples (scaled). ``shrink=False`` for targets
    whose examples are slow (a failure is then reported as found, not minimized)."""
    phases = list(Phase) if shrink else [Phase.explicit, Phase.generate]
    return settings(max_examples=budget(n), deadline=None, database=None,
                    derandomize=not RANDOM, print_blob=True, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def count(target: str, outcome: int | str | None = None) -> None:
    """One case of ``target`` ran (and ended in ``outcome``, if given)."""
    COUNTS[target] += 1
    if outcome is not None:
        note(target, outcome)


def note(target: str, outcome: int | str) -> None:
    """How a case of ``target`` ended (counted once by :func:`count`)."""
    OUTCOMES.setdefault(target, Counter())[str(outcome)] += 1


def _write_report() -> None:
    if REPORT and COUNTS:
        path = Path(REPORT)
        old = json.loads(path.read_text()) if path.is_file() else {}
        old.setdefault("cases", {}).update(COUNTS)
        for target, outcomes in OUTCOMES.items():
            old.setdefault("outcomes", {})[target] = dict(sorted(outcomes.items()))
        path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")


atexit.register(_write_report)


# -- msgpack values ---------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.integers(-40, 300)
           | st.text(max_size=24) | st.binary(max_size=40))


def values(leaves: st.SearchStrategy[Any] = scalars, max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Canonical-msgpack-able values: nil, bools, 64-bit ints, str, bytes, lists, str-keyed maps."""
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5),
        max_leaves=max_leaves)


#: values canonical msgpack refuses: floats, non-str keys, extension types
odd_scalars = (st.floats(allow_nan=True)
               | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
               | st.builds(msgpack.Timestamp, st.integers(0, 2**34), st.integers(0, 999_999_999)))
loose_values = st.recursive(
    scalars | odd_scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5) | st.binary(max_size=4),
                      inner, max_size=5),
    max_leaves=15)


@st.composite
def loose_encoding(draw: st.DrawFn) -> bytes:
    """Any msgpack a careless or hostile encoder might write (floats, str bytes, odd keys)."""
    value = draw(loose_values)
    return msgpack.packb(value, use_bin_type=draw(st.booleans()), strict_types=False)


INTERESTING = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4,
               0xC5, 0xC6, 0xC7, 0xCA, 0xCB, 0xCC, 0xCF, 0xD3, 0xD4, 0xD9, 0xDB, 0xDC, 0xDD,
               0xDE, 0xDF, 0xE0, 0xFF]


@st.composite
def mutated(draw: st.DrawFn, data: bytes, max_steps: int = 3) -> bytes:
    """``data`` damaged 1-``max_steps`` times: bit flips, truncations, extensions, inserted,
    deleted or replaced bytes, and huge length prefixes (msgpack type bytes included)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_steps))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "insert", "delete",
                                     "replace", "huge"]))
        pos = draw(st.integers(0, max(0, len(out) - 1)))
        if kind == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del out[draw(st.integers(0, len(out))):]
        elif kind == "extend":
            out += draw(st.binary(min_size=1, max_size=16))
        elif kind == "insert":
            out[pos:pos] = bytes([draw(st.sampled_from(INTERESTING) | st.integers(0, 255))])
        elif kind == "delete" and out:
            del out[pos:pos + draw(st.integers(1, 8))]
        elif kind == "replace" and out:
            out[pos] = draw(st.sampled_from(INTERESTING))
        elif kind == "huge":  # a container or string header claiming 2^32-1 items or bytes
            out[pos:pos] = bytes([draw(st.sampled_from([0xC6, 0xDB, 0xDD, 0xDF]))]) + b"\xff" * 4
    return bytes(out)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*path, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*path, i)))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(value[head], rest, new)
    return copy


def _drop(value: Any, path: tuple[Any, ...]) -> Any:
    head, rest = path[0], path[1:]
    if rest:
        copy: Any = dict(value) if isinstance(value, dict) else list(value)
        copy[head] = _drop(value[head], rest)
        return copy
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != head}
    return [v for i, v in enumerate(value) if i != head]


@st.composite
def edited(draw: st.DrawFn, value: Any, replacements: st.SearchStrategy[Any] | None = None,
           max_steps: int = 2) -> Any:
    """``value`` (a decoded msgpack value) with 1-``max_steps`` structural edits: a sub-value
    replaced by another value (often of another type), a map entry or list item removed,
    an entry added."""
    replacements = replacements if replacements is not None else values(max_leaves=6)
    for _ in range(draw(st.integers(1, max_steps))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["replace", "drop", "add"]))
        if kind == "drop" and path:
            value = _drop(value, path)
        elif kind == "add":
            containers = [p for p in paths if isinstance(_get(value, p), (dict, list))]
            if not containers:
                continue
            where = draw(st.sampled_from(containers))
            target = _get(value, where)
            new = draw(replacements)
            if isinstance(target, dict):
                value = _replace(value, where, {**target, draw(st.text(max_size=8)): new})
            else:
                value = _replace(value, where, [*target, new])
        else:
            value = _replace(value, path, draw(replacements))
    return value


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        value = value[p]
    return value


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


# -- replicas ---------------------------------------------------------------------------------


def snapshot(replica: Any) -> dict[str, Any]:
    """Everything a request or an import could leave behind: committed ops, the state root,
    indexed objects, staged ops, and the files under objects/, tmp/ and quarantine/."""
    path = Path(replica.path)
    files = sorted(str(p.relative_to(path)) for name in ("objects", "tmp", "quarantine")
                   if (path / name).is_dir() for p in (path / name).rglob("*"))
    return {"root": replica.state_root(), "ops": replica.op_ids(),
            "objects": replica.store.object_ids(), "staged": replica.store.staged_rows(),
            "files": files}


def restore(replica: Any, before: dict[str, Any]) -> None:
    """Undo what happened to ``replica`` since the ``before`` snapshot was taken, as far as
    objects and files go (so every fuzz case starts from the same replica, and a case that
    fails fails again when Hypothesis replays it)."""
    new = set(replica.store.object_ids()) - set(before["objects"])
    replica.store.delete_objects(sorted(new))
    path = Path(replica.path)
    for rel in sorted(set(snapshot(replica)["files"]) - set(before["files"]), reverse=True):
        p = path / rel
        if p.is_dir():
            p.rmdir()
        elif p.exists():
            p.unlink()
