"""A model family: native tensor names <-> canonical names, and its compatibility classes.

A :class:`Family` is built from its validated data (:mod:`crdt_merge.families.registry`).
Native templates are literal names with ``{i}`` for the layer index; body templates are
read under one of the family's prefixes (``model.`` for a ``*ForCausalLM`` checkpoint,
empty for a bare ``*Model``), head templates as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

from crdt_merge.errors import ModelImportError, PlanError
from crdt_merge.families import fused
from crdt_merge.families.canonical import (
    ACTIVATION_ALIASES,
    CLASS_DEFAULTS,
    ROLE_ATTRIBUTES,
    CanonicalModel,
    ClassValue,
    decimal,
    role_of,
)
from crdt_merge.families.registry import FamilySpec

_INDEX = r"(0|[1-9][0-9]*)"
_MISSING = object()

# Dimensions every family understands, with the config keys that spell them.
_DIM_KEYS = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim", "d_kv"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
}


def config_value(config: Mapping[str, Any], keys: Iterable[str]) -> Any:
    """The first non-null value among ``keys`` (``a.b`` looks into nested objects)."""
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is not _MISSING and node is not None:
            return node
    return _MISSING


class Dims(dict):
    """Model dimensions from the config; a missing one is a ModelImportError naming it."""

    def __missing__(self, key: str) -> int:
        raise ModelImportError(
            f"config.json lacks the dimension {key!r} this family needs to split fused tensors"
        )


@dataclass(frozen=True)
class Rule:
    """One native template and the canonical name(s) it maps to."""

    native: str
    into: tuple[str, ...]
    op: Mapping[str, Any] | None
    head: bool

    def pattern(self, prefix: str) -> re.Pattern[str]:
        full = self.native if self.head else prefix + self.native
        return re.compile(_INDEX.join(re.escape(p) for p in full.split("{i}")) + r"\Z")

    def native_name(self, prefix: str, layer: str | None) -> str:
        full = self.native if self.head else prefix + self.native
        return full if layer is None else full.replace("{i}", layer)

    def canonical_names(self, layer: str | None) -> list[str]:
        return [t if layer is None else t.replace("{i}", layer) for t in self.into]


@dataclass
class NameMap:
    """How a list of native names maps, before any tensor is read."""

    prefix: str
    matched: dict[str, tuple[Rule, str | None]]  # native name -> (rule, layer)
    aliases: dict[str, str]  # native name -> canonical name
    unmapped: list[str]

    def canonical(self) -> set[str]:
        return {c for rule, layer in self.matched.values() for c in rule.canonical_names(layer)}


class Family:
    """A model family: detection data, the name mapping both ways, compatibility classes."""

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.rules = [_rule(n, t, head=False) for n, t in spec.body.items()]
        self.rules += [_rule(n, t, head=True) for n, t in spec.head.items()]
        self._patterns: dict[str, list[tuple[Rule, re.Pattern[str]]]] = {}

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    # -- config-derived facts ----------------------------------------------------------------

    def dims(self, config: Mapping[str, Any]) -> Dims:
        """The dimensions fused ops need (hidden, heads, kv_heads, head_dim, q_size...)."""
        dims = Dims()
        for dim, keys in _DIM_KEYS.items():
            value = config_value(config, keys)
            if isinstance(value, int) and not isinstance(value, bool):
                dims[dim] = value
        if "heads" in dims:
            dims.setdefault("kv_heads", dims["heads"])
            if "hidden" in dims and "head_dim" not in dims:
                dims["head_dim"] = dims["hidden"] // dims["heads"]
        if "head_dim" in dims and "heads" in dims:
            dims["q_size"] = dims["heads"] * dims["head_dim"]
            dims["kv_size"] = dims["kv_heads"] * dims["head_dim"]
            dims["qkv_size"] = dims["q_size"] + 2 * dims["kv_size"]
        pad = config.get("pad_token_id")
        if isinstance(pad, int) and not isinstance(pad, bool):
            dims["pad_offset"] = pad + 1
        return dims

    def layers(self, config: Mapping[str, Any]) -> dict[str, int]:
        """Stack -> number of layers (a stack whose count the config lacks is left out)."""
        out = {}
        for stack, keys in self.spec.stacks.items():
            value = config_value(config, keys)
            if isinstance(value, int):
                out[stack] = value
        return out

    def tied(self, config: Mapping[str, Any]) -> bool:
        """Whether the config ties the LM head to the input embedding."""
        tied = config_value(config, [self.spec.tie_config])
        return self.spec.tie_default if tied is _MISSING else bool(tied)

    def has_lm_head(self, config: Mapping[str, Any]) -> bool:
        """Whether the config's ``architectures`` name a class with an LM head: only then
        does an absent ``lm_head`` mean a tied one (a bare ``*Model`` has none)."""
        architectures = config.get("architectures") or []
        return any(a in self.spec.lm_architectures for a in architectures)

    def attributes(self, config: Mapping[str, Any]) -> dict[str, ClassValue]:
        """Every compatibility attribute's value for this config.

        Raises:
            ModelImportError: the config holds a value the family's data does not know.
        """
        out: dict[str, ClassValue] = {}
        for attr in sorted({*CLASS_DEFAULTS, *self.spec.classes}):
            spec = self.spec.classes.get(attr, CLASS_DEFAULTS.get(attr))
            out[attr] = self._evaluate(attr, spec, config)
        activation = out["activation"]
        if isinstance(activation, str):
            out["activation"] = ACTIVATION_ALIASES.get(activation, activation)
        return out

    def classes(self, config: Mapping[str, Any], roles: Iterable[str]) -> dict[str, dict]:
        """Role -> compatibility class, for the given roles."""
        attrs = self.attributes(config)
        return {role: {a: attrs[a] for a in ROLE_ATTRIBUTES[role]} for role in sorted(set(roles))}

    def _evaluate(self, attr: str, spec: Any, config: Mapping[str, Any]) -> ClassValue:
        if isinstance(spec, (str, bool)):
            return spec
        if "derive" in spec:
            return _derive(spec["derive"], config, self.dims(config))
        keys = [spec["config"]] if isinstance(spec["config"], str) else spec["config"]
        raw = config_value(config, keys)
        if raw is _MISSING:
            if "default" not in spec:
                raise ModelImportError(
                    f"config.json lacks {' or '.join(keys)}, which {self.name} needs for {attr}"
                )
            raw = spec["default"]
        spelled = _spelled(raw)
        if spelled in spec.get("map", {}):
            return spec["map"][spelled]
        if "format" in spec:
            return spec["format"].replace("{}", spelled)
        if "map" in spec:
            raise ModelImportError(
                f"{self.name}: config {keys[0]}={raw!r} is not a value this family knows "
                f"for {attr} (known: {', '.join(sorted(spec['map']))})"
            )
        return raw if isinstance(raw, bool) else spelled

    # -- names -------------------------------------------------------------------------------

    def match_names(self, names: Iterable[str]) -> NameMap:
        """Map native names without reading tensors.

        Raises:
            ModelImportError: the names sit under two of the family's prefixes at once.
        """
        names = sorted(names)
        best: NameMap | None = None
        used = []
        for prefix in self.spec.prefixes:
            candidate = self._match(names, prefix)
            body = sum(1 for rule, _ in candidate.matched.values() if not rule.head)
            if body:
                used.append(prefix)
                if best is None:
                    best = candidate
        if len(used) > 1:
            shown = ", ".join(repr(p) for p in used)
            raise ModelImportError(f"{self.name}: tensors sit under several prefixes ({shown})")
        return best or self._match(names, self.spec.prefixes[0])

    def _match(self, names: list[str], prefix: str) -> NameMap:
        if prefix not in self._patterns:
            self._patterns[prefix] = [(rule, rule.pattern(prefix)) for rule in self.rules]
        patterns = self._patterns[prefix]
        alias_names = self.spec.aliases  # full native names, no prefix
        matched: dict[str, tuple[Rule, str | None]] = {}
        aliases: dict[str, str] = {}
        unmapped = []
        for name in names:
            if name in alias_names:
                aliases[name] = alias_names[name]
                continue
            for rule, pattern in patterns:
                m = pattern.match(name)
                if m:
                    matched[name] = (rule, m.group(1) if m.groups() else None)
                    break
            else:
                unmapped.append(name)
        return NameMap(prefix, matched, aliases, unmapped)

    # -- the two directions ------------------------------------------------------------------

    def to_canonical(self, tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> CanonicalModel:
        """The model under canonical names, with its classes, ties, aliases and leftovers.

        Plain tensors are passed through as the same objects; split ones are new tensors.

        Raises:
            ModelImportError: a fused tensor does not fit the config, or two native tensors
                claim one canonical name.
        """
        names = self.match_names(tensors)
        dims = self.dims(config)
        out: dict[str, Tensor] = {}
        native_names: dict[str, str] = {}
        for native, (rule, layer) in sorted(names.matched.items()):
            tensor = tensors[native]
            parts = [tensor] if rule.op is None else fused.split(rule.op, native, tensor, dims)
            for canonical, part in zip(rule.canonical_names(layer), parts, strict=True):
                if canonical in out:
                    raise ModelImportError(
                        f"{native} and {native_names[canonical]} both map to {canonical}"
                    )
                out[canonical] = part
                native_names[canonical] = native
        unmapped = {n: tensors[n] for n in names.unmapped}
        aliases = {}
        for native, canonical in sorted(names.aliases.items()):
            if canonical in out and fused.same_bits(tensors[native], out[canonical]):
                aliases[native] = canonical
            else:
                unmapped[native] = tensors[native]
        ties = {}
        if self.has_lm_head(config) and self.tied(config):
            ties = {a: b for a, b in self.spec.ties.items() if a not in out and b in out}
        roles = {role_of(n) for n in (*out, *ties)}
        return CanonicalModel(
            family=self.name,
            tensors=out,
            classes=self.classes(config, roles),
            unmapped=dict(sorted(unmapped.items())),
            ties=ties,
            aliases=aliases,
            native_names=native_names,
            prefix=names.prefix,
            layers=self.layers(config),
            config=dict(config),
        )

    def from_canonical(
        self, model: CanonicalModel, config: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """Native tensors from a canonical model: fused tensors re-fused, transposes undone,
        unmapped tensors and aliases put back; tied names stay absent, as they came.

        ``config`` defaults to the model's own; a merge output passes the output config.

        Raises:
            PlanError: a canonical name has no native place in this family, or a fused
                tensor lacks one of its parts.
            ShapeMismatch: the parts of a fused tensor do not fit together.
        """
        dims = self.dims(model.config if config is None else config)
        groups: dict[str, tuple[Rule, str | None]] = {}
        for canonical in model.tensors:
            native = model.native_names.get(canonical) or self._default_native(canonical, model.prefix)
            if native not in groups:
                match = self._match([native], model.prefix).matched.get(native)
                if match is None:
                    raise PlanError(f"{self.name} has no native tensor named {native}")
                groups[native] = match
        out: dict[str, Tensor] = {}
        for native, (rule, layer) in sorted(groups.items()):
            names = rule.canonical_names(layer)
            missing = [n for n in names if n not in model.tensors]
            if missing:
                raise PlanError(f"cannot rebuild {native}: the canonical model lacks {missing}")
            parts = [model.tensors[n] for n in names]
            out[native] = parts[0] if rule.op is None else fused.join(rule.op, native, parts, dims)
        for native, tensor in model.unmapped.items():
            if native in out:
                raise PlanError(f"unmapped tensor {native} collides with a mapped one")
            out[native] = tensor
        for native, canonical in model.aliases.items():
            out[native] = model.get(canonical).clone()
        return dict(sorted(out.items()))

    def _default_native(self, canonical: str, prefix: str) -> str:
        for rule in self.rules:
            for template in rule.into:
                pattern = _INDEX.join(re.escape(p) for p in template.split("{i}")) + r"\Z"
                m = re.match(pattern, canonical)
                if m:
                    return rule.native_name(prefix, m.group(1) if m.groups() else None)
        raise PlanError(f"{self.name} has no native place for the canonical tensor {canonical}")

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for ``crdt-merge families list``."""
        return {
            "family": self.name,
            "description": self.spec.description,
            "model_types": list(self.spec.model_types),
            "architectures": list(self.spec.architectures),
            "stacks": sorted(self.spec.stacks),
            "ops": {r.native: r.op["op"] for r in sorted(self.rules, key=lambda r: r.native) if r.op},
        }


def _rule(native: str, target: Any, *, head: bool) -> Rule:
    if isinstance(target, str):
        return Rule(native, (target,), None, head)
    return Rule(native, tuple(target["into"]), target, head)


def _spelled(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return decimal(value)
    return str(value)


def _derive(how: str, config: Mapping[str, Any], dims: Dims) -> ClassValue:
    if how == "gemma_attn_scale":
        # Gemma 2/3 scale queries by query_pre_attn_scalar^-0.5, the usual scale when it is
        # the head dimension.
        scalar = config_value(config, ["query_pre_attn_scalar"])
        if scalar is _MISSING or scalar == dims["head_dim"]:
            return "inv_sqrt_head_dim"
        return f"inv_sqrt({decimal(scalar)})"
    raise ValueError(f"unknown derivation {how!r}")
