"""plan: the pure, printable decision of what a resolve will compute.

``plan(replica)`` reads the op set and the manifests and returns a :class:`MergePlan`: the
winning recipe, the live contributions in canonical order (by op id), every policy decision
(a retract of another site's op ignored, a donor with NaN/inf or a shape mismatch excluded,
a recipe conflict), the output dtype and the plan id. Every replica holding the same ops
takes the same decisions, and the model card lists them.

The plan id is the BLAKE3 of the canonical plan without the state root, so an op that does
not change what is computed (a retract of another site's op, a superseded recipe, an
unused donor) does not change the plan id, its random streams or the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crdt_merge import codec
from crdt_merge.crdt import opset
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import BadParameter, PlanError
from crdt_merge.hashing import PlanId, digest
from crdt_merge.methods import Method, get_method
from crdt_merge.methods import cross_family_params as _cross_family  # registers "cross_family"
from crdt_merge.numeric import NUMERIC_VERSION
from crdt_merge.replica import Replica
from crdt_merge.store.finite import first_nonfinite
from crdt_merge.store.manifests import Manifest

PLAN_VERSION = 1
#: recipe parameters resolve itself consumes; the rest go to the method
RESOLVE_PARAMS = ("dtype", "allow_nonfinite", "seed", "tokenizer_source")
OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


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
    #: the cross_family method's decisions that change bytes (families, depth maps, roles)
    cross_family: Mapping[str, Any] | None = None

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
        if self.cross_family is not None:
            wire["cross_family"] = dict(self.cross_family)
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
        return cls(wire["method"], wire["params"], wire["base"] or None, contributions,
                   wire["dtype"] or None, wire["seed"] or None, bool(wire["allow_nonfinite"]),
                   tuple(decisions), recipe_op, state_root, wire.get("cross_family"))

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for people and ``--json``."""
        return {"plan_id": self.id, "state_root": self.state_root, "recipe_op": self.recipe_op,
                **self.to_wire(), "decisions": [dict(d) for d in self.decisions]}


def _shape_problem(donor: Manifest, reference: Manifest) -> str | None:
    for name, rec in reference.tensors.items():
        other = donor.tensors.get(name)
        if other is None:
            return f"lacks tensor {name}"
        if other.shape != rec.shape:
            return f"tensor {name} has shape {list(other.shape)}, not {list(rec.shape)}"
    return None


def _param_problem(method: Method, recipe_params: Mapping[str, Any],
                   params: Mapping[str, Any]) -> str | None:
    """Why one contribution's own parameters are unusable with the recipe, or None.

    A contribution with bad parameters is excluded (a recorded decision) rather than
    failing the whole plan: one site's mistake must not stop every replica's merge.
    Errors in the recipe itself still fail the plan."""
    try:
        method.validate(recipe_params, [params] * max(1, method.min_donors))
    except BadParameter as exc:
        return exc.detail
    return None


def plan(replica: Replica) -> MergePlan:
    """Decide the merge for the replica's current op set (see the module docstring).

    Raises:
        PlanError: no recipe, no base for a method that needs one, no live contribution.
        RecipeError: the winning recipe names an unknown method or bad parameters.
    """
    ops = list(replica.ops().values())
    recipes = opset.recipe_state(ops)
    if recipes.winner is None:
        raise PlanError("no recipe yet; agree one with `crdt-merge recipe DIR --method ...`")
    recipe: Op = recipes.winner
    decisions: list[dict[str, Any]] = []
    for other in recipes.conflicts:
        decisions.append({"decision": "recipe_conflict", "op_id": other.id,
                          "detail": f"recipe {other.id} is also unsuperseded; "
                                    f"{recipe.id} wins by (clock, op id)"})
    for retract, target in opset.ignored_retracts(ops):
        decisions.append({"decision": "retract_ignored", "op_id": retract.id, "target": target,
                          "detail": f"site {retract.site} cannot retract another site's op"})
    all_params = dict(recipe.body["params"])
    dtype_name = all_params.get("dtype")
    if dtype_name is not None and dtype_name not in OUT_DTYPES:
        raise BadParameter(f"dtype {dtype_name!r}: use one of {sorted(OUT_DTYPES)}")
    allow = all_params.get("allow_nonfinite", False)
    if not isinstance(allow, bool):
        raise BadParameter("allow_nonfinite must be true or false")
    seed = all_params.get("seed")
    method_params = {k: v for k, v in all_params.items() if k not in RESOLVE_PARAMS}
    method = get_method(recipe.body["method"])
    method.validate_recipe(method_params)

    live = opset.live_contributions(ops)
    contributions = [
        Contribution(op.id, op.site, op.body["label"], op.body["manifest"], op.body["form"],
                     op.body.get("base"), op.body["params"]) for op in live]
    base = recipe.body.get("anchor")
    if base is None:
        bases = {c.base for c in contributions if c.base is not None}
        if len(bases) == 1:
            base = bases.pop()
    if base is None and (method.needs_base or any(c.form == "delta" for c in contributions)):
        raise PlanError(f"method {method.name} needs a base model: give the recipe an anchor "
                        "(`--anchor MODEL`) or contribute with `--base`")
    base_manifest = replica.get_manifest(base) if base else None

    cross = method.name == _cross_family.NAME  # donors of other shapes, aligned per tensor
    kept: list[Contribution] = []
    for c in contributions:
        if c.form == "delta" and c.base != base:
            decisions.append({"decision": "excluded", "op_id": c.op_id,
                              "detail": f"delta against base {c.base}, the plan's base is {base}"})
            continue
        donor = replica.get_manifest(c.manifest)
        reference = base_manifest or (replica.get_manifest(kept[0].manifest) if kept else None)
        problem = _shape_problem(donor, reference) if reference is not None and not cross else None
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
        problem = _param_problem(method, method_params, c.params)
        if problem:
            decisions.append({"decision": "excluded", "op_id": c.op_id,
                              "detail": f"bad parameters: {problem}"})
            continue
        kept.append(c)
    section = None
    if cross and base is not None:
        from crdt_merge.resolve.cross_family import plan_section
        section, more, kept = plan_section(replica, base, kept, method_params,
                                           all_params.get("tokenizer_source"))
        decisions += more
    if not kept:
        raise PlanError("no live contribution to merge (all retracted or excluded)")
    method.validate(method_params, [c.params for c in kept])
    return MergePlan(method.name, method_params, base, tuple(kept),
                     OUT_DTYPES[dtype_name] if dtype_name else None,
                     seed if isinstance(seed, str) else None, allow,
                     tuple(decisions), recipe.id, replica.state_root(), section)
