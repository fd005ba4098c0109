"""What the CLI prints for people: the plan and the status as text, op ids as short
unique prefixes, warnings on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

#: the shortest prefix shown (git's default abbreviation); longer where needed to be unique
MIN_PREFIX = 8


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"crdt-merge: warning: {message}", file=sys.stderr, flush=True)


def short_ids(ids: Iterable[str]) -> dict[str, str]:
    """Each id's shortest prefix (at least :data:`MIN_PREFIX` characters) that no other id
    in ``ids`` shares: what ``status`` and ``plan`` print and every command accepts."""
    ordered = sorted(set(ids))
    out = {}
    for k, op_id in enumerate(ordered):
        common = 0
        for other in (ordered[k - 1] if k else "", ordered[k + 1] if k + 1 < len(ordered) else ""):
            n = 0
            while n < min(len(op_id), len(other)) and op_id[n] == other[n]:
                n += 1
            common = max(common, n)
        out[op_id] = op_id[:max(MIN_PREFIX, common + 1)]
    return out


def _short(ids: Mapping[str, str], op_id: str | None) -> str:
    if not op_id:
        return "-"
    return ids.get(op_id, op_id[:MIN_PREFIX + 4])


def _params(params: Mapping[str, Any]) -> str:
    if not params:
        return "-"
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                    for k, v in sorted(params.items()))


def status_text(s: Mapping[str, Any], ids: Mapping[str, str]) -> str:
    lines = [f"project   {s['project'][:16]}   site {s['site']}",
             f"state     {s['state_root'][:16]}   {s['ops']} ops, {s['staged']} staged",
             "members:"]
    for m in s["members"]:
        lines.append(f"  {m['state']:<8}  {m['site']:<10} {m['role']:<6} key {m['fingerprint']}  "
                     f"(op {_short(ids, m['member'])}"
                     + (f", ended by {_short(ids, m['ended_by'])}" if m.get("ended_by") else "")
                     + ")")
    if s.get("not_counted"):
        lines.append(f"{len(s['not_counted'])} op(s) do not count (their author's key was revoked "
                     "or replaced before them):")
        for n in s["not_counted"]:
            lines.append(f"  {_short(ids, n['op_id'])}  {n['kind']} by {n['site']}: {n['why']}")
    rec = s["recipe"]
    if rec:
        lines.append(f"recipe    {rec['method']} {_params(rec['params'])}   "
                     f"(op {_short(ids, rec['op_id'])}, site {rec['site']}"
                     + (f", anchor {rec['anchor'][:12]}" if rec.get("anchor") else "") + ")")
    else:
        lines.append("recipe    none yet (crdt-merge recipe DIR --method ...)")
    for c in s["conflicts"]:
        lines.append(f"CONFLICT  recipe {_short(ids, c['op_id'])} ({c['method']}, {c['site']}) "
                     "is also unsuperseded; set a new recipe to resolve it")
    if s["contributions"]:
        lines.append("contributions:")
    for c in s["contributions"]:
        lines.append(f"  {_short(ids, c['op_id'])}  {c['site']:<10} {c['label']:<24} "
                     f"{_params(c['params'])}")
        lines.append(f"      -> {c['fate']}")
    if s.get("plan_error"):
        lines.append(f"plan      cannot be made: {s['plan_error']}")
    elif s.get("plan_id"):
        lines.append(f"plan      {s['plan_id'][:16]}")
        lines.append(f"checkpoint {s['checkpoint_id'] or 'not resolved yet (crdt-merge resolve)'}")
    return "\n".join(lines)


def plan_text(d: Mapping[str, Any], ids: Mapping[str, str]) -> str:
    """``crdt-merge plan`` for people: the recipe, the inputs in order, every decision."""
    lines = [f"plan {d['plan_id']}",
             f"  method     {d['method']} {_params(d['params'])}",
             f"  recipe op  {_short(ids, d['recipe_op'])}",
             f"  base       {d['base'] or '(none)'}",
             f"  dtype      {d['dtype'] or 'as the base'}"
             + (f"   seed {d['seed']}" if d.get("seed") else "")
             + ("   allow_nonfinite" if d.get("allow_nonfinite") else ""),
             f"inputs, in canonical order ({len(d['contributions'])}):"]
    for c in d["contributions"]:
        lines.append(f"  {_short(ids, c['op_id'])}  {c['site']:<10} {c['label']:<24} {c['form']:<5} "
                     f"{_params(c['params'])}")
    if d.get("slices"):
        lines.append(f"slices: {len(d['slices'])}")
        for k, spec in enumerate(d["slices"]):
            srcs = ", ".join(f"{s['model'][:12]} [{s['layer_range'][0]}, {s['layer_range'][1]})"
                             for s in spec["sources"])
            lines.append(f"  [{k}] {srcs} {_params(spec.get('parameters', {}))}")
    if d.get("cross_family"):
        lines.append("cross-family alignment: see --json for the per-tensor decisions")
    decisions = d.get("decisions", [])
    lines.append("decisions:" if decisions else "decisions: none (every live contribution is merged)")
    for x in decisions:
        lines.append(f"  {x['decision']}: {_short(ids, x.get('op_id'))} {x['detail']}")
    return "\n".join(lines)


