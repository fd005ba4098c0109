"""``crdt-merge recipe DIR --from-mergekit merge.yml``: a mergekit config becomes ops.

Each ``models:`` entry becomes a contribute op of this site (its model imported, its
``parameters:`` kept as the contribution's parameters); ``merge_method``, the top-level
``parameters:``, ``dtype`` and ``base_model`` become one recipe op (the base model is the
recipe's anchor). ``resolve`` then computes what ``mergekit-yaml`` computes.

With ``slices:`` instead of ``models:``, every model a slice names is imported and
contributed once (without parameters; the base model of a method that takes one is the
anchor instead), and the recipe gets ``slices`` with each model's manifest id, each
slice's ``parameters:`` kept. Per-source ``parameters:``, a slice's own ``base_model:``
and ``residual_weight:`` are refused.

A mergekit feature this engine does not support yet is refused with a message naming it,
never ignored: the merge would silently differ from what the user asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from crdt_merge.errors import BadParameter, RecipeError
from crdt_merge.replica import Replica
from crdt_merge.store.importer import Imported

KNOWN_TOP = {"models", "merge_method", "base_model", "parameters", "dtype", "tokenizer_source",
             "slices", "tokenizer", "chat_template", "out_dtype", "name"}
DTYPES = {"float32", "bfloat16", "float16", "float64"}


class Unsupported(RecipeError):
    code = "unsupported_mergekit_feature"


def _model_ref(entry: Any, where: str) -> str:
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


def load(path: str) -> dict[str, Any]:
    """Read and check a mergekit YAML; refuse what is not supported.

    Raises:
        BadParameter: not a mergekit config (missing or malformed fields).
        Unsupported: a mergekit feature not supported yet (the message names it).
    """
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BadParameter(f"{path}: cannot read the mergekit config ({exc})") from None
    if not isinstance(config, dict):
        raise BadParameter(f"{path}: a mergekit config is a YAML mapping")
    unknown = sorted(set(config) - KNOWN_TOP)
    if unknown:
        raise Unsupported(f"{path}: unknown or unsupported mergekit field(s): {', '.join(unknown)}")
    if ("slices" in config) == ("models" in config):
        raise BadParameter(f"{path}: give exactly one of `models:` and `slices:` (as mergekit "
                           "requires)")
    for field in ("chat_template", "out_dtype"):
        if field in config:
            raise Unsupported(f"{path}: `{field}:` is not supported yet")
    tokenizer = config.get("tokenizer_source", "base")
    if "tokenizer" in config:
        tok = config["tokenizer"]
        tokenizer = tok.get("source", "base") if isinstance(tok, Mapping) else tok
        if isinstance(tok, Mapping) and set(tok) - {"source"}:
            raise Unsupported(f"{path}: `tokenizer:` options {sorted(set(tok) - {'source'})} "
                              "are not supported yet")
    if tokenizer not in ("base", None):
        raise Unsupported(f"{path}: tokenizer source {tokenizer!r} is not supported yet; only "
                          "`base` (the base model's vocabulary) is")
    if not isinstance(config.get("merge_method"), str):
        raise BadParameter(f"{path}: `merge_method:` is required")
    if "slices" in config:
        _check_slices(config["slices"], path)
    else:
        models = config.get("models")
        if not isinstance(models, list) or not models:
            raise BadParameter(f"{path}: `models:` must list at least one model")
        for i, entry in enumerate(models):
            _model_ref(entry, f"models[{i}]")
            extra = set(entry) - {"model", "parameters"}
            if extra:
                raise Unsupported(f"models[{i}]: unsupported field(s) {sorted(extra)}")
    dtype = config.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise BadParameter(f"{path}: dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return config


def _check_slices(slices: Any, path: str) -> None:
    """The form of ``slices:``; refuse what mergekit allows and we do not support yet."""
    if not isinstance(slices, list) or not slices:
        raise BadParameter(f"{path}: `slices:` must list at least one slice")
    for k, spec in enumerate(slices):
        where = f"slices[{k}]"
        if not isinstance(spec, Mapping):
            raise BadParameter(f"{where}: a slice is a mapping with `sources:`")
        for field in ("base_model", "residual_weight"):
            if field in spec:
                raise Unsupported(f"{where}: a slice's own `{field}:` is not supported yet")
        extra = sorted(set(spec) - {"sources", "parameters"})
        if extra:
            raise Unsupported(f"{where}: unsupported field(s) {extra}")
        if spec.get("parameters") is not None and not isinstance(spec["parameters"], Mapping):
            raise BadParameter(f"{where}: `parameters:` must be a mapping")
        sources = spec.get("sources")
        if not isinstance(sources, list) or not sources:
            raise BadParameter(f"{where}: `sources:` must list at least one source")
        for j, src in enumerate(sources):
            at = f"{where}.sources[{j}]"
            _model_ref(src, at)
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


def apply_mergekit_yaml(replica: Replica, path: str,
                        import_fn: Callable[[Replica, str], Imported]) -> dict[str, Any]:
    """Import the models a mergekit YAML names and write its contribute and recipe ops.

    Running it twice adds nothing: a live contribution of this site with the same model and
    parameters is reused, and an identical winning recipe is kept.
    """
    from crdt_merge.cli.commands import _canon_numbers
    from crdt_merge.methods import NOT_IN_MERGEKIT, get_method, plan_slices
    from crdt_merge.resolve.plan import normalize_slices

    config = load(path)
    if config["merge_method"] in NOT_IN_MERGEKIT:
        raise Unsupported(
            f"{path}: merge_method {config['merge_method']!r} is crdt-merge's own (mergekit has "
            "no such method), so a mergekit file cannot ask for it; import the models with "
            f"`--method linear` or similar, then `crdt-merge recipe --method "
            f"{config['merge_method']}`")
    method = get_method(config["merge_method"])
    recipe_params = _canon_numbers(dict(config.get("parameters") or {}))
    sliced = "slices" in config
    slice_params = [_canon_numbers(dict(s.get("parameters") or {})) for s in
                    config.get("slices", ())]
    if sliced:  # a required value may sit in the slices' parameters only
        for k, params in enumerate(slice_params):
            try:
                method.validate_recipe({**recipe_params, **params})
            except BadParameter as exc:
                raise BadParameter(f"slices[{k}]: {exc.detail}") from None
    else:
        method.validate_recipe(recipe_params)
    if config.get("dtype"):
        recipe_params["dtype"] = config["dtype"]
    replica.membership()
    base_ref = config.get("base_model")
    if isinstance(base_ref, Mapping):
        base_ref = _model_ref({"model": base_ref}, "base_model")
    if sliced:  # each model the slices name, once, in order of first appearance
        entries = [{"model": _model_ref(src, f"slices[{k}].sources[{j}]")}
                   for k, spec in enumerate(config["slices"])
                   for j, src in enumerate(spec["sources"])]
        entries = [e for i, e in enumerate(entries) if e not in entries[:i]]
    else:
        entries = list(config["models"])
    if base_ref and method.base == "ignored" and not sliced:
        listed = [_model_ref(e, f"models[{i}]") for i, e in enumerate(entries)]
        if base_ref not in listed:
            raise Unsupported(f"{path}: with {method.name}, mergekit takes `base_model:` as one "
                              "more input; list it under `models:` with its parameters instead")
    base = import_fn(replica, base_ref) if base_ref else None
    if method.needs_base and base is None:
        raise BadParameter(f"{method.name} needs `base_model:`")

    # import every model first: nothing is written to the op log before all checks pass
    imports = [import_fn(replica, _model_ref(e, f"models[{i}]")) for i, e in enumerate(entries)]
    if sliced:
        manifest_of = {_model_ref(e, "model"): imp.manifest_id
                       for e, imp in zip(entries, imports, strict=True)}
        recipe_params["slices"] = [
            {"sources": [{"model": manifest_of[_model_ref(src, "source")],
                          "layer_range": list(src["layer_range"])} for src in spec["sources"]],
             **({"parameters": params} if params else {})}
            for spec, params in zip(config["slices"], slice_params, strict=True)]
        slices = normalize_slices(recipe_params["slices"])
        tensors = {imp.manifest_id: tuple(imp.manifest.tensors) for imp in imports}
        try:  # every layer range within its model
            plan_slices(slices, tensors)
        except BadParameter as exc:
            names = {v: k for k, v in manifest_of.items()}
            detail = exc.detail
            for model_id, ref in names.items():
                detail = detail.replace(model_id, ref)
            raise BadParameter(f"{path}: {detail}") from None

    status = replica.status()
    existing = {(c["manifest"], _key(c["params"])): c["op_id"] for c in status["contributions"]
                if c["live"] and c["site"] == replica.site}
    contributions = []
    for i, (entry, imported) in enumerate(zip(entries, imports, strict=True)):
        ref = _model_ref(entry, f"models[{i}]")
        params = _canon_numbers(dict(entry.get("parameters") or {}))
        if base is not None and imported.manifest_id == base.manifest_id and method.base != "ignored":
            # mergekit leaves the base out of the task vectors: its delta is zero
            contributions.append({"model": ref, "skipped": "is the base model"})
            continue
        key = (imported.manifest_id, _key(params))
        if key in existing:
            contributions.append({"model": ref, "op_id": existing[key], "reused": True})
            continue
        op = replica.contribute(imported.manifest_id, params=params, label=Path(ref).name or ref,
                                base=base.manifest_id if base else None,
                                family=str(imported.manifest.meta.get("model_type", ""))[:200])
        existing[key] = op.id
        contributions.append({"model": ref, "op_id": op.id})
    winner = status["recipe"]
    anchor = base.manifest_id if base else None
    if (winner and winner["method"] == method.name and winner["params"] == recipe_params
            and winner["anchor"] == anchor and not status["conflicts"]):
        recipe_op = winner["op_id"]
    else:
        recipe_op = replica.set_recipe(method.name, recipe_params, anchor=anchor).id
    return {"recipe_op": recipe_op, "method": method.name, "params": recipe_params,
            "anchor": anchor, "contributions": contributions,
            "text": f"recipe {method.name} ({recipe_op}) with {len(contributions)} model(s) "
                    f"from {path}"}


def _key(params: Mapping[str, Any]) -> str:
    import json

    return json.dumps(params, sort_keys=True)
