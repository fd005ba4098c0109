"""The checkpoint folder: safetensors shards with our own headers, config, tokenizer, card.

The folder is a rendering of the output manifest. ``merge_manifest.json`` holds the plan,
the state root, the numeric profile and the manifest itself, so ``crdt-merge resolve
--plan merge_manifest.json`` re-derives the same checkpoint and checks its id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from crdt_merge.dtypes import CONFIG_NAMES
from crdt_merge.errors import PlanError
from crdt_merge.families import LAYER_COUNT_KEYS
from crdt_merge.interop.mergekit import to_yaml
from crdt_merge.store.importer import hub_repo
from crdt_merge.store.manifests import DTYPE_SIZES, Manifest
from crdt_merge.store.objects import fsync_dir
from crdt_merge.store.safetensors_io import header_bytes

DEFAULT_SHARD_SIZE = 5 * 1024**3
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def shard_layout(specs: Sequence[tuple[str, str, tuple[int, ...]]],
                 max_shard_size: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Cut tensors, in name order, into shards of at most ``max_shard_size`` data bytes (a
    tensor bigger than that gets a shard of its own)."""
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in sorted(specs):
        n = _nbytes(spec[1], spec[2])
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def prepare_files(out: Path, specs: Sequence[tuple[str, str, tuple[int, ...]]],
                  max_shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, tuple[str, int]]:
    """Create the safetensors files with their headers, sized for their data; return each
    tensor's (file path, absolute offset) for the jobs to write into."""
    shards = shard_layout(specs, max_shard_size)
    names = ([SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    where: dict[str, tuple[str, int]] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, shard in zip(names, shards, strict=True):
        prefix, offsets = header_bytes(shard, {"format": "pt"})
        path = out / file_name
        data_size = sum(_nbytes(d, s) for _, d, s in shard)
        with open(path, "wb") as f:
            f.write(prefix)
            f.truncate(len(prefix) + data_size)
        for name, _, _ in shard:
            where[name] = (str(path), offsets[name])
            weight_map[name] = file_name
        total += data_size
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return where


def sync_files(out: Path) -> None:
    for f in sorted(out.iterdir()):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(out)


def transform_config(config_bytes: bytes, out_dtype: str | None) -> bytes:
    """The config the output carries: the base's, with its dtype set to the output's."""
    config = json.loads(config_bytes)
    if out_dtype in CONFIG_NAMES:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "dtype":
                config[key] = CONFIG_NAMES[out_dtype]
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def slice_config(config_bytes: bytes, slices: Sequence[Mapping[str, Any]],
                 configs: Mapping[str, Mapping[str, Any] | None]) -> bytes:
    """The output config of a sliced merge: the reference config with its layer count set
    to the slices' total, and its ``layer_types`` (if it has one) sliced to match.

    Every layer-count key the config holds is set (``num_hidden_layers``, ``n_layer``,
    ``num_layers``; ``num_hidden_layers`` when it holds none). Output layer ``o``, from
    layer ``start + i`` of its slice's first source, takes ``layer_types[start + i]`` of
    that source model's config (``configs``, by manifest id), or of the reference config
    when the source's has none; mergekit 0.1.5 leaves ``layer_types`` as it was, which
    transformers then refuses to load when the count changed.

    Raises:
        PlanError: the reference config has ``layer_types`` and a source layer has none.
    """
    config = json.loads(config_bytes)
    total = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                for s in slices)
    keys = [k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)
            and not isinstance(config.get(k), bool)]
    for key in keys or LAYER_COUNT_KEYS[:1]:
        config[key] = total
    reference = config.get("layer_types")
    if isinstance(reference, list):
        types = []
        for spec in slices:
            src = spec["sources"][0]
            own = (configs.get(src["model"]) or {}).get("layer_types")
            table = own if isinstance(own, list) else reference
            start, end = src["layer_range"]
            if end > len(table):
                raise PlanError(f"config.json: layer_types of model {src['model']} has "
                                f"{len(table)} entries; slice layers [{start}, {end}) need more")
            types.extend(table[start:end])
        config["layer_types"] = types
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


#: decisions that describe how the plan computes (cross_family's anchor, kept tensors and
#: donor depth maps) or where a merged delta came from (its op's provenance, fixed by the
#: op id the plan names): functions of the plan, so the card may show them. The others
#: (excluded contributions, ignored retracts, recipe conflicts) depend on the op set.
PLAN_DECISIONS = ("cross_family_anchor", "kept_anchor", "cross_family_donor", "provenance")


def model_card(plan: Mapping[str, Any], plan_id: str, labels: Mapping[str, str],
               decisions: Sequence[Mapping[str, Any]] = ()) -> str:
    """The README.md of the checkpoint: the recipe and every contribution merged.

    The card is covered by the checkpoint id (specs/checkpoint.md), so it holds only what
    the plan fixes: never the checkpoint id itself, the state root, the engine version or
    the decisions (which the same plan can be reached with different ones of: an ignored
    retract, a superseded recipe); those are in ``merge_manifest.json``.
    """
    inputs = [labels.get(c["op_id"], c["label"]) for c in plan["contributions"]]
    front = {"library_name": "transformers", "base_model_relation": "merge",
             "tags": ["merge", "mergekit", "crdt-merge"]}
    repos = sorted({r for r in map(hub_repo, inputs) if r is not None})
    if repos:  # the Hub takes repo ids only: models given as local folders are left out
        front["base_model"] = repos
    lines = [
        "---", *yaml.safe_dump(front, sort_keys=True).splitlines(), "---", "",
        "# Merged model", "",
        "Resolved by crdt-merge from a replicated merge project. Every replica holding the "
        "same ops resolves this checkpoint byte for byte; `crdt-merge verify-folder` "
        "recomputes its checkpoint id from the files of this folder.",
        "", f"- plan id: `{plan_id}`",
        "- checkpoint id, state root, numeric profile and plan decisions (contributions "
        "excluded, retracts ignored, recipe conflicts): in `merge_manifest.json`",
        "", "## Recipe", "",
        f"- method: `{plan['method']}`",
        f"- parameters: `{json.dumps(plan['params'], sort_keys=True)}`",
        f"- base / anchor manifest: `{plan['base'] or '(none)'}`",
        f"- output dtype: `{plan['dtype'] or 'as the base'}`", "",
        "## Contributions (canonical order)", "",
        "| op | site | model | form | parameters |", "|---|---|---|---|---|",
    ]
    for c in plan["contributions"]:
        lines.append(f"| `{c['op_id'][:16]}` | {c['site']} | {labels.get(c['op_id'], c['label'])} "
                     f"| {c['form']} | `{json.dumps(c['params'], sort_keys=True)}` |")
    if plan.get("slices"):
        lines += _slice_lines(plan, labels)
    if plan.get("outliers"):
        lines += outlier_lines(plan, labels)
    shown = [d for d in decisions if d.get("decision") in PLAN_DECISIONS]
    if shown:
        lines += ["", "## How the plan computes", ""]
        for d in shown:
            op = f" `{d['op_id'][:16]}`" if d.get("op_id") else ""
            lines.append(f"- {d['decision']}:{op} {d.get('detail', '')}")
    lines.append("")
    return "\n".join(lines)


def outlier_lines(plan: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The card's (and ``status``'s) table of the outlier report (specs/methods.md)."""
    names = {c["op_id"]: labels.get(c["op_id"], c["label"]) for c in plan["contributions"]}
    lines = ["", "## Outlier report (task vectors, whole model)", "",
             "| op | model | norm | cosine to the others' mean | worst tensor (cosine) "
             "| flags |", "|---|---|---|---|---|---|"]
    for e in plan["outliers"]:
        worst = f"{e['worst_tensor']} ({e['worst_cosine']})" if "worst_tensor" in e else "-"
        flags = ", ".join(e["flags"]) or "-"
        lines.append(f"| `{e['op_id'][:16]}` | {names.get(e['op_id'], '(excluded)')} "
                     f"| {e['norm']} | {e['cosine']} | {worst} | {flags} |")
    if any(e["flags"] for e in plan["outliers"]):
        lines += ["", "Flagged: a norm over 3x the median of the others' (norm), or a cosine "
                  "more than 0.5 below the others' median (direction)."]
    return lines


def _slice_lines(plan: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The card's table of the slices: output layers, sources, slice parameters."""
    names: dict[str, str] = {}
    for c in plan["contributions"]:
        names.setdefault(c["manifest"], labels.get(c["op_id"], c["label"]))
    if plan["base"]:
        names.setdefault(plan["base"], "anchor")
    lines = ["", "## Slices (output layers, in order)", "",
             "| slice | output layers | sources: model `manifest` [start, end) | parameters |",
             "|---|---|---|---|"]
    produced = 0
    for k, spec in enumerate(plan["slices"]):
        first = spec["sources"][0]["layer_range"]
        length = first[1] - first[0]
        sources = ", ".join(f"{names.get(s['model'], '?')} `{s['model'][:16]}` "
                            f"[{s['layer_range'][0]}, {s['layer_range'][1]})"
                            for s in spec["sources"])
        params = json.dumps(spec.get("parameters", {}), sort_keys=True)
        lines.append(f"| {k} | [{produced}, {produced + length}) | {sources} | `{params}` |")
        produced += length
    lines += ["", f"The output model has {produced} layers."]
    return lines


MERGEKIT_CONFIG = "mergekit_config.yml"


def mergekit_config(plan: Mapping[str, Any], labels: Mapping[str, str]) -> str | None:
    """A mergekit config that reproduces the plan, or None when it does not map to one
    (slices, deltas, the cross_family method, or a seeded random method). Models are named
    by their labels (the anchor by its contribution's label, else ``anchor-<manifest>``):
    point them at the model folders to run it with ``mergekit-yaml``."""
    if (plan.get("slices") or plan.get("cross_family") or plan.get("seed")
            or any(c["form"] != "full" for c in plan["contributions"])):
        return None
    name = {c["manifest"]: labels.get(c["op_id"], c["label"]) for c in plan["contributions"]}
    base = plan["base"] or None
    base_name = (name.get(base) or f"anchor-{base[:16]}") if base else None
    params = dict(plan["params"])
    dtype = CONFIG_NAMES.get(plan["dtype"]) if plan.get("dtype") else None
    if dtype:
        params["dtype"] = dtype
    models = [(labels.get(c["op_id"], c["label"]), c["params"]) for c in plan["contributions"]]
    return ("# written by crdt-merge: the recipe of this checkpoint as a mergekit config;\n"
            "# models are named by their labels: point them at the model folders\n"
            + to_yaml(plan["method"], params, base_name, models))


def write_card(out: Path, text: str) -> None:
    """README.md, as UTF-8 bytes with ``\\n`` line ends on every platform (the checkpoint id
    covers them; no library re-renders them)."""
    (out / "README.md").write_bytes(text.encode("utf-8"))


def manifest_to_json(manifest: Manifest) -> dict[str, Any]:
    return manifest.to_wire()
