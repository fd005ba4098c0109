"""recipe: what a recipe and a contribution may say, checked and made canonical.

One owner for the rules every entry point shares (``crdt-merge recipe``, ``contribute``,
``--from-mergekit``, ``merge`` and :func:`crdt_merge.resolve.plan`):

- parameter values: :func:`parse_value` reads a ``--param`` value, :func:`canon_numbers`
  makes every number a canonical decimal string, so ``0.50`` and ``0.5`` are one op;
- the output dtypes (:data:`OUT_DTYPES`) and the parameters resolve itself consumes
  (:data:`RESOLVE_PARAMS`);
- :func:`check_recipe`: a recipe's parameters as the plan checks them, with
  :func:`normalize_slices` for mergekit-style layer slices;
- :func:`split_params` and :func:`contribution_problem`: a contribution's parameters
  against a method. A parameter the method does not take per model is *unused*: it is
  ignored, as mergekit ignores it, and reported (never a reason to drop the donor); a value
  the method refuses is a problem that excludes the donor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from crdt_merge import codec
from crdt_merge.dtypes import RECIPE_DTYPES
from crdt_merge.errors import BadParameter
from crdt_merge.hashing import is_id
from crdt_merge.methods import METHODS, WHOLE_MODEL, Method
from crdt_merge.methods.params import leaves, parse_scalar

#: recipe parameters resolve itself consumes; the rest go to the method
RESOLVE_PARAMS = ("dtype", "allow_nonfinite", "seed", "tokenizer_source", "slices",
                  "exclude_outliers", "outlier_report")
#: the output dtypes a recipe may name (mergekit's spelling) and their safetensors names
OUT_DTYPES = RECIPE_DTYPES  # the one table: crdt_merge/dtypes.py


# -- values -----------------------------------------------------------------------------------


def canon_numbers(value: Any) -> Any:
    """A parameter value with every number (int, float or numeric string) made a canonical
    decimal string, inside lists and maps too.

    Raises:
        BadParameter: null, or a value that is not a bool, number, string, list or map.
    """
    if value is None:
        raise BadParameter("null is not a parameter value")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return codec.canonical_decimal(value)
    if isinstance(value, str):
        return codec.canonical_decimal(value) if codec.looks_numeric(value) else value
    if isinstance(value, list):
        return [canon_numbers(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canon_numbers(v) for k, v in value.items()}
    raise BadParameter(f"{value!r} is not a parameter value")


def parse_value(text: str) -> Any:
    """A ``--param`` value: true/false, a number (made a canonical decimal), a JSON list or
    map (numbers inside made canonical decimals), or a plain string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if codec.looks_numeric(text.strip()):
        return codec.canonical_decimal(text.strip())
    if text.strip().startswith(("[", "{")):
        try:
            return canon_numbers(json.loads(text))
        except json.JSONDecodeError as exc:
            raise BadParameter(f"{text!r} is not valid JSON: {exc}") from None
    return text


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as a parameter map (values by :func:`parse_value`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadParameter(f"--param {pair!r}: write KEY=VALUE")
        out[key.strip()] = parse_value(value)
    return out


# -- a contribution's parameters ------------------------------------------------------------


def split_params(method: Method, params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A contribution's parameters as ``(used, unused names)``: ``used`` holds the ones
    ``method`` takes per model; the others (an unknown name, or a global parameter set on a
    model) are unused, and mergekit ignores them too."""
    per_model = {p.name for p in method.params if p.scope == "per_model"}
    used = {k: v for k, v in params.items() if k in per_model}
    return used, sorted(k for k in params if k not in per_model)


def unused_note(method: Method, names: Sequence[str]) -> str:
    """The one-line report of parameters ``method`` does not use."""
    return (f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not used by "
            f"{method.name}; ignored, as mergekit ignores {'it' if len(names) == 1 else 'them'}")


def contribution_problem(method: Method, recipe_params: Mapping[str, Any],
                         params: Mapping[str, Any]) -> str | None:
    """Why one contribution's (used) parameters are unusable with the recipe, or None:
    a value out of range or of the wrong type, or a required value nobody gives. The
    reason names the parameter and says how to fix it."""
    used, _ = split_params(method, params)
    try:
        method.validate(recipe_params, [used] * max(1, method.min_donors))
    except BadParameter as exc:
        detail = exc.detail.replace(f"{method.name} model #0", f"{method.name} contribution")
        return detail.replace("model #0's parameters", "the contribution's parameters")
    return None


def values_no_method_accepts(params: Mapping[str, Any]) -> list[str]:
    """Each parameter whose value no registered method would accept under that name (a
    check for a contribution made before any recipe: ``weight=abc`` is wrong whatever the
    recipe will be). A name no method knows is not reported here: it is unused."""
    problems = []
    for key, value in sorted(params.items()):
        specs = [p for m in METHODS.values() for p in m.params
                 if p.name == key and p.scope == "per_model"]
        reasons = []
        for spec in specs:
            try:
                for leaf in leaves(value):
                    if leaf is not None or spec.default is not None:
                        spec.coerce(leaf, key)
            except (BadParameter, ValueError) as exc:
                reasons.append(str(getattr(exc, "detail", exc)))
                continue
            reasons = []
            break
        if reasons:
            problems.append(f"{key}={value!r}: " + reasons[0].split(": ", 1)[-1])
    return problems


# -- a recipe's parameters and slices ---------------------------------------------------------


def _layer_bound(value: object, where: str) -> int:
    try:
        bound = parse_scalar(value, int)
    except ValueError:
        raise BadParameter(f"{where}: layer_range must be [start, end] with whole numbers, "
                           f"got {value!r}") from None
    return int(bound)


def normalize_slices(raw: object) -> tuple[dict[str, Any], ...]:
    """The recipe's ``slices`` checked for form and made canonical.

    Each slice is ``{sources: [{model, layer_range: [start, end]}, ...], parameters?: {...}}``:
    ``model`` a manifest id, ``layer_range`` whole numbers (ints or canonical decimal
    strings) with ``0 <= start < end``, every source of a slice the same length, a model at
    most once per slice. In the result the bounds are ints and ``parameters`` is left out
    when empty, so equal slices give one plan id however the recipe spelled them.

    Raises:
        BadParameter: anything else (the message names the slice and the key).
    """
    shape = "a list of {sources: [{model, layer_range}], parameters?}"
    if not isinstance(raw, (list, tuple)) or not raw:
        raise BadParameter(f"slices must be {shape}")
    out = []
    for k, spec in enumerate(raw):
        where = f"slices[{k}]"
        if not isinstance(spec, Mapping):
            raise BadParameter(f"{where}: a slice is a mapping; slices must be {shape}")
        extra = sorted(set(spec) - {"sources", "parameters"})
        if extra:
            raise BadParameter(f"{where}: {', '.join(extra)} is not supported (a slice has "
                               "`sources` and optional `parameters`)")
        sources = spec.get("sources")
        if not isinstance(sources, (list, tuple)) or not sources:
            raise BadParameter(f"{where}: `sources` must list at least one source")
        norm = []
        for j, src in enumerate(sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, Mapping):
                raise BadParameter(f"{at}: a source is {{model, layer_range}}")
            if "parameters" in src:
                raise BadParameter(f"{at}: per-source `parameters` are not supported; set them "
                                   "on the slice (`parameters`) or on the contribution")
            extra = sorted(set(src) - {"model", "layer_range"})
            if extra:
                raise BadParameter(f"{at}: {', '.join(extra)} is not supported")
            model = src.get("model")
            if not is_id(model):
                raise BadParameter(f"{at}: `model` must be the manifest id of a contributed "
                                   f"model or of the anchor, got {model!r}")
            rng = src.get("layer_range")
            if not isinstance(rng, (list, tuple)) or len(rng) != 2:
                raise BadParameter(f"{at}: layer_range must be [start, end], got {rng!r}")
            start, end = (_layer_bound(v, at) for v in rng)
            if not 0 <= start < end:
                raise BadParameter(f"{at}: layer_range [{start}, {end}] is empty or negative "
                                   "(it is [start, end) with 0 <= start < end)")
            norm.append({"model": model, "layer_range": [start, end]})
        lengths = {s["layer_range"][1] - s["layer_range"][0] for s in norm}
        if len(lengths) != 1:
            raise BadParameter(f"{where}: its sources span {sorted(lengths)} layers; all sources "
                               "of a slice must span the same number of layers")
        models = [s["model"] for s in norm]
        if len(set(models)) != len(models):
            raise BadParameter(f"{where}: a model appears twice among its sources")
        params = spec.get("parameters")
        if params is None:
            params = {}
        if not isinstance(params, Mapping) or not all(isinstance(key, str) for key in params):
            raise BadParameter(f"{where}: `parameters` must be a mapping of parameter names")
        entry: dict[str, Any] = {"sources": norm}
        if params:
            entry["parameters"] = dict(params)
        out.append(entry)
    return tuple(out)


def check_recipe(method: Method, all_params: Mapping[str, Any]) -> tuple[
        dict[str, Any], tuple[dict[str, Any], ...] | None, list[dict[str, Any]]]:
    """A recipe's parameters checked as :func:`plan` checks them (``crdt-merge recipe``
    checks them before authoring the op): the resolve parameters, then the method's,
    per slice when there are ``slices`` (a slice may give a required value the recipe
    does not). Returns the method's parameters, the canonical slices (or None) and each
    slice's parameters over the recipe's.

    Raises:
        BadParameter: a bad dtype, ``allow_nonfinite``, slice or method parameter.
    """
    dtype_name = all_params.get("dtype")
    if dtype_name is not None and dtype_name not in OUT_DTYPES:
        raise BadParameter(f"dtype {dtype_name!r}: use one of {sorted(OUT_DTYPES)}")
    for flag in ("allow_nonfinite", "exclude_outliers", "outlier_report"):
        if not isinstance(all_params.get(flag, False), bool):
            raise BadParameter(f"{flag} must be true or false")
    if (all_params.get("exclude_outliers") or all_params.get("outlier_report")) and (
            "slices" in all_params):
        raise BadParameter("the outlier report compares whole task vectors; it does not "
                           "apply to a recipe with slices")
    method_params = {k: v for k, v in all_params.items() if k not in RESOLVE_PARAMS}
    slices = normalize_slices(all_params["slices"]) if "slices" in all_params else None
    if slices is None:
        method.validate_recipe(method_params)
        return method_params, None, []
    if method.name in WHOLE_MODEL:
        raise BadParameter(f"slices do not apply to {method.name}: it aligns whole models")
    return method_params, slices, _slice_recipes(method, method_params, slices)


def _slice_recipes(method: Method, method_params: Mapping[str, Any],
                   slices: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each slice's parameters over the recipe's (mergekit's precedence), each checked."""
    merged = []
    for k, spec in enumerate(slices):
        params = {**method_params, **spec.get("parameters", {})}
        try:
            method.validate_recipe(params)
        except BadParameter as exc:
            raise BadParameter(f"slices[{k}]: {exc.detail}") from None
        merged.append(params)
    # the recipe's own values, whether or not every slice overrides them
    method.validate_recipe({**slices[0].get("parameters", {}), **method_params})
    return merged


