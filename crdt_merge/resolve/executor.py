"""executor: a plan executed into a checkpoint folder, and a recorded one re-derived.

:func:`execute` reads the plan's input manifests, lays out the output files
(:mod:`~crdt_merge.resolve.output`), expands the plan into jobs (a whole-model method's
own, else one per-tensor :class:`~crdt_merge.resolve.jobs.Job` per output tensor), runs
them (:mod:`~crdt_merge.resolve.runner`) and writes the model card and
``merge_manifest.json``. The checkpoint id covers every byte of the folder but
``merge_manifest.json`` (:mod:`~crdt_merge.resolve.checkpoint`, specs/checkpoint.md).
:func:`resolve` is :func:`~crdt_merge.resolve.plan` then :func:`execute`;
:func:`resolve_recorded` re-derives a recorded checkpoint and checks its id.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdt_merge.errors import OutputExists, PieceCorrupt, PieceMissing, PlanError
from crdt_merge.replica import Replica
from crdt_merge.resolve import output
from crdt_merge.resolve.checkpoint import MANIFEST_FILE, check_folder, checkpoint_manifest
from crdt_merge.resolve.jobs import model_layers, output_tensors, plan_jobs, sliced_tensors
from crdt_merge.resolve.merge_plan import JobInputs, MergePlan, plan, whole_model
from crdt_merge.resolve.profile import numeric_profile
from crdt_merge.resolve.runner import run_jobs
from crdt_merge.store.importer import read_file
from crdt_merge.store.manifests import Manifest, TensorRecord
from crdt_merge.store.objects import fsync_dir

__all__ = ["Resolved", "execute", "resolve", "resolve_recorded"]


@dataclass(frozen=True)
class Resolved:
    checkpoint_id: str
    plan_id: str
    state_root: str
    out: Path
    plan: MergePlan

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint_id": self.checkpoint_id, "plan_id": self.plan_id,
                "state_root": self.state_root, "out": str(self.out),
                "numeric_profile": numeric_profile(self.plan.method),
                "contributions": len(self.plan.contributions),
                "decisions": [dict(d) for d in self.plan.decisions]}


def execute(replica: Replica, the_plan: MergePlan, out: str | Path, *,
            workers: int | None = None,
            max_shard_size: int = output.DEFAULT_SHARD_SIZE) -> Resolved:
    """Compute ``the_plan`` from the replica's store into the folder ``out`` (replaced).
    When it fails (a corrupt or missing piece, say), nothing is left behind: no ``out``,
    no partial folder."""
    out = Path(out)
    try:
        return _execute(replica, the_plan, out, workers=workers, max_shard_size=max_shard_size)
    except OutputExists:
        raise  # raised before anything was written; a partial folder there is not ours
    except BaseException:
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
        raise


def _execute(replica: Replica, the_plan: MergePlan, out: Path, *, workers: int | None,
             max_shard_size: int) -> Resolved:
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                             and not (out / MANIFEST_FILE).is_file())):
        raise OutputExists(str(out))  # never replace a folder resolve did not write
    store = replica.store
    ids = ([the_plan.base] if the_plan.base else []) + [c.manifest for c in the_plan.contributions]
    manifests = {m: replica.get_manifest(m) for m in ids}
    # config, tokenizer and other files: the anchor's, else (slices) the first slice's
    # first source's, the model the embeddings come from, else the first contribution's
    reference_id = the_plan.base or (the_plan.slices[0]["sources"][0]["model"]
                                     if the_plan.slices else the_plan.contributions[0].manifest)
    reference = manifests[reference_id]

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sliced = sliced_tensors(the_plan, manifests) if the_plan.slices is not None else None
    specs = output_tensors(the_plan, manifests, sliced)
    files: dict[str, bytes] = {}
    for name, rec in sorted(reference.files.items()):
        files[name] = read_file(store, rec)
    config = json.loads(files["config.json"]) if "config.json" in files else None
    if "config.json" in files:
        files["config.json"] = output.transform_config(files["config.json"], the_plan.dtype)
        if the_plan.slices is not None:
            sources = _configs(store, manifests) if "layer_types" in (config or {}) else {}
            files["config.json"] = output.slice_config(files["config.json"], the_plan.slices,
                                                       sources)
    where = output.prepare_files(tmp, specs, max_shard_size)
    inputs = JobInputs(replica, manifests, where, replica.piece_size,
                       model_layers(config, [s[0] for s in specs]))
    whole = whole_model(the_plan.method)
    own = whole.plan_jobs(the_plan, inputs) if whole is not None else None
    if whole is not None and own is not None:
        pieces = run_jobs(own, workers, whole.run_job, processes=whole.processes)
    else:
        jobs = plan_jobs(the_plan, inputs, sliced)
        try:
            pieces = run_jobs(jobs, workers)
        except (PieceCorrupt, PieceMissing) as exc:  # read on a worker thread: index here
            store.index.want([exc.piece_id])
            raise

    tensors = {name: TensorRecord(dtype, shape, tuple(pieces[name])) for name, dtype, shape in specs}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    labels = {c.op_id: c.label for c in the_plan.contributions}
    output.write_card(tmp, output.model_card(the_plan.to_wire(), the_plan.id, labels,
                                                  the_plan.decisions))
    config_yml = output.mergekit_config(the_plan.to_wire(), labels)
    if config_yml is not None:
        (tmp / output.MERGEKIT_CONFIG).write_text(config_yml)
    # the id covers every file written so far, byte for byte (specs/checkpoint.md)
    manifest = checkpoint_manifest(tmp, replica.piece_size, tensors)
    checkpoint_id = manifest.id
    record = {
        "checkpoint_id": checkpoint_id, "plan_id": the_plan.id,
        "state_root": the_plan.state_root, "recipe_op": the_plan.recipe_op,
        "numeric_profile": numeric_profile(the_plan.method), "plan": the_plan.to_wire(),
        "decisions": [dict(d) for d in the_plan.decisions],
        "manifest": output.manifest_to_json(manifest), "max_shard_size": max_shard_size,
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    output.sync_files(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    fsync_dir(out.parent)  # the rename itself, or a power cut could leave no folder
    return Resolved(checkpoint_id, the_plan.id, the_plan.state_root, out, the_plan)


def _configs(store: Any, manifests: dict[str, Manifest]) -> dict[str, Any]:
    """Each input model's parsed config.json (None when it has none or it is unreadable)."""
    out: dict[str, Any] = {}
    for model_id, manifest in manifests.items():
        rec = manifest.files.get("config.json")
        try:
            out[model_id] = json.loads(read_file(store, rec)) if rec is not None else None
        except ValueError:
            out[model_id] = None
    return out


def resolve(replica: Replica, out: str | Path, *, workers: int | None = None,
            max_shard_size: int = output.DEFAULT_SHARD_SIZE) -> Resolved:
    """Plan and execute the replica's current state into ``out``."""
    return execute(replica, plan(replica), out, workers=workers, max_shard_size=max_shard_size)


def resolve_recorded(replica: Replica, manifest_file: str | Path, out: str | Path, *,
                     workers: int | None = None) -> Resolved:
    """Re-derive a checkpoint from its ``merge_manifest.json``, check its id, and check the
    folder the record lies in (the user's files) against it.

    Raises:
        PlanError: the recorded plan does not hash to its plan id; the re-derived checkpoint
            id differs from the recorded one (another numeric profile, or a tampered
            record); or the user's folder holds files that do not hash to the re-derived
            id (the message names them; the re-derived copy in ``out`` is the right one).
    """
    manifest_file = Path(manifest_file)
    try:
        record = json.loads(manifest_file.read_bytes())
        the_plan = MergePlan.from_wire(record["plan"], tuple(record.get("decisions", ())),
                                       record.get("recipe_op", ""), record.get("state_root", ""))
        recorded_plan_id, recorded_id = record["plan_id"], record["checkpoint_id"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PlanError(f"{manifest_file}: not a merge_manifest.json written by resolve "
                        f"({type(exc).__name__}: {str(exc)[:120]})") from None
    if the_plan.id != recorded_plan_id:
        raise PlanError(f"{manifest_file}: the plan hashes to {the_plan.id}, "
                        f"not the recorded {recorded_plan_id}")
    shard = record.get("max_shard_size", output.DEFAULT_SHARD_SIZE)
    if not isinstance(shard, int) or isinstance(shard, bool) or shard < 1:
        raise PlanError(f"{manifest_file}: max_shard_size {shard!r} is not a positive integer")
    result = execute(replica, the_plan, out, workers=workers, max_shard_size=shard)
    if result.checkpoint_id != recorded_id:
        same = record.get("numeric_profile") == numeric_profile(the_plan.method)
        raise PlanError(f"re-derived checkpoint {result.checkpoint_id} differs from the recorded "
                        f"{recorded_id}"
                        + ("" if same else " (different numeric profile)"))
    folder = manifest_file.parent
    if manifest_file.name == MANIFEST_FILE and folder.resolve() != Path(out).resolve() and any(
            f.name != MANIFEST_FILE for f in folder.iterdir()):
        check = check_folder(folder, expect=result.checkpoint_id)
        if not check.ok:
            raise PlanError(f"{folder} is not the checkpoint its record names: "
                            + "; ".join(check.problems)
                            + f". The re-derived checkpoint {result.checkpoint_id} is in {out}")
    return result
