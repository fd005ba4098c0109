"""``crdt-merge merge CONFIG.yml OUT``: a drop-in for ``mergekit-yaml``.

The same YAML; the replicated machinery underneath: a replica of this machine's own in a
cache folder (one per config), the config's models contributed and its recipe set there
(:mod:`crdt_merge.cli.mergekit_yaml`), then a resolve into ``OUT``. It prints the
checkpoint id, which is the one a replicated project with the same models and recipe
resolves. A repeat is instant: the models' pieces are already stored, the ops already
written, and an ``OUT`` that already holds this plan's checkpoint is left as it is.

mergekit-yaml's options are taken: honoured where they make sense
(``--copy-tokenizer/--no-copy-tokenizer``, ``--out-shard-size`` in parameters per shard
(``5B``), ``--quiet``, ``-j/--num-threads``, ``--transformers-cache``), accepted with a note
where they change nothing here (``--cuda``, ``--lazy-unpickle``, ``--low-cpu-memory``, the
GPU and writer options, ``--trust-remote-code``: this engine computes on the CPU in float64,
reads safetensors lazily and runs no model code), and refused by name where they would
change what is written (``--allow-crimes``: different architectures merge through the
``cross_family`` method; ``--no-write-model-card``, ``--no-safe-serialization``,
``--random-seed``, ``--unsafe-truncate-embeddings``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from crdt_merge.cli import progress
from crdt_merge.cli.render import warn
from crdt_merge.dtypes import RECIPE_DTYPES, SIZES
from crdt_merge.errors import BadParameter, NotAReplica, PlanError
from crdt_merge.hashing import digest
from crdt_merge.interop.mergekit import load
from crdt_merge.replica import Replica

SITE = "local"
#: what ``--no-copy-tokenizer`` leaves out: the tokenizer files mergekit copies (with
#: ``generation_config.json``, which it copies with them), and the other tokenizer files
#: the importer keeps (vocab.txt, spiece.model)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json", "vocab.txt", "spiece.model")
BYTES = {name: SIZES[st] for name, st in RECIPE_DTYPES.items()}  # crdt_merge/dtypes.py


def cache_root() -> Path:
    """``$CRDT_MERGE_CACHE``, else ``$XDG_CACHE_HOME/crdt-merge``, else ``~/.cache/crdt-merge``."""
    if os.environ.get("CRDT_MERGE_CACHE"):
        return Path(os.environ["CRDT_MERGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "crdt-merge"


def _replica_for(config_path: str, cache: str | None) -> Replica:
    """The cache replica of one config file (by its absolute path)."""
    key = digest(str(Path(config_path).resolve()).encode())[:24]
    where = Path(cache) if cache else cache_root() / "merge" / key
    try:
        return Replica.open(where)
    except NotAReplica:
        pass
    where.parent.mkdir(parents=True, exist_ok=True)
    return Replica.create(where, site=SITE, name=f"merge {Path(config_path).name}")


def cmd_merge(args: Any) -> tuple[int, Any]:
    from crdt_merge.cli import commands
    from crdt_merge.cli.mergekit_yaml import apply_draft
    from crdt_merge.resolve import execute, plan
    from crdt_merge.resolve.checkpoint_cache import Checkpoints

    notes = []
    if args.allow_crimes:
        raise BadParameter("--allow-crimes: merging different architectures with an ordinary "
                           "method is refused; set `merge_method: cross_family` instead, which "
                           "aligns them tensor by tensor")
    for flag, refused, why in (
            ("--no-write-model-card", not args.write_model_card,
             "the model card is part of the checkpoint (its id covers it)"),
            ("--no-safe-serialization", not args.safe_serialization,
             "the output is always safetensors"),
            ("--random-seed", args.random_seed is not None,
             "DARE/DELLA masks come from BLAKE3 keyed by the plan, the same on every machine; "
             "set the recipe's `seed:` parameter in the config to draw other ones"),
            ("--unsafe-truncate-embeddings", args.unsafe_truncate_embeddings,
             "a model whose vocabulary size differs from the base's is excluded (see "
             "--allow-exclusions), never truncated")):
        if refused:
            raise BadParameter(f"{flag} is not supported: {why}")
    for flag in ("cuda", "lazy_unpickle", "low_cpu_memory", "read_to_gpu", "multi_gpu",
                 "async_write", "clone_tensors", "trust_remote_code", "gpu_rich", "verbose",
                 "device", "write_threads", "lora_merge_cache", "lora_merge_dtype"):
        if getattr(args, flag, None):
            name = "-v" if flag == "verbose" else f"--{flag.replace('_', '-')}"
            notes.append(f"{name} changes nothing here: the merge runs on "
                         "the CPU in float64, reads safetensors lazily and runs no model code")
    if args.quiet:
        progress.enable(False)
    if args.num_threads is not None and args.workers is None:
        args.workers = args.num_threads
    if args.transformers_cache:
        os.environ["HF_HUB_CACHE"] = args.transformers_cache
    draft = load(args.config, own_methods=True)
    shard = 5 * 1024**3
    if args.out_shard_size is not None:
        params_per_shard = commands.size_arg(args.out_shard_size, "--out-shard-size", count=True)
        shard = params_per_shard * BYTES.get(str(draft.params.get("dtype")), 4)
    out = Path(args.out)
    with _replica_for(args.config, args.cache) as r:
        applied = apply_draft(
            r, draft, args.config, commands.import_model_into, prune=True,
            check=lambda rep, drafts: commands.check_drafts(
                rep, drafts, args.allow_exclusions,
                "(pass --allow-exclusions to merge without them)"))
        notes += applied["notes"]
        for note in notes:
            warn(note)
        the_plan = plan(r)
        excluded = commands.excluded_of(the_plan)
        refused = commands.refused_of(the_plan)
        if refused and not args.allow_exclusions:  # nothing new was drafted, the plan still does
            commands.report_exclusions(r, the_plan)
            raise PlanError(f"{len(refused)} contribution(s) would be excluded (see above); "
                            "fix the config or pass --allow-exclusions")
        cache = Checkpoints(r)
        cached = cache.cached(the_plan)
        record = _record(out)
        if (cached is not None and record is not None and record.get("plan_id") == the_plan.id
                and record.get("checkpoint_id") == cached
                and _tokenizer_state(out) == args.copy_tokenizer):
            checkpoint, reused = cached, True
        else:
            with progress.meter("merge", commands.output_bytes(r, the_plan), "wchar"):
                result = execute(r, the_plan, out, workers=args.workers, max_shard_size=shard)
            cache.record(result)
            checkpoint, reused = result.checkpoint_id, False
            if not args.copy_tokenizer:
                for name in TOKENIZER_FILES:
                    (out / name).unlink(missing_ok=True)
        commands.report_exclusions(r, the_plan)
        text = [f"checkpoint {checkpoint}", f"written to {out}"
                + (" (already up to date)" if reused else ""),
                f"replica {r.path} (crdt-merge status/plan/resolve work on it)"]
        if not args.copy_tokenizer:
            text.append("the tokenizer files were left out (--no-copy-tokenizer); the "
                        "checkpoint id covers the folder with them")
        return 0, {"checkpoint_id": checkpoint, "plan_id": the_plan.id, "out": str(out),
                   "replica": str(r.path),
                   "reused": reused, "notes": notes, "excluded": excluded,
                   "decisions": [dict(d) for d in the_plan.decisions],
                   "text": "\n".join(text)}


def _record(out: Path) -> dict[str, Any] | None:
    from crdt_merge.resolve import MANIFEST_FILE

    try:
        return json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None


def _tokenizer_state(out: Path) -> bool:
    """Whether ``out`` holds its tokenizer files (as ``--copy-tokenizer`` leaves it)."""
    record = _record(out) or {}
    files = record.get("manifest", {}).get("files", {})
    names = [n for n in TOKENIZER_FILES if n in files]
    return all((out / n).exists() for n in names) if names else True


