"""The ``cross_family`` resolve method: donors of other architecture families into an anchor.

A registered whole-model method (:class:`~crdt_merge.resolve.merge_plan.WholeModel`, the object
:data:`CROSS_FAMILY`). ``plan`` calls :func:`plan_section`, which reads each model's config.json from the store,
detects its family, maps the anchor's layers onto each donor's (the depth map), and decides
per role whether it is merged or keeps the anchor's tensor (compatibility classes, the
tokenizer policy, 1-D tensors). The result goes into the plan's wire form, so the plan id
covers it, and into the plan's decisions, so the model card lists it.

``execute`` calls :func:`plan_jobs` (which takes each model's family from the plan's
section, by name, rather than detecting it again) and runs :func:`run_job` per anchor
tensor, in worker processes: the anchor
tensor is split into its canonical parts (fused tensors), each merged matrix part gets its
donors' depth-mapped canonical tensors (split out of their own fused tensors) and
:func:`crdt_merge.families.align.merge_matrix`, and the parts are joined back and rounded
once. The output has the anchor's architecture, names, shapes, config and tokenizer.
Memory per job: the anchor tensor, one native tensor per donor (both widened to float64),
their Gram matrices (min(m, n) squared) and one factorisation's workspace; never the
model. specs/cross-family.md is normative.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crdt_merge.dtypes import out_dtype
from crdt_merge.errors import BadParameter, ModelImportError, PlanError
from crdt_merge.families import Family, detect, get_family, parse_name, role_of
from crdt_merge.families.align import depth_map, merge_matrix
from crdt_merge.families.canonical import ROLE_ATTRIBUTES
from crdt_merge.families.fused import join, split
from crdt_merge.hashing import digest
from crdt_merge.lazy import torch
from crdt_merge.methods.cross_family_params import METHOD, NAME, effective_params
from crdt_merge.methods.params import resolve_param
from crdt_merge.numeric import round_to
from crdt_merge.replica import Replica
from crdt_merge.resolve.io import open_store, write_output
from crdt_merge.resolve.jobs import OutputJob, layer_index
from crdt_merge.resolve.merge_plan import (
    Contribution,
    JobInputs,
    MergePlan,
    Section,
    register_whole_model,
)
from crdt_merge.store.importer import read_file
from crdt_merge.store.manifests import Manifest, TensorRecord
from crdt_merge.store.tensors import load_tensor, torch_dtype

__all__ = ["ALIGN_VERSION", "CROSS_FAMILY", "NAME", "CrossJob", "CrossSection", "plan_jobs",
           "plan_section", "run_job"]

#: the version of the formulas in specs/cross-family.md; part of every cross-family plan id
#: (2: the Gram route, squared noise floor, inverse iteration for the kept vectors)
ALIGN_VERSION = 2
#: the roles whose weight matrices are merged; every other tensor is the anchor's
ATTN_ROLES = ("attn_q", "attn_k", "attn_v", "attn_o")
MLP_ROLES = ("mlp_gate", "mlp_up", "mlp_down")
MERGED_ROLES = ATTN_ROLES + MLP_ROLES
#: attributes that only multiply a matrix's effect by a positive scalar; merge_matrix is
#: invariant to a donor's scale (the Procrustes scale absorbs it), so they never block a merge
SCALAR_ATTRIBUTES = frozenset({"attn_scale", "residual_scale", "logit_scale", "embed_scale"})
#: recipe switch -> (attribute, the roles where it is ignored when the switch is on)
RELAXATIONS = {
    "relax_activation": ("activation", frozenset(MLP_ROLES)),
    "relax_qk_norm": ("qk_norm", frozenset({"attn_q", "attn_k"})),
}
TOKENIZER_POLICIES = ("anchor", "base")


@dataclass(frozen=True)
class ModelInfo:
    """One model as the cross-family plan sees it, read from its manifest."""

    family: Family
    config: dict[str, Any]
    layers: dict[str, int]
    classes: dict[str, dict[str, Any]]
    canonical: dict[str, tuple[str, int]]  # canonical name -> (native name, part index)
    matched: dict[str, tuple[Any, str | None]]  # native name -> (rule, layer)

    def data_digest(self) -> str:
        spec = dataclasses.asdict(self.family.spec)
        return digest(json.dumps(spec, sort_keys=True, default=sorted).encode())


def model_info(replica: Replica, manifest: Manifest, family: Family | None = None) -> ModelInfo:
    """Detect a stored model's family (or take ``family``, as the plan recorded it) and map
    its names (no tensor is read).

    Raises:
        ModelImportError: no config.json, or no supported family fits the model.
    """
    if "config.json" not in manifest.files:
        raise ModelImportError("the model has no config.json, so its family is unknown")
    try:
        config = json.loads(read_file(replica.store, manifest.files["config.json"]))
    except json.JSONDecodeError as exc:
        raise ModelImportError(f"its config.json is not valid JSON ({exc})") from None
    if family is None:
        family = detect(config, manifest.tensors)
    names = family.match_names(manifest.tensors)
    canonical: dict[str, tuple[str, int]] = {}
    for native, (rule, layer) in sorted(names.matched.items()):
        for index, name in enumerate(rule.canonical_names(layer)):
            canonical[name] = (native, index)
    roles = {role_of(n) for n in canonical}
    return ModelInfo(family, config, family.layers(config), family.classes(config, roles),
                     canonical, dict(names.matched))


def _compared(role: str, params: Mapping[str, Any]) -> list[str]:
    ignored = set(SCALAR_ATTRIBUTES)
    for switch, (attribute, roles) in RELAXATIONS.items():
        if params.get(switch) in (True, "true") and role in roles:
            ignored.add(attribute)
    return [a for a in ROLE_ATTRIBUTES[role] if a not in ignored]


def _role_verdict(role: str, anchor: ModelInfo, donor: ModelInfo,
                  params: Mapping[str, Any]) -> tuple[str, str]:
    """("merged", "") or (reason code, detail) for one role of one donor."""
    theirs = donor.classes.get(role)
    if theirs is None:
        return "absent", f"the {donor.family.name} donor has no {role} tensors"
    ours = anchor.classes[role]
    differ = [a for a in _compared(role, params) if ours.get(a) != theirs.get(a)]
    if differ:
        shown = ", ".join(f"{a} (anchor {_show(ours.get(a))}, donor {_show(theirs.get(a))})"
                          for a in differ)
        return "class", f"compatibility classes differ on {shown}"
    return "merged", ""


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def plan_section(replica: Replica, anchor_id: str | None, contributions: Sequence[Contribution],
                 method_params: Mapping[str, Any], recipe: Mapping[str, Any]) -> Section:
    """Decide the cross-family merge: the wire section, the decisions and the kept
    contributions.

    Args:
        replica: where the manifests and config files are.
        anchor_id: the anchor's manifest id.
        contributions: the live contributions in canonical order.
        method_params: the recipe's method parameters (a preset and overrides).
        recipe: all the recipe's parameters (``tokenizer_source``, if any).

    Raises:
        PlanError: no anchor, or the anchor's family is unknown.
        BadParameter: a bad preset or parameter, or a tokenizer policy other than the anchor's.
    """
    if anchor_id is None:
        raise PlanError(f"method {NAME} needs a base model: give the recipe an anchor")
    tokenizer_source = recipe.get("tokenizer_source")
    if tokenizer_source is not None and tokenizer_source not in TOKENIZER_POLICIES:
        raise BadParameter(f"{NAME} keeps the anchor's tokenizer, embeddings and lm_head; "
                           f"tokenizer_source {tokenizer_source!r} is not supported")
    params = effective_params(method_params)
    try:
        anchor = model_info(replica, replica.get_manifest(anchor_id))
    except ModelImportError as exc:
        raise PlanError(f"{NAME} needs an anchor of a supported family: {exc.detail}") from None
    roles = [r for r in MERGED_ROLES if r in anchor.classes]
    decisions: list[dict[str, Any]] = [
        {"decision": "cross_family_anchor",
         "detail": f"anchor family {anchor.family.name}, layers {_layers(anchor.layers)}"},
        {"decision": "kept_anchor", "role": "embed, lm_head",
         "detail": "embed, lm_head: tokenizer policy: the anchor's tokenizer, vocabulary, "
                   "embeddings and lm_head are kept"},
        {"decision": "kept_anchor", "role": "other",
         "detail": f"norms, biases and every other tensor: {NAME} merges only the weight "
                   f"matrices of {', '.join(MERGED_ROLES)}"},
    ]
    donors: list[dict[str, Any]] = []
    kept: list[Contribution] = []
    for c in contributions:
        if c.form != "full":
            decisions.append({"decision": "excluded", "op_id": c.op_id,
                              "detail": f"{NAME} merges full donor models, not deltas"})
            continue
        try:
            info = model_info(replica, replica.get_manifest(c.manifest))
        except ModelImportError as exc:
            decisions.append({"decision": "excluded", "op_id": c.op_id,
                              "detail": f"donor family unknown: {exc.detail}"})
            continue
        entry = _donor_entry(c.op_id, anchor, info, roles, params, decisions)
        donors.append(entry)
        kept.append(c)
    section = {"v": ALIGN_VERSION, "params": params,
               "anchor": {"family": anchor.family.name, "layers": anchor.layers,
                          "data": anchor.data_digest()},
               "donors": donors}
    return Section(section, decisions, kept)


def _layers(layers: Mapping[str, int]) -> str:
    return ", ".join(f"{stack} {n}" for stack, n in sorted(layers.items())) or "none"


def _donor_entry(op_id: str, anchor: ModelInfo, info: ModelInfo, roles: Sequence[str],
                 params: Mapping[str, Any], decisions: list[dict[str, Any]]) -> dict[str, Any]:
    stacks: dict[str, str] = {}
    depth: dict[str, list[int]] = {}
    for stack, count in sorted(anchor.layers.items()):
        theirs = stack if stack in info.layers else (
            next(iter(info.layers)) if len(info.layers) == 1 else None)
        if theirs is not None:
            stacks[stack] = theirs
            depth[stack] = depth_map(count, info.layers[theirs])
    merged: list[str] = []
    kept: dict[str, str] = {}
    missing: dict[str, list[int]] = {}
    for role in roles:
        code, detail = _role_verdict(role, anchor, info, params)
        if code == "merged":
            gaps = _missing_layers(role, anchor, info, stacks, depth)
            if gaps is None:
                code, detail = "stack", "the donor has no layer stack to map this role onto"
            elif gaps:
                missing[role] = gaps
        if code == "merged":
            merged.append(role)
        else:
            kept[role] = code
            decisions.append({"decision": "kept_anchor", "op_id": op_id, "role": role,
                              "detail": f"{role}: {detail}"})
    maps = "; ".join(f"{s} {anchor.layers[s]} -> {info.layers[stacks[s]]}: {depth[s]}"
                     for s in sorted(depth))
    decisions.append({"decision": "cross_family_donor", "op_id": op_id,
                      "detail": f"family {info.family.name}; depth map {maps or 'none'}; "
                                f"merged roles: {', '.join(merged) or 'none'}"
                                + "".join(f"; {r} lacks donor layers {g}"
                                          for r, g in sorted(missing.items()))})
    return {"op_id": op_id, "family": info.family.name, "data": info.data_digest(),
            "layers": info.layers, "stacks": stacks, "depth": depth, "merged": merged,
            "kept": kept, "missing": missing}


def _missing_layers(role: str, anchor: ModelInfo, info: ModelInfo, stacks: Mapping[str, str],
                    depth: Mapping[str, list[int]]) -> list[int] | None:
    """Anchor layers whose mapped donor layer lacks this role's weight (None: no stack)."""
    gaps: list[int] = []
    seen = False
    for name in anchor.canonical:
        key = parse_name(name)
        if key.role != role or key.param != "weight" or key.layer is None:
            continue
        if key.stack not in stacks:
            continue
        seen = True
        theirs = f"{stacks[key.stack]}.layers.{depth[key.stack][key.layer]}.{role}.weight"
        if theirs not in info.canonical:
            gaps.append(key.layer)
    return sorted(gaps) if seen else None


# -- execution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One donor's tensor for one anchor part: a native tensor and which part of it."""

    op_id: str
    weight: Any  # the raw parameter value (scalar, gradient or filtered list)
    native: str
    record: TensorRecord
    op: Mapping[str, Any] | None
    dims: Mapping[str, int]
    index: int


@dataclass(frozen=True)
class Part:
    name: str  # canonical
    role: str
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class CrossJob(OutputJob):
    """One output tensor of a cross-family merge: everything a worker needs, picklable."""

    anchor: TensorRecord
    op: Mapping[str, Any] | None
    dims: Mapping[str, int]
    parts: tuple[Part, ...]
    params: Mapping[str, Any]
    global_weight: Any


@dataclass(frozen=True)
class DonorEntry:
    """One donor of the plan's cross-family section, as execution reads it."""

    op_id: str
    family: str
    data: str  # the digest of its family's data
    stacks: Mapping[str, str]  # anchor stack -> donor stack
    depth: Mapping[str, Sequence[int]]  # anchor stack -> donor layer per anchor layer
    merged: frozenset[str]  # the roles merged


@dataclass(frozen=True)
class CrossSection:
    """The plan's cross-family section (its wire form is what :func:`plan_section` wrote
    and the plan id covers), read into typed fields for execution."""

    params: Mapping[str, Any]
    family: str  # the anchor's
    data: str
    donors: tuple[DonorEntry, ...]

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any] | None) -> CrossSection:
        """Raises:
            PlanError: no section, another version, or one of another shape."""
        if not wire or wire.get("v") != ALIGN_VERSION:
            raise PlanError(f"this plan has no {NAME} section of version {ALIGN_VERSION}")
        try:
            donors = tuple(DonorEntry(str(d["op_id"]), str(d["family"]), str(d["data"]),
                                      dict(d["stacks"]), dict(d["depth"]),
                                      frozenset(d["merged"])) for d in wire["donors"])
            return cls(dict(wire["params"]), str(wire["anchor"]["family"]),
                       str(wire["anchor"]["data"]), donors)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"this plan's {NAME} section is malformed ({exc!r})") from None


def _recorded(replica: Replica, manifest: Manifest, family_name: str, data: str) -> ModelInfo:
    """A model's names mapped by the family its plan section records (not detected again).

    Raises:
        PlanError: that family is unknown here, or its data differs from the plan's.
    """
    family = get_family(family_name)
    info = model_info(replica, manifest, family)
    if info.data_digest() != data:
        raise PlanError(f"{NAME}: the data of family {family.name} differs from the plan's "
                        "(another crdt-merge version?)")
    return info


def plan_jobs(plan: MergePlan, inputs: JobInputs) -> list[CrossJob]:
    """One job per anchor tensor, with each merged part's donor sources (from the plan's
    cross-family section, so a recorded plan re-executes exactly)."""
    section = CrossSection.from_wire(plan.section)
    if plan.base is None:
        raise PlanError(f"method {NAME} needs a base model: give the recipe an anchor")
    replica, manifests, shards = inputs.replica, inputs.manifests, inputs.shards
    piece_size, num_layers = inputs.piece_size, inputs.num_layers
    anchor_manifest = manifests[plan.base]
    anchor = _recorded(replica, anchor_manifest, section.family, section.data)
    donors = []
    for c, entry in zip(plan.contributions, section.donors, strict=True):
        if entry.op_id != c.op_id:
            raise PlanError(f"this plan's {NAME} section lists donor {entry.op_id}, not "
                            f"contribution {c.op_id}")
        info = _recorded(replica, manifests[c.manifest], entry.family, entry.data)
        donors.append((c, entry, info, manifests[c.manifest], info.family.dims(info.config)))
    anchor_dims = anchor.family.dims(anchor.config)
    params = dict(section.params)
    jobs = []
    for name, rec in anchor_manifest.tensors.items():
        out = out_dtype(plan.dtype, rec.dtype)
        op = None
        parts: list[Part] = []
        if name in anchor.matched:
            rule, layer = anchor.matched[name]
            op = rule.op
            for cname in rule.canonical_names(layer):
                key = parse_name(cname)
                sources = []
                if key.role in MERGED_ROLES and key.param == "weight" and key.layer is not None:
                    for c, entry, info, manifest, dims in donors:
                        if key.role not in entry.merged or key.stack not in entry.stacks:
                            continue
                        theirs = (f"{entry.stacks[key.stack]}.layers."
                                  f"{entry.depth[key.stack][key.layer]}.{key.role}.weight")
                        if theirs not in info.canonical:
                            continue
                        native, index = info.canonical[theirs]
                        rule_d, _ = info.matched[native]
                        sources.append(Source(c.op_id, c.params.get("weight"), native,
                                              manifest.tensors[native], rule_d.op, dims, index))
                parts.append(Part(cname, key.role, tuple(sources)))
        path, offset = shards[name]
        jobs.append(CrossJob(
            name=name, store=str(replica.store.root), out_dtype=out, shape=rec.shape,
            path=path, offset=offset, piece_size=piece_size, num_layers=num_layers,
            anchor=rec, op=op, dims=anchor_dims, parts=tuple(parts), params=params,
            global_weight=plan.params.get("weight")))
    return jobs


def _option(params: Mapping[str, Any], key: str, job: CrossJob, layer: int | None) -> Any:
    value = resolve_param(params[key], job.name, layer, job.num_layers)
    if value is None:
        raise BadParameter(f"{NAME}: no value of {key!r} applies to tensor {job.name}")
    return METHOD.param(key).coerce(value, f"{NAME} tensor {job.name}")


def _weight(source: Source, job: CrossJob, layer: int | None) -> float:
    for raw in (source.weight, job.global_weight):
        if raw is not None:
            value = resolve_param(raw, job.name, layer, job.num_layers)
            if value is not None:
                return float(METHOD.param("weight").coerce(value, f"{NAME} tensor {job.name}"))
    return 1.0


def merge_parts(job: CrossJob, load: Any) -> torch.Tensor:
    """The merged anchor tensor in float64 (``load(record, dtype)`` reads a tensor)."""
    anchor = load(job.anchor, torch.float64)
    parts = [anchor] if job.op is None else split(job.op, job.name, anchor, job.dims)
    layer = layer_index(job.name)
    cache: dict[tuple[str, str], list[torch.Tensor]] = {}
    for p, part in enumerate(job.parts):
        if not part.sources:
            continue
        tau = _option(job.params, "tau_attn" if part.role in ATTN_ROLES else "tau_ffn", job, layer)
        tensors, weights = [], []
        for s in part.sources:
            key = (s.op_id, s.native)
            if key not in cache:
                native = load(s.record, torch.float64)
                cache[key] = [native] if s.op is None else split(s.op, s.native, native, s.dims)
            tensors.append(cache[key][s.index])
            weights.append(_weight(s, job, layer))
        parts[p] = merge_matrix(parts[p], tensors, weights, tau=float(tau),
                                k=int(_option(job.params, "top_k", job, layer)),
                                beta=float(_option(job.params, "beta", job, layer))).out
    return parts[0] if job.op is None else join(job.op, job.name, parts, job.dims)


def run_job(job: CrossJob) -> tuple[str, list[str]]:
    """Compute one output tensor, write it at its place in the output file, return its
    piece ids. One torch thread: MKL's bits depend on the thread count."""
    torch.set_num_threads(1)
    store = open_store(job.store)

    def load(record: TensorRecord, dtype: torch.dtype | None = None) -> torch.Tensor:
        return load_tensor(store, record, dtype)

    if any(p.sources for p in job.parts):
        out = round_to(merge_parts(job, load), torch_dtype(job.out_dtype))
    elif job.out_dtype != job.anchor.dtype:
        out = round_to(load(job.anchor, torch.float64), torch_dtype(job.out_dtype))
    else:
        out = load(job.anchor)  # the anchor's own bytes
    return job.name, write_output(out, job.path, job.offset, job.piece_size)


@dataclass(frozen=True)
class _CrossFamily:
    """The resolve side of ``cross_family`` (:class:`~crdt_merge.resolve.merge_plan.WholeModel`)."""

    name: str = NAME
    same_shapes: bool = False  # donors of other families have other names and shapes
    processes: bool = True  # each worker its own torch and LAPACK state
    adapters: bool = False  # the plan excludes adapter contributions by name

    @property
    def run_job(self) -> Any:
        return run_job

    def plan_section(self, replica: Replica, base: str | None,
                     contributions: Sequence[Contribution], params: Mapping[str, Any],
                     recipe: Mapping[str, Any]) -> Section:
        return plan_section(replica, base, contributions, params, recipe)

    def plan_jobs(self, plan: MergePlan, inputs: JobInputs) -> list[CrossJob]:
        return plan_jobs(plan, inputs)


CROSS_FAMILY = register_whole_model(_CrossFamily())
