"""``crdt-merge verify-folder DIR [--expect ID]``: recompute a downloaded checkpoint's id
from its files alone (no replica) and say whether it matches (specs/checkpoint.md)."""

from __future__ import annotations

from typing import Any

from crdt_merge.hashing import check_id


def cmd_verify_folder(args: Any) -> tuple[int, Any]:
    from crdt_merge.resolve.checkpoint import check_folder
    expect = check_id(args.expect, "expected checkpoint id") if args.expect else None
    check = check_folder(args.folder, expect=expect, piece_size=args.piece_size)
    payload: dict[str, Any] = {
        "folder": str(args.folder), "checkpoint_id": check.checkpoint_id,
        "piece_size": check.piece_size, "expected": expect,
        "recorded_checkpoint_id": check.recorded_checkpoint_id, "plan_id": check.plan_id,
        "recorded_plan_id": check.recorded_plan_id, "ok": check.ok, "problems": check.problems,
        "piece_size_note": check.piece_size_note,
    }
    lines = [f"checkpoint {check.checkpoint_id} (recomputed from the files, "
             f"{check.piece_size}-byte pieces)"]
    if check.plan_id:
        lines.append(f"plan {check.plan_id} (recomputed from merge_manifest.json)")
    if check.piece_size_note:
        lines.append(check.piece_size_note)
    if expect is None and check.recorded_checkpoint_id is None:
        lines.append("no merge_manifest.json and no --expect: nothing to compare with")
    lines += [f"MISMATCH: {p}" for p in check.problems]
    if check.ok and (expect is not None or check.recorded_checkpoint_id is not None):
        lines.append("OK: the files are the checkpoint "
                     + ("expected" if expect is not None else "merge_manifest.json records"))
    payload["text"] = "\n".join(lines)
    return (0 if check.ok else 1), payload
