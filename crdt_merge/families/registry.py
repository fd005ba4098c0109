"""Load and validate the family data files in ``data/*.json`` (format: specs/families.md).

A file may ``extend`` another: it inherits every field except ``model_types``,
``architectures`` and ``lm_architectures``; its ``body``, ``head``, ``aliases``, ``ties`` and
``classes`` entries are laid over the parent's, and an entry set to ``null`` removes the parent's.
Loading happens on first use, never on import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from crdt_merge.families.canonical import CLASS_ATTRIBUTES, REQUIRED_CLASSES, parse_name
from crdt_merge.families.fused import OPS, REST

_MERGED = ("body", "head", "aliases", "ties", "classes")
_FIELDS = frozenset(
    {"family", "extends", "description", "model_types", "architectures", "lm_architectures",
     "stacks", "prefixes",
     "requires", "tie_config", "tie_default", *_MERGED}
)
_OWN = ("model_types", "architectures", "lm_architectures")  # never inherited
_CLASS_KEYS = frozenset({"config", "default", "map", "format", "derive"})
DERIVATIONS = frozenset({"gemma_attn_scale"})


class FamilyDataError(ValueError):
    """A family data file is malformed: a bug in this package's data, not in a model."""


@dataclass(frozen=True)
class FamilySpec:
    """One family's validated data, with ``extends`` already resolved."""

    name: str
    description: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    lm_architectures: frozenset[str]
    stacks: dict[str, list[str]]
    prefixes: tuple[str, ...]
    body: dict[str, Any]
    head: dict[str, Any]
    aliases: dict[str, str]
    ties: dict[str, str]
    tie_config: str
    tie_default: bool
    requires: tuple[str, ...]
    classes: dict[str, Any]


def _read_raw() -> dict[str, dict[str, Any]]:
    raw: dict[str, dict[str, Any]] = {}
    folder = resources.files("crdt_merge.families").joinpath("data")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text(encoding="utf-8"))
        name = data.get("family")
        if name != entry.name[: -len(".json")]:
            raise FamilyDataError(f"{entry.name}: 'family' must be the file's stem, got {name!r}")
        unknown = set(data) - _FIELDS
        if unknown:
            raise FamilyDataError(f"{entry.name}: unknown fields {sorted(unknown)}")
        raw[name] = data
    return raw


def _resolve(name: str, raw: dict[str, dict[str, Any]], seen: tuple[str, ...] = ()) -> dict:
    if name in seen:
        raise FamilyDataError(f"families extend each other in a cycle: {' -> '.join(seen)}")
    data = raw[name]
    parent_name = data.get("extends")
    if parent_name is None:
        return dict(data)
    if parent_name not in raw:
        raise FamilyDataError(f"{name} extends unknown family {parent_name!r}")
    parent = _resolve(parent_name, raw, (*seen, name))
    merged = {k: v for k, v in parent.items() if k not in _OWN}
    for key, value in data.items():
        if key in _MERGED:
            layered = dict(parent.get(key, {}))
            for entry, entry_value in value.items():
                if entry_value is None:
                    layered.pop(entry, None)
                else:
                    layered[entry] = entry_value
            merged[key] = layered
        else:
            merged[key] = value
    return merged


def _check_canonical(family: str, template: str) -> None:
    try:
        key = parse_name(template.replace("{i}", "0"))
    except ValueError as exc:
        raise FamilyDataError(f"{family}: {exc}") from None
    if (key.layer is None) == ("{i}" in template):
        raise FamilyDataError(f"{family}: {template!r} must use {{i}} exactly where a layer is")


def _check_rules(family: str, rules: dict[str, Any]) -> None:
    for native, target in rules.items():
        if isinstance(target, str):
            _check_canonical(family, target)
            if ("{i}" in native) != ("{i}" in target):
                raise FamilyDataError(f"{family}: {native!r} and {target!r} disagree on {{i}}")
            continue
        if not isinstance(target, dict) or target.get("op") not in OPS or not target.get("into"):
            raise FamilyDataError(f"{family}: {native!r} needs a string or an op in {OPS}")
        for part in target["into"]:
            _check_canonical(family, part)
            if ("{i}" in native) != ("{i}" in part):
                raise FamilyDataError(f"{family}: {native!r} and {part!r} disagree on {{i}}")
        sizes = target.get("sizes")
        if target["op"] == "rows" and (sizes is None or len(sizes) != len(target["into"])):
            raise FamilyDataError(f"{family}: rows op of {native!r} needs one size per part")
        if sizes is not None and sum(1 for s in sizes if s == REST) > 1:
            raise FamilyDataError(f"{family}: {native!r} has more than one '*' size")
        if target["op"] == "heads" and "heads" not in target:
            raise FamilyDataError(f"{family}: heads op of {native!r} needs 'heads'")


def _validate(data: dict[str, Any]) -> FamilySpec:
    name = data["family"]
    for key in ("model_types", "stacks", "prefixes", "body", "classes"):
        if not data.get(key) and key != "prefixes":
            raise FamilyDataError(f"{name}: '{key}' is required")
    _check_rules(name, data["body"])
    _check_rules(name, data.get("head", {}))
    for target in (*data.get("aliases", {}).values(), *data.get("ties", {}).keys(),
                   *data.get("ties", {}).values()):
        _check_canonical(name, target)
    for required in data.get("requires", []):
        try:
            parse_name(required)
        except ValueError as exc:
            raise FamilyDataError(f"{name}: requires {exc}") from None
    classes = data["classes"]
    unknown = set(classes) - CLASS_ATTRIBUTES
    missing = set(REQUIRED_CLASSES) - set(classes)
    if unknown or missing:
        raise FamilyDataError(f"{name}: classes unknown {sorted(unknown)}, missing {sorted(missing)}")
    for attr, spec in classes.items():
        if isinstance(spec, dict):
            if set(spec) - _CLASS_KEYS or ("config" in spec) == ("derive" in spec):
                raise FamilyDataError(f"{name}: class {attr} must have 'config' or 'derive'")
            if "derive" in spec and spec["derive"] not in DERIVATIONS:
                raise FamilyDataError(f"{name}: class {attr} has unknown derive {spec['derive']!r}")
        elif not isinstance(spec, (str, bool)):
            raise FamilyDataError(f"{name}: class {attr} must be a string, a boolean or an object")
    if set(data.get("lm_architectures", ())) - set(data.get("architectures", ())):
        raise FamilyDataError(f"{name}: lm_architectures must be among architectures")
    stacks = {stack: [keys] if isinstance(keys, str) else list(keys)
              for stack, keys in data["stacks"].items()}
    return FamilySpec(
        name=name,
        description=data.get("description", ""),
        model_types=tuple(data["model_types"]),
        architectures=tuple(data.get("architectures", ())),
        lm_architectures=frozenset(data.get("lm_architectures", ())),
        stacks=stacks,
        prefixes=tuple(data.get("prefixes", [""])),
        body=dict(data["body"]),
        head=dict(data.get("head", {})),
        aliases=dict(data.get("aliases", {})),
        ties=dict(data.get("ties", {})),
        tie_config=data.get("tie_config", "tie_word_embeddings"),
        tie_default=bool(data.get("tie_default", False)),
        requires=tuple(data.get("requires", ())),
        classes=dict(classes),
    )


@cache
def specs() -> dict[str, FamilySpec]:
    """Every family's validated data, by family name.

    Raises:
        FamilyDataError: a data file is malformed, or two families claim one model_type or
            architecture.
    """
    raw = _read_raw()
    out = {name: _validate(_resolve(name, raw)) for name in sorted(raw)}
    owners: dict[str, str] = {}
    for spec in out.values():
        for claim in (*spec.model_types, *(f"arch:{a}" for a in spec.architectures)):
            if claim in owners:
                raise FamilyDataError(f"{claim} is claimed by {owners[claim]} and {spec.name}")
            owners[claim] = spec.name
    return out
