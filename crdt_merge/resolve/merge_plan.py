"""plan: the pure, printable decision of what a resolve will compute.

``plan(replica)`` reads the op set and the manifests and returns a :class:`MergePlan`: the
winning recipe, the live contributions in canonical order (by op id), every policy decision
(a retract of another member's op ignored, an op that does not count because its author's
key was revoked before it, a donor with NaN/inf or a shape mismatch excluded, a recipe
conflict), the output dtype and the plan id. Every replica holding the same ops
takes the same decisions, and the model card lists them.

The plan id is the BLAKE3 of the canonical plan without the state root, so an op that does
not change what is computed (a retract of another site's op, a superseded recipe, an
unused donor) does not change the plan id, its random streams or the output.

A recipe with ``slices`` (mergekit's layer slicing, see :mod:`crdt_merge.methods.slices`
and specs/methods.md) names its models by manifest id: a contributed model's, or the
anchor's. The plan keeps the slices in canonical form, keeps only the contributions they
use (the others are excluded, a recorded decision), and :func:`slice_layout` maps every
output tensor to its inputs in canonical order: the anchor first, then by contribution op
id, never by arrival order.

A method registered as whole-model (``register(..., per_tensor=False)`` in
:mod:`crdt_merge.methods`) decides over whole models, not tensor by tensor: its resolve
side is a :class:`WholeModel` registered here with :func:`register_whole_model`. It adds a
section to the plan (hashed into the plan id under the method's name), may exclude or
keep contributions (recorded decisions), and may expand its own jobs. Nothing in resolve
names a particular whole-model method; docs/extending.md shows how one plugs in.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from crdt_merge import codec
from crdt_merge.crdt import opset
from crdt_merge.crdt.ops import Op
from crdt_merge.dtypes import RECIPE_DTYPES
from crdt_merge.errors import BadParameter, PlanError, ShapeMismatch
from crdt_merge.hashing import PlanId, digest
from crdt_merge.methods import WHOLE_MODEL, Method, SlicePlan, get_method, plan_slices
from crdt_merge.numeric import NUMERIC_VERSION
from crdt_merge.recipe import (  # noqa: F401  (OUT_DTYPES, RESOLVE_PARAMS: re-exported)
    OUT_DTYPES,
    RESOLVE_PARAMS,
    check_recipe,
    contribution_problem,
    normalize_slices,
    split_params,
    unused_note,
)
from crdt_merge.replica import Replica
from crdt_merge.resolve import outliers as outliers_mod
from crdt_merge.store.finite import first_nonfinite
from crdt_merge.store.manifests import Manifest

PLAN_VERSION = 1
#: methods whose plans always carry the outlier report (crdt-merge's robust methods)
REPORTED = frozenset({"median", "trimmed_mean", "clipped", "krum", "multi_krum"})


@dataclass(frozen=True)
class Contribution:
    op_id: str
    site: str
    label: str
    manifest: str
    form: str
    base: str | None
    params: Mapping[str, Any]

    def to_wire(self) -> dict[str, Any]:
        out = {"op_id": self.op_id, "site": self.site, "label": self.label,
               "manifest": self.manifest, "form": self.form, "params": dict(self.params)}
        if self.base is not None:
            out["base"] = self.base
        return out


@dataclass(frozen=True)
class MergePlan:
    method: str
    params: Mapping[str, Any]  # the method's global parameters
    base: str | None  # anchor / base manifest id
    contributions: tuple[Contribution, ...]
    dtype: str | None  # output dtype name (safetensors), None = follow the base tensor
    seed: str | None
    allow_nonfinite: bool
    decisions: tuple[Mapping[str, Any], ...]
    recipe_op: str
    state_root: str = field(default="", compare=False)
    #: a whole-model method's decisions that change bytes (for cross_family: families,
    #: depth maps, roles); in the wire form under the method's name
    section: Mapping[str, Any] | None = None
    #: the recipe's layer slices in canonical form (:func:`normalize_slices`), or None
    slices: tuple[Mapping[str, Any], ...] | None = None
    #: where each output tensor of a sliced plan comes from, as :func:`plan` checked it
    #: (not part of the plan: derived from the slices and the manifests)
    layout: SliceLayout | None = field(default=None, compare=False, repr=False)
    #: the outlier report (:mod:`crdt_merge.resolve.outliers`), one entry per kept
    #: contribution before any outlier exclusion; in the wire form (and the model card)
    outliers: tuple[Mapping[str, Any], ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The canonical plan: what is computed, nothing else. Its hash is the plan id.

        Neither the state root nor the decisions are part of it: decisions that matter
        (excluded donors) already show in ``contributions``, and the rest (an ignored
        retract, a recipe conflict) change nothing that is computed."""
        wire = {
            "v": PLAN_VERSION, "numeric": NUMERIC_VERSION, "method": self.method,
            "params": dict(self.params), "base": self.base or "",
            "contributions": [c.to_wire() for c in self.contributions],
            "dtype": self.dtype or "", "seed": self.seed or "",
            "allow_nonfinite": self.allow_nonfinite,
        }
        if self.section is not None:
            wire[self.method] = dict(self.section)
        if self.slices is not None:
            wire["slices"] = [dict(s) for s in self.slices]
        if self.outliers is not None:
            wire["outliers"] = [dict(x) for x in self.outliers]
        return wire

    @property
    def id(self) -> PlanId:
        return PlanId(digest(codec.encode(self.to_wire())))

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any], decisions: tuple[Mapping[str, Any], ...] = (),
                  recipe_op: str = "", state_root: str = "") -> MergePlan:
        if wire.get("v") != PLAN_VERSION or wire.get("numeric") != NUMERIC_VERSION:
            raise PlanError("this plan was made by another plan or numeric version")
        contributions = tuple(
            Contribution(c["op_id"], c["site"], c["label"], c["manifest"], c["form"],
                         c.get("base"), c["params"]) for c in wire["contributions"])
        slices = wire.get("slices")
        return cls(wire["method"], wire["params"], wire["base"] or None, contributions,
                   wire["dtype"] or None, wire["seed"] or None, bool(wire["allow_nonfinite"]),
                   tuple(decisions), recipe_op, state_root,
                   wire.get(wire["method"]) if wire["method"] in WHOLE_MODEL else None,
                   None if slices is None else normalize_slices(slices),
                   outliers=None if wire.get("outliers") is None
                   else tuple(dict(x) for x in wire["outliers"]))

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for people and ``--json``."""
        return {"plan_id": self.id, "state_root": self.state_root, "recipe_op": self.recipe_op,
                **self.to_wire(), "decisions": [dict(d) for d in self.decisions]}


def _adapter_problem(adapter: Manifest, base: Manifest | None, method: str, whole: bool,
                     sliced: bool) -> str | None:
    """Why an adapter contribution cannot take part, or None: its table must be valid for
    the plan's base (specs/formats.md section 11); whole-model methods (cross_family)
    other than those that declare ``adapters`` (krum, multi_krum) and layer slices do not
    take adapters, each named in the reason. An exclusion, not a plan error: a contribution
    must not be able to stop everyone's merge."""
    from crdt_merge.errors import ModelImportError
    from crdt_merge.store.adapter import adapter_table

    if whole:
        return (f"{method} is a whole-model method and does not take adapter contributions "
                "(they take part in per-tensor methods onto their base); contribute the "
                "merged model (PEFT merge_and_unload) instead")
    if sliced:
        return ("layer slices do not take adapter contributions (they take part in "
                f"per-tensor {method} onto their base without slices); contribute the merged "
                "model (PEFT merge_and_unload) instead")
    try:
        adapter_table(adapter, base)
    except ModelImportError as exc:
        return exc.detail
    return None


def _shape_problem(donor: Manifest, reference: Manifest) -> str | None:
    for name, rec in reference.tensors.items():
        other = donor.tensors.get(name)
        if other is None:
            return f"lacks tensor {name}"
        if other.shape != rec.shape:
            return f"tensor {name} has shape {list(other.shape)}, not {list(rec.shape)}"
    return None


# -- layer slices --------------------------------------------------------------------------------

ANCHOR = -1
"""In a :class:`SliceLayout`, the input that is the anchor rather than a contribution."""


def slice_roles(the_plan: MergePlan) -> dict[str, int]:
    """Which input each model a slice may name is: ``{manifest id: contribution index}``
    (into ``the_plan.contributions``), :data:`ANCHOR` for the anchor.

    For a method that takes a base, the anchor's manifest is the base even if a contribution
    holds the same model; for one that ignores it (passthrough, linear...), a contribution
    of the anchor's model wins and the anchor is otherwise one more input. A model several
    contributions hold is the first one's, in canonical order."""
    return _roles(get_method(the_plan.method), the_plan.base, the_plan.contributions)


def _roles(method: Method, base: str | None,
           contributions: Sequence[Contribution]) -> dict[str, int]:
    roles: dict[str, int] = {}
    uses_base = method.base != "ignored"
    if base and uses_base:
        roles[base] = ANCHOR
    for i, c in enumerate(contributions):
        roles.setdefault(c.manifest, i)
    if base:
        roles.setdefault(base, ANCHOR)
    return roles


@dataclass(frozen=True)
class SliceLayout:
    """A sliced plan's output tensors and where each model index points.

    Attributes:
        tensors: :func:`crdt_merge.methods.plan_slices` over the slices' models.
        models: the manifest id of each model index: the anchor first, then in canonical
            contribution order (by op id); never the order of the slices or of arrival.
        inputs: each model index's input: a contribution index, or :data:`ANCHOR`.
    """

    tensors: SlicePlan
    models: tuple[str, ...]
    inputs: tuple[int, ...]


def slice_layout(the_plan: MergePlan, manifests: Mapping[str, Manifest]) -> SliceLayout:
    """Map every output tensor of a sliced plan to its source tensors.

    Raises:
        BadParameter: a slice names a model that is not an input of the plan, a layer the
            model lacks, or a tensor one source lacks (see ``plan_slices``).
        ShapeMismatch: the sources of one output tensor differ in shape, or a delta's
            source tensor is not the anchor's shape (or the anchor lacks it).
    """
    assert the_plan.slices is not None
    roles = slice_roles(the_plan)
    named = {src["model"] for spec in the_plan.slices for src in spec["sources"]}
    unknown = sorted(named - set(roles))
    if unknown:
        raise BadParameter(f"slices name model {unknown[0]}, which is not an input of the plan")
    order = sorted(named, key=lambda m: (roles[m] != ANCHOR, roles[m]))
    models = {m: tuple(manifests[m].tensors) for m in order}
    tensors = plan_slices(the_plan.slices, models)
    deltas = {m for m in order if roles[m] != ANCHOR
              and the_plan.contributions[roles[m]].form == "delta"}
    anchor = manifests[the_plan.base] if deltas and the_plan.base else None
    for t in tensors.tensors:
        shapes = {tuple(manifests[order[i]].tensors[name].shape) for i, name in t.sources}
        if len(shapes) > 1:
            raise ShapeMismatch(f"output tensor {t.name}: its sources have shapes "
                                f"{sorted(list(x) for x in shapes)}; the models of a slice "
                                "must agree in shape")
        shape = next(iter(shapes))
        for i, name in t.sources:  # a delta adds to the anchor's tensor of the same name
            if order[i] in deltas:
                under = anchor.tensors.get(name) if anchor is not None else None
                if under is None or tuple(under.shape) != shape:
                    raise ShapeMismatch(f"output tensor {t.name}: the delta model {order[i]} "
                                        f"has {name}, which the anchor lacks or shapes "
                                        "differently")
    return SliceLayout(tensors, tuple(order), tuple(roles[m] for m in order))


def _exclusion(decisions: Sequence[Mapping[str, Any]], op_ids: Sequence[str]) -> str | None:
    for d in decisions:
        if d.get("decision") == "excluded" and d.get("op_id") in op_ids:
            return str(d["detail"])
    return None


def _sliced_inputs(method: Method, base: str | None, slices: Sequence[Mapping[str, Any]],
                   merged: Sequence[Mapping[str, Any]], every: Sequence[Op],
                   kept: list[Contribution],
                   decisions: list[dict[str, Any]]) -> list[Contribution]:
    """The kept contributions a sliced recipe uses; checks that every model it names is
    an input, and each slice's inputs against the method (count, parameters, base)."""
    roles = _roles(method, base, kept)
    uses_base = method.base != "ignored"
    used: set[int] = set()
    for k, spec in enumerate(slices):
        donors: list[Mapping[str, Any]] = []
        has_base = False
        for src in spec["sources"]:
            model = src["model"]
            role = roles.get(model)
            if role is None:
                ops = [op.id for op in every if op.body["manifest"] == model]
                if not ops:
                    raise BadParameter(f"slices[{k}] names model {model}, which is neither "
                                       "contributed nor the anchor")
                why = _exclusion(decisions, ops)
                raise PlanError(f"slices[{k}] names model {model}, which no live contribution "
                                "holds: " + (f"its contribution was excluded ({why})" if why
                                             else "its contribution was retracted"))
            if role == ANCHOR and uses_base:
                has_base = True
                continue
            if role != ANCHOR:
                used.add(role)
            donors.append({} if role == ANCHOR else kept[role].params)
        if base is not None and uses_base and not has_base:
            raise BadParameter(f"slices[{k}]: {method.name} merges onto the anchor {base}; "
                               "list it among the slice's sources (as mergekit requires the "
                               "base model in every slice)")
        try:
            method.validate(merged[k], donors)
        except BadParameter as exc:
            raise BadParameter(f"slices[{k}]: {exc.detail}") from None
    out = []
    for i, c in enumerate(kept):
        if i in used:
            out.append(c)
        else:
            decisions.append({"decision": "excluded", "op_id": c.op_id,
                              "detail": "not named in the recipe's slices"})
    return out


def exclusion_text(decisions: Sequence[Mapping[str, Any]],
                   contributions: Sequence[Contribution]) -> str:
    """The excluded contributions, one per line (op id prefix, site, label, reason), or ""."""
    who = {c.op_id: c for c in contributions}
    lines = []
    for d in decisions:
        if d.get("decision") == "excluded":
            c = who.get(str(d.get("op_id")))
            name = f"{c.site} {c.label!r}" if c is not None else ""
            lines.append(f"\n  excluded {str(d.get('op_id'))[:12]} {name}: {d['detail']}")
    return "".join(lines)


#: the provenance keys shown first, in this order (specs/cross-family.md section 7)
PROVENANCE_ORDER = ("engine", "donor", "donor_base", "anchor", "calibration_blake3",
                    "calibration_bytes", "positions", "windows", "mode")


def provenance_text(provenance: Mapping[str, Any], limit: int = 600) -> str:
    """One line for a contribution's ``provenance`` map: what its author's op *claims*
    about where the delta came from (signed by that member, not re-checked by anyone).
    Ids are shortened to 16 characters; values are JSON, so no value can break a line."""
    def show(value: Any) -> str:
        if isinstance(value, str) and len(value) == 64 and all(ch in "0123456789abcdef"
                                                                for ch in value):
            return value[:16]
        return json.dumps(value, sort_keys=True, ensure_ascii=True)

    keys = [k for k in PROVENANCE_ORDER if k in provenance]
    keys += sorted(k for k in provenance if k not in PROVENANCE_ORDER)
    text = "delta made by its author's site, by its op: " + ", ".join(
        f"{k} {show(provenance[k])}" for k in keys)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plan(replica: Replica, extra: Sequence[Op] = ()) -> MergePlan:
    """Decide the merge for the replica's current op set (see the module docstring).

    ``extra``: ops not written yet, planned as if they were (``crdt-merge contribute`` and
    ``recipe`` check a new op with the plan's own rules before writing it).

    Raises:
        PlanError: no recipe, no base for a method that needs one, no live contribution, or
            a model the slices name that no live contribution holds.
        RecipeError: the winning recipe names an unknown method or bad parameters (or bad
            slices: an unknown model, bad ranges, sources of different lengths).
    """
    ops = list(replica.ops().values()) + list(extra)
    state = opset.membership(ops)
    recipes = opset.recipe_state(ops, state.counted)
    if recipes.winner is None:
        raise PlanError("no recipe yet; agree one with `crdt-merge recipe DIR --method ...`")
    recipe: Op = recipes.winner
    decisions: list[dict[str, Any]] = []
    for other in recipes.conflicts:
        decisions.append({"decision": "recipe_conflict", "op_id": other.id,
                          "detail": f"recipe {other.id} is also unsuperseded; "
                                    f"{recipe.id} wins by (clock, op id)"})
    for retract, target in opset.ignored_retracts(ops, state.counted):
        decisions.append({"decision": "retract_ignored", "op_id": retract.id, "target": target,
                          "detail": f"site {retract.site} cannot retract another member's op"})
    held = {op.id: op for op in ops}
    for op_id, why in state.not_counted.items():
        decisions.append({"decision": "not_counted", "op_id": op_id,
                          "detail": f"{held[op_id].kind} by {held[op_id].site} does not count: "
                                    f"{why}"})
    all_params = dict(recipe.body["params"])
    dtype_name = all_params.get("dtype")
    allow = all_params.get("allow_nonfinite", False)
    seed = all_params.get("seed")
    method = get_method(recipe.body["method"])
    whole = whole_model(method.name)
    method_params, slices, merged = check_recipe(method, all_params)

    live = opset.live_contributions(ops, state.counted)
    contributions = []
    for op in live:  # a parameter the method does not use is ignored, as mergekit does
        used, unused = split_params(method, op.body["params"])
        if unused:
            decisions.append({"decision": "params_ignored", "op_id": op.id,
                              "detail": unused_note(method, unused)})
        contributions.append(Contribution(op.id, op.site, op.body["label"], op.body["manifest"],
                                          op.body["form"], op.body.get("base"), used))
    base = recipe.body.get("anchor")
    if base is None:
        bases = {c.base for c in contributions if c.base is not None}
        if len(bases) == 1:
            base = bases.pop()
    if base is None and (method.needs_base or any(c.form in ("delta", "adapter")
                                                  for c in contributions)):
        raise PlanError(f"method {method.name} needs a base model: give the recipe an anchor "
                        "(`--anchor MODEL`) or contribute with `--base`")
    base_manifest = replica.get_manifest(base) if base else None

    kept: list[Contribution] = []
    for c in contributions:
        if c.form in ("delta", "adapter") and c.base != base:
            decisions.append({"decision": "excluded", "op_id": c.op_id,
                              "detail": f"{c.form} against base {c.base}, the plan's base is {base}"})
            continue
        donor = replica.get_manifest(c.manifest)
        reference = base_manifest or (replica.get_manifest(kept[0].manifest) if kept else None)
        if c.form == "adapter":  # its table is checked against the base instead of shapes
            problem = _adapter_problem(donor, base_manifest, method.name,
                                       whole is not None and not whole.adapters,
                                       slices is not None)
            if problem:
                decisions.append({"decision": "excluded", "op_id": c.op_id,
                                  "detail": f"adapter: {problem}"})
                continue
            reference = None
        # with slices, shapes are checked per output tensor (models may differ in depth)
        problem = (_shape_problem(donor, reference)
                   if reference is not None and slices is None
                   and (whole is None or whole.same_shapes) else None)
        if problem:
            decisions.append({"decision": "excluded", "op_id": c.op_id,
                              "detail": f"shape mismatch: {problem}"})
            continue
        if not allow:
            bad = first_nonfinite(replica.store, c.manifest)
            if bad:
                decisions.append({"decision": "excluded", "op_id": c.op_id,
                                  "detail": f"tensor {bad} holds NaN or inf "
                                            "(set allow_nonfinite=true to keep it)"})
                continue
        if slices is None:
            problem = contribution_problem(method, method_params, c.params)
        else:  # against each slice that names the model
            problem = next((p for k, spec in enumerate(slices)
                            if any(s["model"] == c.manifest for s in spec["sources"])
                            for p in [contribution_problem(method, merged[k], c.params)] if p), None)
        if problem:
            decisions.append({"decision": "excluded", "op_id": c.op_id,
                              "detail": f"bad parameters: {problem}"})
            continue
        kept.append(c)
    outliers = None
    wants = all_params.get("exclude_outliers") or all_params.get("outlier_report")
    if wants and base_manifest is None:
        raise PlanError("the outlier report needs task vectors, so a base: give the recipe "
                        "an anchor (`--anchor MODEL`) or contribute with `--base`")
    if slices is None and base_manifest is not None and kept and (
            (method.name in REPORTED and all_params.get("outlier_report") is not False)
            or wants or method_params.get("norms") == "model"):
        outliers, kept = _outlier_decisions(replica, base_manifest, kept, method_params,
                                            bool(all_params.get("exclude_outliers")),
                                            decisions)
    section = None
    if whole is not None:
        decided = whole.plan_section(replica, base, tuple(kept), method_params, all_params)
        section, kept = decided.section, list(decided.kept)
        decisions += [dict(d) for d in decided.decisions]
    if slices is not None:
        every = [op for op in ops if op.kind == "contribute"]
        kept = _sliced_inputs(method, base, slices, merged, every, kept, decisions)
    elif not kept:
        raise PlanError("no live contribution to merge (all retracted or excluded)"
                        + exclusion_text(decisions, contributions))
    else:
        method.validate(method_params, [c.params for c in kept])
    for c in kept:  # where a delta came from, as its op says (crdt-merge transfer)
        provenance = held[c.op_id].body.get("provenance")
        if provenance is not None:
            decisions.append({"decision": "provenance", "op_id": c.op_id,
                              "detail": provenance_text(provenance)})
    result = MergePlan(method.name, method_params, base, tuple(kept),
                       RECIPE_DTYPES[dtype_name] if dtype_name else None,
                       seed if isinstance(seed, str) else None, allow,
                       tuple(decisions), recipe.id, replica.state_root(), section, slices,
                       outliers=outliers)
    if slices is not None:  # every range, layer and tensor exists; shapes agree
        ids = {src["model"] for spec in slices for src in spec["sources"]} | {base or ""}
        layout = slice_layout(result, {m: replica.get_manifest(m) for m in sorted(ids) if m})
        result = dataclasses.replace(result, layout=layout)
    return result


# -- the outlier report ----------------------------------------------------------------------


def _outlier_decisions(replica: Replica, base: Manifest, kept: list[Contribution],
                       method_params: Mapping[str, Any], exclude: bool,
                       decisions: list[dict[str, Any]]
                       ) -> tuple[tuple[dict[str, Any], ...], list[Contribution]]:
    """The outlier report of the kept contributions; with ``exclude``, the flagged ones
    are excluded (recorded decisions). ``clipped`` with ``norms: model`` gets each kept
    contribution's whole-model norm as its ``model_norm`` parameter (so the plan holds
    it)."""
    stats = outliers_mod.cached_stats(replica.store, base, [
        (replica.get_manifest(c.manifest), c.form) for c in kept])
    entries = outliers_mod.report(stats, [c.op_id for c in kept])
    out = []
    for c, entry, i in zip(kept, entries, range(len(kept)), strict=True):
        if exclude and entry["flags"]:
            decisions.append({"decision": "excluded", "op_id": c.op_id, "by_recipe": True,
                              "detail": f"outlier ({', '.join(entry['flags'])}): task-vector "
                                        f"norm {entry['norm']}, cosine {entry['cosine']} to "
                                        "the mean of the others (exclude_outliers=true)"})
            continue
        if method_params.get("norms") == "model":
            norm = math.sqrt(max(stats.gram[i][i], 0.0))
            c = dataclasses.replace(c, params={**c.params, "model_norm": repr(norm)})
        out.append(c)
    return tuple(entries), out


# -- whole-model methods ---------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """What a whole-model method decides when the plan is made.

    Attributes:
        section: the decisions that change bytes, JSON-able and canonical; the plan's wire
            form holds it under the method's name, so the plan id covers it (None: none).
        decisions: recorded decisions (``{"decision", "detail", "op_id"?...}``), which the
            model card lists; they do not change the plan id.
        kept: the contributions that take part, a subset of those given, in their order
            (each one left out needs an ``excluded`` decision naming its op id).
    """

    section: Mapping[str, Any] | None
    decisions: Sequence[Mapping[str, Any]] = ()
    kept: Sequence[Contribution] = ()


@dataclass(frozen=True)
class JobInputs:
    """What an executing plan's job expansion reads: the replica (store, manifests,
    config files), the input manifests by id, each output tensor's place (file path,
    absolute offset), the piece size and the model's number of layers."""

    replica: Replica
    manifests: Mapping[str, Manifest]
    shards: Mapping[str, tuple[str, int]]
    piece_size: int
    num_layers: int


class WholeModel(Protocol):
    """The resolve side of a whole-model method (see the module docstring and
    docs/extending.md). Register one with :func:`register_whole_model`.

    Attributes:
        name: the method's registry name (registered in :mod:`crdt_merge.methods` with
            ``per_tensor=False``).
        same_shapes: the plan excludes a donor whose tensors differ in name or shape from
            the base's (False: the method aligns donors of other shapes itself).
        run_job: the module-level function that computes one job of :meth:`plan_jobs`
            (picklable: it may run in a worker process); None when the method has no
            jobs of its own.
        processes: run :attr:`run_job` in worker processes (each with its own torch and
            LAPACK state) rather than threads.
        adapters: the method takes adapter contributions (it
            reads their task vectors through :mod:`crdt_merge.resolve.outliers` and runs
            the per-tensor path, which materialises them: krum, multi_krum).
    """

    name: str
    same_shapes: bool
    processes: bool
    adapters: bool

    @property
    def run_job(self) -> Callable[[Any], tuple[str, list[str]]] | None: ...

    def plan_section(self, replica: Replica, base: str | None,
                     contributions: Sequence[Contribution], params: Mapping[str, Any],
                     recipe: Mapping[str, Any]) -> Section:
        """Decide over whole models: ``contributions`` are the live ones not excluded so
        far (canonical order), ``params`` the method's recipe parameters, ``recipe`` all of
        them (``tokenizer_source``...). Reads manifests and config files, never tensors'
        maths results that depend on the machine."""
        ...

    def plan_jobs(self, plan: MergePlan, inputs: JobInputs) -> Sequence[Any] | None:
        """This method's jobs for ``plan`` (each with ``name`` and ``shape``, for
        :attr:`run_job`), or None: then each output tensor is merged by the per-tensor
        kernel of the method's :class:`~crdt_merge.methods.Method`, with the kept
        contributions."""
        ...


_WHOLE_MODEL: dict[str, WholeModel] = {}


def register_whole_model(method: WholeModel) -> WholeModel:
    """Add the resolve side of a whole-model method (see :class:`WholeModel`)."""
    if method.name not in WHOLE_MODEL:
        raise ValueError(f"{method.name} is not registered as a whole-model method "
                         "(crdt_merge.methods.base.register(..., per_tensor=False))")
    if method.name in _WHOLE_MODEL:
        raise ValueError(f"whole-model method {method.name} is registered twice")
    _WHOLE_MODEL[method.name] = method
    return method


def whole_model(name: str) -> WholeModel | None:
    """The resolve side of a whole-model method, or None for a per-tensor method.

    Raises:
        PlanError: ``name`` is a whole-model method with no resolve side registered.
    """
    if name not in WHOLE_MODEL:
        return None
    if name not in _WHOLE_MODEL:
        raise PlanError(f"method {name} has no resolve side registered (register_whole_model)")
    return _WHOLE_MODEL[name]
