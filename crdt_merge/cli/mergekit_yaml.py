"""``crdt-merge recipe DIR --from-mergekit merge.yml``: a mergekit config becomes ops.

:mod:`crdt_merge.interop.mergekit` translates the YAML into a draft (models, recipe, base);
here the models are imported, every name becomes a manifest id, the ops are checked with
the plan's own rules as if written, and only then written: one contribute op per model
(its ``parameters:`` kept), one recipe op (the base model is its anchor). ``resolve`` then
computes what ``mergekit-yaml`` computes.

Running it twice adds nothing: a live contribution of this site with the same model and
parameters is reused, and an identical winning recipe is kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from crdt_merge import maintenance
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import BadParameter
from crdt_merge.interop.mergekit import Draft, load
from crdt_merge.methods import get_method, plan_slices
from crdt_merge.recipe import normalize_slices
from crdt_merge.replica import Replica
from crdt_merge.store.importer import Imported, model_label


def apply_mergekit_yaml(replica: Replica, path: str,
                        import_fn: Callable[[Replica, str], Imported], *,
                        check: Callable[[Replica, list[Op]], None] | None = None) -> dict[str, Any]:
    """Import the models a mergekit YAML names and write its contribute and recipe ops.

    ``check(replica, drafted ops)`` runs before any op is written (the CLI plans them and
    refuses exclusions unless ``force``).
    """
    draft = load(path)
    return apply_draft(replica, draft, path, import_fn, check=check)


def apply_draft(replica: Replica, draft: Draft, path: str,
                import_fn: Callable[[Replica, str], Imported], *, prune: bool = False,
                check: Callable[[Replica, list[Op]], None] | None = None) -> dict[str, Any]:
    """:func:`apply_mergekit_yaml` of a translated config. With ``prune`` (a replica that
    holds one config's merge), this site's live contributions the config no longer names
    are retracted, so the replica merges exactly what the config says."""
    method = get_method(draft.method)
    replica.membership()
    base = import_fn(replica, draft.base) if draft.base else None
    # import every model first: nothing is written to the op log before all checks pass
    imports = [import_fn(replica, m.ref) for m in draft.models]
    recipe_params = dict(draft.params)
    if draft.sliced:
        manifest_of = {m.ref: imp.manifest_id for m, imp in zip(draft.models, imports, strict=True)}
        if draft.base and base is not None:
            manifest_of.setdefault(draft.base, base.manifest_id)
        recipe_params["slices"] = [
            {**spec, "sources": [{"model": manifest_of[src["model"]],
                                  "layer_range": list(src["layer_range"])}
                                 for src in spec["sources"]]}
            for spec in draft.params["slices"]]
        slices = normalize_slices(recipe_params["slices"])
        tensors = {imp.manifest_id: tuple(imp.manifest.tensors) for imp in imports}
        if base is not None:
            tensors.setdefault(base.manifest_id, tuple(base.manifest.tensors))
        try:  # every layer range within its model
            plan_slices(slices, tensors)
        except BadParameter as exc:
            detail = exc.detail
            for ref, model_id in manifest_of.items():
                detail = detail.replace(model_id, ref)
            raise BadParameter(f"{path}: {detail}") from None

    status = maintenance.status(replica)
    existing = {(c["manifest"], _key(c["params"])): c["op_id"] for c in status["contributions"]
                if c["live"] and c["site"] == replica.site}
    planned: list[tuple[dict[str, Any], Any]] = []  # (report entry, contribute kwargs or None)
    for item, imported in zip(draft.models, imports, strict=True):
        if base is not None and imported.manifest_id == base.manifest_id and method.base != "ignored":
            # mergekit leaves the base out of the task vectors: its delta is zero
            planned.append(({"model": item.ref, "skipped": "is the base model"}, None))
            continue
        key = (imported.manifest_id, _key(item.params))
        if key in existing:
            planned.append(({"model": item.ref, "op_id": existing[key], "reused": True}, None))
            continue
        existing[key] = "(new)"
        planned.append(({"model": item.ref}, dict(
            manifest_id=imported.manifest_id, params=item.params,
            label=model_label(item.ref)[:200],
            base=base.manifest_id if base else None,
            family=str(imported.manifest.meta.get("model_type", ""))[:200])))
    winner = status["recipe"]
    anchor = base.manifest_id if base else None
    same_recipe = (winner and winner["method"] == method.name
                   and winner["params"] == recipe_params and winner["anchor"] == anchor
                   and not status["conflicts"])
    # reused ops are held already; the others are drafted, planned with the plan's own
    # rules (``check``) and written only when the check passes
    stale = sorted(set(existing.values()) - {e.get("op_id") for e, _ in planned} - {"(new)"})
    drafts = [replica.retract(stale, draft=True)] if prune and stale else []
    drafts += [replica.contribute(**kw, draft=True) for _, kw in planned if kw is not None]
    if not same_recipe:
        drafts.append(replica.set_recipe(method.name, recipe_params, anchor=anchor, draft=True))
    if check is not None:
        check(replica, drafts)
    if prune and stale:
        replica.retract(stale)
    contributions = []
    for entry, kw in planned:
        if kw is not None:
            entry["op_id"] = replica.contribute(**kw).id
        contributions.append(entry)
    recipe_op = (winner["op_id"] if same_recipe
                 else replica.set_recipe(method.name, recipe_params, anchor=anchor).id)
    return {"recipe_op": recipe_op, "method": method.name, "params": recipe_params,
            "anchor": anchor, "contributions": contributions, "notes": list(draft.notes),
            "text": f"recipe {method.name} ({recipe_op[:12]}) with {len(contributions)} "
                    f"model(s) from {path}"}


def _key(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


