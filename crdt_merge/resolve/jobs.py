"""jobs: a plan expanded into one typed job per output tensor.

:func:`output_tensors` lists what the checkpoint holds (name, dtype, shape), and
:func:`plan_jobs` gives each output tensor its :class:`Job`: the plan itself (read by
attribute), the base and donor tensor records in canonical order (the anchor first, then
by contribution op id; never arrival order) and the place in the output file its bytes go.
A sliced plan's tensors come from :func:`sliced_tensors`, computed once per resolve from
the plan's :class:`~crdt_merge.resolve.merge_plan.SliceLayout`.

Jobs are plain frozen data: a worker thread (or process) needs nothing else. A
whole-model method (:class:`~crdt_merge.resolve.merge_plan.WholeModel`) expands its own jobs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crdt_merge.dtypes import FLOATS, out_dtype
from crdt_merge.families import layer_count
from crdt_merge.methods import OutputTensor, get_method
from crdt_merge.resolve.io import require_pieces
from crdt_merge.resolve.merge_plan import ANCHOR, JobInputs, MergePlan, slice_layout
from crdt_merge.store.adapter import AdapterTable, adapter_table
from crdt_merge.store.manifests import Manifest, TensorRecord

__all__ = ["Job", "OutputJob", "SliceInputs", "SlicedDonor", "SlicedTensor", "model_layers",
           "delta_bases", "layer_index", "output_tensors", "plan_jobs", "shared_inputs",
           "sliced_tensors", "streamable"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The layer a tensor name belongs to (``model.layers.3.mlp...`` -> 3), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class SliceInputs:
    """What a job of a sliced plan (``slices``) merges, beyond the plain job's fields.

    Attributes:
        inputs: per donor, its index in the plan's contributions, or ``ANCHOR`` (the anchor
            as one more input, for a method that ignores the base).
        sources: per donor, the name of its source tensor (per-model filters match it, as
            mergekit resolves an input's parameters under its own tensor name).
        delta_bases: per donor, the anchor tensor a delta contribution adds to (else None).
        params: the slice's ``parameters``; they win over the recipe's.
        layer: the tensor's offset in its slice; None outside the layers (``t = 0``).
        length: the slice's number of layers (None outside the layers).
    """

    inputs: tuple[int, ...]
    sources: tuple[str, ...]
    delta_bases: tuple[TensorRecord | None, ...]
    params: Mapping[str, Any]
    layer: int | None
    length: int | None


@dataclass(frozen=True)
class LoraInput:
    """One adapter module's factors: the donor is ``base + scale * B @ A`` (float64,
    specs/methods.md section 10)."""

    a: TensorRecord
    b: TensorRecord
    rank: int
    alpha: float
    rslora: bool
    transpose: bool


@dataclass(frozen=True)
class OutputJob:
    """What every job holds, whichever method expands it: the output tensor (``name``,
    ``out_dtype``, ``shape``; the runner schedules by ``shape``), the store it reads
    (a path: a worker process opens its own), where its bytes go (``path``, ``offset``,
    cut into pieces of ``piece_size``) and the model's number of layers."""

    name: str
    store: str
    out_dtype: str
    shape: tuple[int, ...]
    path: str
    offset: int
    piece_size: int
    num_layers: int


@dataclass(frozen=True)
class Job(OutputJob):
    """One output tensor of a per-tensor method: everything a worker needs."""

    plan: MergePlan
    plan_id: str
    base: TensorRecord | None
    donors: tuple[TensorRecord, ...]  # full weights or deltas, per contribution
    forms: tuple[str, ...]
    #: set for a sliced plan: then donors are per slice source, not per contribution
    sliced: SliceInputs | None = None
    #: per donor, the LoRA factors an adapter contribution adds to the base (form "lora")
    lora: tuple[LoraInput | None, ...] | None = None


@dataclass(frozen=True)
class SlicedDonor:
    """One donor of a sliced output tensor."""

    input: int  # contribution index, or ANCHOR
    record: TensorRecord
    form: str
    source: str  # the source tensor's name
    under: TensorRecord | None  # the anchor tensor a delta adds to


@dataclass(frozen=True)
class SlicedTensor:
    """One output tensor of a sliced plan with its inputs in canonical order."""

    tensor: OutputTensor
    base: TensorRecord | None
    donors: tuple[SlicedDonor, ...]

    @property
    def first(self) -> TensorRecord:
        """The input the output takes its dtype and shape from (base, else first donor)."""
        return self.base if self.base is not None else self.donors[0].record


def sliced_tensors(plan: MergePlan, manifests: Mapping[str, Manifest]) -> list[SlicedTensor]:
    """Each output tensor of a sliced plan (in output order) with its base record (the
    anchor's source, for a method that takes a base) and its donors in canonical order
    (the anchor first, then by contribution op id; never the slice's listing order). Uses
    the layout :func:`~crdt_merge.resolve.plan` computed, when the plan has it."""
    layout = plan.layout if plan.layout is not None else slice_layout(plan, manifests)
    uses_base = get_method(plan.method).base != "ignored"
    anchor = manifests[plan.base] if plan.base else None
    out = []
    for t in layout.tensors.tensors:
        base = None
        donors: list[SlicedDonor] = []
        for model, source in sorted(t.sources):
            role = layout.inputs[model]
            rec = manifests[layout.models[model]].tensors[source]
            if role == ANCHOR and uses_base:
                base = rec
                continue
            form = "full" if role == ANCHOR else plan.contributions[role].form
            under = anchor.tensors[source] if form == "delta" and anchor is not None else None
            donors.append(SlicedDonor(role, rec, form, source, under))
        out.append(SlicedTensor(t, base, tuple(donors)))
    return out


def output_tensors(plan: MergePlan, manifests: Mapping[str, Manifest],
                   sliced: Sequence[SlicedTensor] | None = None,
                   ) -> list[tuple[str, str, tuple[int, ...]]]:
    """The checkpoint's tensors ``(name, dtype, shape)``: a sliced plan's as
    :func:`sliced_tensors` lists them, else the base's (or the first contribution's)."""
    if plan.slices is not None:  # each tensor as its first input (base, else first donor)
        if sliced is None:
            sliced = sliced_tensors(plan, manifests)
        return [(s.tensor.name, out_dtype(plan.dtype, s.first.dtype), s.first.shape)
                for s in sliced]
    reference = manifests[plan.base] if plan.base else manifests[plan.contributions[0].manifest]
    return [(name, out_dtype(plan.dtype, rec.dtype), rec.shape)
            for name, rec in reference.tensors.items()]


def plan_jobs(plan: MergePlan, inputs: JobInputs,
              sliced: Sequence[SlicedTensor] | None = None) -> list[Job]:
    """One :class:`Job` per output tensor of a per-tensor method's plan.

    Raises:
        PieceMissing: a piece an input needs is not in the replica (all missing ones go on
            the wanted list).
    """
    store, manifests, shards = inputs.replica.store, inputs.manifests, inputs.shards
    plan_id = plan.id
    jobs = []
    if plan.slices is not None:
        for s in (sliced if sliced is not None else sliced_tensors(plan, manifests)):
            t, first = s.tensor, s.first
            path, offset = shards[t.name]
            jobs.append(Job(
                name=t.name, store=str(store.root), plan=plan, plan_id=plan_id,
                base=s.base, donors=tuple(d.record for d in s.donors),
                forms=tuple(d.form for d in s.donors),
                out_dtype=out_dtype(plan.dtype, first.dtype), shape=first.shape, path=path,
                offset=offset, piece_size=inputs.piece_size, num_layers=inputs.num_layers,
                sliced=SliceInputs(
                    inputs=tuple(d.input for d in s.donors),
                    sources=tuple(d.source for d in s.donors),
                    delta_bases=tuple(d.under for d in s.donors),
                    params=plan.slices[t.slice_index].get("parameters", {}),
                    layer=t.layer_index, length=t.num_layers),
            ))
        require_pieces(store, [r for j in jobs for r in (j.base, *j.donors, *delta_bases(j))])
        return jobs
    base = manifests[plan.base] if plan.base else None
    reference = base or manifests[plan.contributions[0].manifest]
    # an adapter's delta is materialised from its factors before the method runs: its input
    # is then a full fine-tune of the base (specs/methods.md section 10)
    tables = {c.manifest: adapter_table(manifests[c.manifest], base)
              for c in plan.contributions if c.form == "adapter"}
    for name, rec in reference.tensors.items():
        path, offset = shards[name]
        given = [_donor_input(c, name, manifests, base, tables) for c in plan.contributions]
        jobs.append(Job(
            name=name, store=str(store.root), plan=plan, plan_id=plan_id,
            base=base.tensors[name] if base else None,
            donors=tuple(d[0] for d in given), forms=tuple(d[1] for d in given),
            out_dtype=out_dtype(plan.dtype, rec.dtype), shape=rec.shape, path=path,
            offset=offset, piece_size=inputs.piece_size, num_layers=inputs.num_layers,
            lora=tuple(d[2] for d in given) if tables else None,
        ))
    require_pieces(store, [r for j in jobs for r in (j.base, *j.donors, *_factors(j))])
    return jobs


def _factors(job: Job) -> list[TensorRecord]:
    return [r for lora in (job.lora or ()) if lora is not None for r in (lora.a, lora.b)]


def _donor_input(c: Any, name: str, manifests: Mapping[str, Manifest], base: Manifest | None,
                 tables: Mapping[str, AdapterTable]) -> tuple[TensorRecord, str, LoraInput | None]:
    """One contribution's input to output tensor ``name``: (record, form, LoRA factors).
    An adapter's input is the base's tensor plus its module's delta (form ``lora``), its
    replacement (``modules_to_save``), or the base's tensor unchanged."""
    if c.form != "adapter":
        return manifests[c.manifest].tensors[name], c.form, None
    assert base is not None  # the plan keeps adapters only with their base
    adapter, table = manifests[c.manifest], tables[c.manifest]
    if name in table.replace:
        return adapter.tensors[table.replace[name]], "full", None
    mod = table.lora.get(name)
    if mod is None:
        return base.tensors[name], "full", None
    return base.tensors[name], "lora", LoraInput(adapter.tensors[mod.a], adapter.tensors[mod.b],
                                                 mod.rank, mod.alpha, mod.rslora, mod.transpose)


def delta_bases(job: Job) -> Sequence[TensorRecord | None]:
    """Per donor, the tensor a delta contribution adds to (the base, unless sliced)."""
    return job.sliced.delta_bases if job.sliced is not None else (job.base,) * len(job.donors)


def shared_inputs(job: Job, uses_base: bool) -> list[TensorRecord]:
    """The base (when the method takes it) and the tensors deltas add to, each once."""
    shared: list[TensorRecord] = []
    for rec, form in zip(delta_bases(job), job.forms, strict=True):
        if form == "delta" and rec is not None and rec not in shared:
            shared.append(rec)
    if uses_base and job.base is not None and job.base not in shared:
        shared.append(job.base)
    return shared


def streamable(job: Job) -> bool:
    """Whether the job can merge a piece at a time: a method with a raw kernel, float
    inputs of the output's shape, and a piece size every dtype's chunk divides."""
    method = get_method(job.plan.method)
    if method.raw_kernel is None or job.out_dtype not in FLOATS or "lora" in job.forms:
        return False
    records = [*job.donors, *shared_inputs(job, method.base != "ignored")]
    return (numel(job.shape) > 0 and job.piece_size % 8 == 0 and bool(records)
            and all(r.dtype in FLOATS and tuple(r.shape) == tuple(job.shape) for r in records))


def numel(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    return n


def model_layers(config: Mapping[str, Any] | None, names: Sequence[str]) -> int:
    """The number of layers layer gradients run over (``t = layer / (L - 1)``): the
    reference config's (:func:`crdt_merge.families.layer_count`), else one more than the
    highest layer index in the tensor names, else 1."""
    count = layer_count(config, names) if config else None
    if count is not None:
        return count
    found = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(found) + 1 if found else 1
