"""A mergekit merge config (the YAML ``mergekit-yaml`` reads) as a recipe draft.

:func:`load` reads the YAML and :func:`translate` turns it into a :class:`Draft`: the
models to contribute (each with its ``parameters:``), the recipe's method, parameters and
base model, and the slices, every model still named as the YAML names it. Nothing here
reads a model or writes an op: the caller imports the models and authors the ops
(``crdt-merge recipe --from-mergekit``, ``crdt-merge merge``).

What mergekit does, the draft does: ``models:`` entries become contributions; a base model
that a method without a base (karcher, linear...) does not find under ``models:`` is one
more input, as in mergekit; a parameter the method does not use is ignored, as mergekit
ignores it, and named in :attr:`Draft.notes`. With ``slices:`` every model a slice names is
contributed once (without parameters) and each slice's ``parameters:`` are kept.

A mergekit feature not supported yet is refused by name, never ignored: the merge would
silently differ from what the user asked for. The recipe's parameters are checked with
the plan's own check (:func:`crdt_merge.recipe.check_recipe`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crdt_merge.errors import BadParameter, UnsupportedFeature
from crdt_merge.hashing import digest
from crdt_merge.methods import NOT_IN_MERGEKIT, Method, get_method
from crdt_merge.recipe import OUT_DTYPES, canon_numbers, check_recipe, split_params, unused_note

KNOWN_TOP = {"models", "merge_method", "base_model", "parameters", "dtype", "tokenizer_source",
             "slices", "tokenizer", "chat_template", "out_dtype", "name"}


Unsupported = UnsupportedFeature  # defined in crdt_merge.errors, so its code always decodes


@dataclass(frozen=True)
class ModelInput:
    """One model to contribute: ``ref`` as the YAML names it (a folder, a file or an
    ``org/name`` repo id) and its parameters (canonical numbers, unused ones kept: the
    plan ignores them and says so)."""

    ref: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Draft:
    """A mergekit config as the ops to author.

    Attributes:
        method: the registry name of ``merge_method``.
        params: the recipe's parameters (canonical; ``dtype`` included; unused ones left
            out). With slices, ``params["slices"]`` names models by ``ref``.
        base: the ``base_model`` ref (the recipe's anchor), or None.
        models: the models to contribute, in the YAML's order, each once.
        notes: what was ignored, one line each (unused parameters).
    """

    method: str
    params: dict[str, Any]
    base: str | None
    models: tuple[ModelInput, ...]
    notes: tuple[str, ...] = ()

    @property
    def sliced(self) -> bool:
        return "slices" in self.params


def model_ref(entry: Any, where: str) -> str:
    """The model an entry names (``model: path`` or ``model: {model: path}``)."""
    model = entry.get("model") if isinstance(entry, Mapping) else None
    if isinstance(model, Mapping):  # mergekit also accepts {model: {model: path, lora: ...}}
        if model.get("lora"):
            raise Unsupported(f"{where}: LoRA adapters (`lora:`) are not supported yet")
        model = model.get("model")
    if not isinstance(model, str) or not model:
        raise BadParameter(f"{where}: `model:` must name a model folder or repo id")
    if "+" in model:
        raise Unsupported(f"{where}: `{model}` applies a LoRA (`model+lora`); not supported yet")
    return model


def load(path: str | Path, *, own_methods: bool = False) -> Draft:
    """Read a mergekit YAML file and :func:`translate` it (``own_methods``: as there).

    Raises:
        BadParameter: not a mergekit config (missing or malformed fields).
        Unsupported: a mergekit feature not supported yet (the message names it).
    """
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BadParameter(f"{path}: cannot read the mergekit config ({exc})") from None
    return translate(config, str(path), own_methods=own_methods)


def translate(config: Any, where: str = "config", *, own_methods: bool = False) -> Draft:
    """A parsed mergekit config as a :class:`Draft` (see the module docstring).

    ``own_methods``: accept crdt-merge's robust methods (``crdt-merge merge`` reads the
    same YAML and takes every registered method); a mergekit file proper
    (``recipe --from-mergekit``) cannot name them, since mergekit has none.

    Raises:
        BadParameter: malformed fields, an unknown method, a bad parameter value.
        Unsupported: a mergekit feature not supported yet.
    """
    _check_form(config, where)
    if config["merge_method"] in NOT_IN_MERGEKIT and not own_methods:
        raise Unsupported(
            f"{where}: merge_method {config['merge_method']!r} is crdt-merge's own (mergekit has "
            "no such method), so a mergekit config cannot ask for it; use `crdt-merge merge` "
            f"with this file, or `crdt-merge recipe --method {config['merge_method']}`")
    method = get_method(config["merge_method"])
    notes: list[str] = []
    recipe_params = canon_numbers(dict(config.get("parameters") or {}))
    recipe_params = _drop_unused(method, recipe_params, "parameters", notes)
    if config.get("dtype"):
        recipe_params["dtype"] = config["dtype"]
    base = config.get("base_model")
    if isinstance(base, Mapping):
        base = model_ref({"model": base}, "base_model")
    if "slices" in config:
        models, slices = _slices(config["slices"], method, notes)
        recipe_params["slices"] = slices
    else:
        models = []
        for i, entry in enumerate(config["models"]):
            item = ModelInput(model_ref(entry, f"models[{i}]"),
                              canon_numbers(dict(entry.get("parameters") or {})))
            _, unused = split_params(method, item.params)
            if unused:
                notes.append(f"models[{i}] ({item.ref}): {unused_note(method, unused)}")
            models.append(item)
        if base and method.base == "ignored" and base not in [m.ref for m in models]:
            # mergekit merges the base model as one more input of such a method
            models.append(ModelInput(base))
            notes.append(f"base_model {base} is one more input of {method.name} (as in "
                         "mergekit: the method takes no base)")
    _check_params(method, recipe_params, models)
    if method.needs_base and not base:
        raise BadParameter(f"{method.name} needs `base_model:`")
    return Draft(method.name, recipe_params, base, tuple(models), tuple(notes))


def _drop_unused(method: Method, params: dict[str, Any], where: str,
                 notes: list[str]) -> dict[str, Any]:
    known = {p.name for p in method.params}
    unused = sorted(k for k in params if k not in known)
    if unused:
        notes.append(f"{where}: {unused_note(method, unused)}")
    return {k: v for k, v in params.items() if k in known}


def _check_params(method: Method, recipe_params: Mapping[str, Any],
                  models: list[ModelInput]) -> None:
    """The recipe's parameters with the plan's own check; each model named in the slices
    stands in by a placeholder id until it is imported."""
    params = dict(recipe_params)
    if "slices" in params:
        ids = {m.ref: digest(m.ref.encode()) for m in models}
        params["slices"] = [{**s, "sources": [{**src, "model": ids[src["model"]]}
                                              for src in s["sources"]]}
                            for s in params["slices"]]
    check_recipe(method, params)


def _check_form(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        raise BadParameter(f"{where}: a mergekit config is a YAML mapping")
    unknown = sorted(set(config) - KNOWN_TOP)
    if unknown:
        raise Unsupported(f"{where}: unknown or unsupported mergekit field(s): {', '.join(unknown)}")
    if ("slices" in config) == ("models" in config):
        raise BadParameter(f"{where}: give exactly one of `models:` and `slices:` (as mergekit "
                           "requires)")
    for name in ("chat_template", "out_dtype"):
        if name in config:
            raise Unsupported(f"{where}: `{name}:` is not supported yet")
    tokenizer = config.get("tokenizer_source", "base")
    if "tokenizer" in config:
        tok = config["tokenizer"]
        tokenizer = tok.get("source", "base") if isinstance(tok, Mapping) else tok
        if isinstance(tok, Mapping) and set(tok) - {"source"}:
            raise Unsupported(f"{where}: `tokenizer:` options {sorted(set(tok) - {'source'})} "
                              "are not supported yet")
    if tokenizer not in ("base", None):
        raise Unsupported(f"{where}: tokenizer source {tokenizer!r} is not supported yet; only "
                          "`base` (the base model's vocabulary) is")
    if not isinstance(config.get("merge_method"), str):
        raise BadParameter(f"{where}: `merge_method:` is required")
    if "models" in config:
        models = config.get("models")
        if not isinstance(models, list) or not models:
            raise BadParameter(f"{where}: `models:` must list at least one model")
        for i, entry in enumerate(models):
            model_ref(entry, f"models[{i}]")
            extra = set(entry) - {"model", "parameters"}
            if extra:
                raise Unsupported(f"models[{i}]: unsupported field(s) {sorted(extra)}")
            if entry.get("parameters") is not None and not isinstance(entry["parameters"], Mapping):
                raise BadParameter(f"models[{i}]: `parameters:` must be a mapping")
    if config.get("parameters") is not None and not isinstance(config["parameters"], Mapping):
        raise BadParameter(f"{where}: `parameters:` must be a mapping")
    dtype = config.get("dtype")
    if dtype is not None and dtype not in OUT_DTYPES:
        raise BadParameter(f"{where}: dtype {dtype!r}: use one of {sorted(OUT_DTYPES)}")


def _slices(slices: Any, method: Method, notes: list[str]) -> tuple[list[ModelInput], list[dict]]:
    """The models a ``slices:`` config names (each once, in order of first appearance) and
    the slices in recipe form (models by ref); refuse what is not supported yet."""
    if not isinstance(slices, list) or not slices:
        raise BadParameter("`slices:` must list at least one slice")
    models: list[ModelInput] = []
    out = []
    for k, spec in enumerate(slices):
        where = f"slices[{k}]"
        if not isinstance(spec, Mapping):
            raise BadParameter(f"{where}: a slice is a mapping with `sources:`")
        for name in ("base_model", "residual_weight"):
            if name in spec:
                raise Unsupported(f"{where}: a slice's own `{name}:` is not supported yet")
        extra = sorted(set(spec) - {"sources", "parameters"})
        if extra:
            raise Unsupported(f"{where}: unsupported field(s) {extra}")
        if spec.get("parameters") is not None and not isinstance(spec["parameters"], Mapping):
            raise BadParameter(f"{where}: `parameters:` must be a mapping")
        sources = spec.get("sources")
        if not isinstance(sources, list) or not sources:
            raise BadParameter(f"{where}: `sources:` must list at least one source")
        srcs = []
        for j, src in enumerate(sources):
            at = f"{where}.sources[{j}]"
            ref = model_ref(src, at)
            if "parameters" in src:
                raise Unsupported(f"{at}: per-source `parameters:` are not supported yet; "
                                  "put them in the slice's `parameters:`")
            extra = sorted(set(src) - {"model", "layer_range"})
            if extra:
                raise Unsupported(f"{at}: unsupported field(s) {extra}")
            rng = src.get("layer_range")
            if (not isinstance(rng, list) or len(rng) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)):
                raise BadParameter(f"{at}: `layer_range:` must be [start, end]")
            if ref not in [m.ref for m in models]:
                models.append(ModelInput(ref))
            srcs.append({"model": ref, "layer_range": list(rng)})
        params = canon_numbers(dict(spec.get("parameters") or {}))
        params = _drop_unused(method, params, f"{where}.parameters", notes)
        out.append({"sources": srcs, **({"parameters": params} if params else {})})
    return models, out


def to_yaml(method: str, params: Mapping[str, Any], base: str | None,
            models: list[tuple[str, Mapping[str, Any]]]) -> str:
    """A mergekit config for a recipe that maps to one (``models:`` form): the method, its
    parameters, ``dtype``, ``base_model`` and each model with its parameters, models named
    as the caller gives them. Numbers are written as YAML numbers."""
    def plain(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                return value
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    config: dict[str, Any] = {"merge_method": method}
    if base:
        config["base_model"] = base
    config["models"] = [{"model": ref, **({"parameters": plain(dict(p))} if p else {})}
                        for ref, p in models]
    top = {k: v for k, v in params.items() if k not in ("dtype", "slices")}
    if top:
        config["parameters"] = plain(top)
    if params.get("dtype"):
        config["dtype"] = params["dtype"]
    return yaml.safe_dump(config, sort_keys=False)
