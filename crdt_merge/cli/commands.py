"""One function per CLI command: ``cmd_NAME(args) -> (exit code, JSON-able payload)``."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crdt_merge import maintenance
from crdt_merge.cli import progress
from crdt_merge.cli.render import plan_text, short_ids, status_text, warn
from crdt_merge.crdt.ops import Op
from crdt_merge.errors import (
    AmbiguousId,
    BadId,
    BadParameter,
    CrdtMergeError,
    ModelImportError,
    NotAuthorized,
    OpMissing,
    PlanError,
    RecipeError,
    ShapeMismatch,
)
from crdt_merge.hashing import is_id
from crdt_merge.recipe import (  # noqa: F401  (parse_value: part of this module's API)
    check_recipe,
    contribution_problem,
    parse_params,
    parse_value,
    split_params,
    unused_note,
    values_no_method_accepts,
)
from crdt_merge.replica import Replica
from crdt_merge.store.adapter import is_peft_folder
from crdt_merge.store.importer import Imported, import_adapter, import_model, model_label
from crdt_merge.sync import LocalPeer, SyncStats, sync

# -- helpers ------------------------------------------------------------------------------------


def is_url(peer: str) -> bool:
    return peer.startswith(("http://", "https://"))


def client_token(args: Any) -> str | None:
    """The bearer token: ``--token``, else the file ``--token-file`` names, else the
    ``CRDT_MERGE_TOKEN`` environment variable (the last two keep it out of ``ps``)."""
    if getattr(args, "token", None):
        return str(args.token)
    path = getattr(args, "client_token_file", None)
    if path:
        try:
            text = Path(path).read_text().strip()
        except OSError as exc:
            raise BadParameter(f"cannot read the token file {path}: {exc.strerror}") from None
        if not text:
            raise BadParameter(f"the token file {path} is empty")
        return text
    return os.environ.get("CRDT_MERGE_TOKEN") or None


def open_peer(peer: str, token: str | None = None, ca: str | None = None) -> Any:
    """A sync peer: another replica directory, or an HTTP(S) server."""
    if is_url(peer):
        try:
            from crdt_merge.sync.http import HttpPeer
        except ImportError:
            raise PlanError("syncing with a URL needs the HTTP client (crdt_merge.sync.http)") from None
        return HttpPeer(peer, token=token, ca=ca or os.environ.get("CRDT_MERGE_CA") or None)
    return LocalPeer.open(peer)


@contextmanager
def closing_peer(peer: Any) -> Iterator[Any]:
    """Use a peer and release what it holds (an HTTP client's connections, a replica)."""
    try:
        yield peer
    finally:
        peer.close()


def import_model_into(replica: Replica, model: str) -> Imported:
    with progress.meter(f"import {Path(model).name or model}", progress.files_size(model)):
        if model.endswith(".gguf") and Path(model).is_file():
            from crdt_merge.formats.gguf import import_gguf
            return import_gguf(replica.store, model, replica.piece_size)
        return import_model(replica.store, model, replica.piece_size)


def expand_op_id(r: Replica, text: str) -> str:
    """A full op id from a unique prefix of one (git-style, at least 4 hex characters).

    Raises:
        BadId: not hex, or shorter than 4 characters.
        OpMissing: no op held starts with it.
        AmbiguousId: several do.
    """
    if is_id(text):
        return text
    low = text.strip()
    if len(low) < 4 or len(low) > 64 or any(ch not in "0123456789abcdef" for ch in low):
        raise BadId(text, "op id (or a unique prefix of 4+ hex characters)")
    matches = sorted(i for i in r.op_ids() if i.startswith(low))
    if not matches:
        raise OpMissing(text)
    if len(matches) > 1:
        raise AmbiguousId(low, matches)
    return matches[0]


def _current_method(r: Replica) -> tuple[Any, dict[str, Any]] | None:
    """The winning recipe's method and its method parameters, or None."""
    from crdt_merge.methods import get_method

    rec = maintenance.status(r)["recipe"]
    if rec is None:
        return None
    try:
        method = get_method(rec["method"])
        method_params, _, _ = check_recipe(method, rec["params"])
    except RecipeError:
        return None
    return method, method_params


def _planned(r: Replica, extra: list[Op]) -> tuple[Any, str | None]:
    """The plan with ``extra`` ops as if written: (plan or None, why it fails or None)."""
    from crdt_merge.resolve import plan

    try:
        return plan(r, extra), None
    except CrdtMergeError as exc:
        return None, f"{exc.code}: {exc.detail}"


def excluded_of(the_plan: Any, op_ids: set[str] | None = None) -> list[dict[str, Any]]:
    return [dict(d) for d in the_plan.decisions if d.get("decision") == "excluded"
            and (op_ids is None or d.get("op_id") in op_ids)]


def refused_of(the_plan: Any) -> list[dict[str, Any]]:
    """The exclusions the CLI's checks refuse (unless forced): all but those the recipe
    itself asks for (``by_recipe``: krum's selection, ``exclude_outliers``), which are
    the method working and are printed as warnings instead."""
    out = []
    for d in excluded_of(the_plan):
        if d.get("by_recipe"):
            warn(f"the recipe leaves out {d['op_id'][:12]}: {d['detail']}")
        else:
            out.append(d)
    return out


def _family(imported: Imported) -> str:
    """The model family as the config names it (``model_type``); empty for bare files."""
    return str(imported.manifest.meta.get("model_type", ""))


def _stats(stats: SyncStats) -> dict[str, Any]:
    return dict(stats.__dict__)


def _sync(r: Replica, peer: Any) -> SyncStats:
    bars = progress.SyncBars()
    try:
        return sync(r, peer, bars)
    finally:
        bars.close()


# -- commands ---------------------------------------------------------------------------------


def cmd_init(args: Any) -> tuple[int, Any]:
    if args.join:
        with closing_peer(open_peer(args.join, client_token(args), args.ca)) as peer:
            genesis = peer.get_ops([peer.state().genesis])[0]
            replica = Replica.join(args.dir, args.site, genesis)
            stats = _sync(replica, peer)
        payload = {"dir": args.dir, "site": args.site, "project": replica.genesis_id,
                   "public_key": replica.public_key.hex(), "state_root": replica.state_root(),
                   "sync": _stats(stats),
                   "text": f"joined project {replica.genesis_id}\nask an admin to run:\n"
                           f"  crdt-merge admit DIR {args.site} {replica.public_key.hex()}"}
        return 0, payload
    replica = Replica.create(args.dir, args.site, name=args.name, profile=args.profile)
    return 0, {"dir": args.dir, "site": args.site, "project": replica.genesis_id,
               "public_key": replica.public_key.hex(), "state_root": replica.state_root(),
               "text": f"created project {replica.genesis_id} with admin site {args.site}"}


def _public_key(text: str) -> bytes:
    """An Ed25519 public key given as 64 hex characters."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BadParameter("public key must be 64 hex characters (32 bytes)")
    return key


def cmd_admit(args: Any) -> tuple[int, Any]:
    key = _public_key(args.public_key)
    with Replica.open(args.dir) as r:
        op = r.admit(args.site, key, args.role)
        return 0, {"op_id": op.id, "site": args.site, "role": args.role,
                   "text": f"admitted {args.site} ({args.role}): op {op.id}"}


def cmd_revoke(args: Any) -> tuple[int, Any]:
    with Replica.open(args.dir) as r:
        op = r.revoke(args.site, args.member)
        target = op.body["revoke"]["member"]
        return 0, {"op_id": op.id, "site": args.site, "member": target,
                   "text": f"revoked {args.site} (membership op {target[:16]}): op {op.id}; "
                           "its ops this replica had not seen count nowhere"}


def cmd_rotate_key(args: Any) -> tuple[int, Any]:
    key = _public_key(args.public_key)
    with Replica.open(args.dir) as r:
        op = r.rotate_key(args.site, key, role=args.role, member=args.member)
        return 0, {"op_id": op.id, "site": args.site, "replaces": op.body["replaces"],
                   "role": op.body["admit"]["role"],
                   "text": f"{args.site} has a new key: op {op.id}; the old key "
                           f"(membership op {op.body['replaces'][:16]}) is replaced"}


FORCE_HINT = "(--force records it anyway)"


def cmd_contribute(args: Any) -> tuple[int, Any]:
    params = parse_params(args.param)
    if args.weight is not None:
        params["weight"] = parse_value(args.weight)
    if args.delta and not args.base:
        raise BadParameter("--delta needs --base: a delta is relative to a base model")
    notes: list[str] = []
    with Replica.open(args.dir) as r:
        r.membership()  # fail before importing gigabytes when this site cannot author ops
        current = _current_method(r)
        # the cheap checks first, before any model is read
        if current is None:
            problems = values_no_method_accepts(params)
            if problems and not args.force:
                raise BadParameter("; ".join(problems) + " " + FORCE_HINT)
        else:
            method, method_params = current
            _, unused = split_params(method, params)
            if unused:
                notes.append(unused_note(method, unused))
            problem = contribution_problem(method, method_params, params)
            if problem and not args.force:
                raise BadParameter(f"the recipe ({method.name}) would exclude this contribution: "
                                   f"{problem}; fix the value with --weight/--param "
                                   f"{FORCE_HINT}")
        adapter = is_peft_folder(Path(args.model))
        if adapter and (args.base is None or args.delta):
            raise BadParameter("a PEFT adapter needs --base (the model it was trained on) "
                               "and is not a --delta")
        base = import_model_into(r, args.base) if args.base else None
        if adapter:  # stored as its factors, checked against the base's shapes
            donor = import_adapter(r.store, args.model, r.piece_size, base.manifest)
        else:
            donor = import_model_into(r, args.model)
        if base is not None and not args.delta and not adapter:
            _check_same_shapes(donor, base)
        fields = dict(form="adapter" if adapter else "delta" if args.delta else "full",
                      base=base.manifest_id if base else None, params=params,
                      label=(args.label or model_label(args.model))[:200],
                      family=_family(donor)[:200])
        if current is not None and not args.force:  # the plan's own check, as if written
            candidate = r.contribute(donor.manifest_id, **fields, draft=True)
            planned_before, before = _planned(r, [])
            after, why = _planned(r, [candidate])
            was = {d["op_id"] for d in excluded_of(planned_before)} if planned_before else set()
            out = [d for d in (refused_of(after) if after is not None else [])
                   if d["op_id"] not in was]
            if out:
                whose = ("this contribution" if out[0]["op_id"] == candidate.id else
                         f"contribution {out[0]['op_id'][:12]} once this one is added")
                raise PlanError(f"the plan would exclude {whose}: {out[0]['detail']} "
                                f"{FORCE_HINT}")
            if why is not None and before is None:  # it planned without this one
                raise PlanError(f"with this contribution the plan fails: {why} {FORCE_HINT}")
        op = r.contribute(donor.manifest_id, **fields)
        for note in notes:
            warn(note)
        return 0, {"op_id": op.id, "manifest": donor.manifest_id,
                   "base": base.manifest_id if base else None,
                   "new_pieces": donor.new_pieces + (base.new_pieces if base else 0),
                   "pieces": donor.total_pieces, "notes": notes,
                   "text": f"contributed {args.model}: op {op.id[:12]}"}


def _check_same_shapes(donor: Imported, base: Imported) -> None:
    for name, rec in base.manifest.tensors.items():
        other = donor.manifest.tensors.get(name)
        if other is not None and other.shape != rec.shape:
            raise ModelImportError(f"tensor {name}: donor shape {list(other.shape)} differs from "
                                   f"the base's {list(rec.shape)}; is --base the right model?")


def cmd_retract(args: Any) -> tuple[int, Any]:
    with Replica.open(args.dir) as r:
        targets = [expand_op_id(r, t) for t in args.op_ids]
        me = (r.membership().id, r.site)
        for target in targets:  # every replica would ignore it: refuse instead of pretending
            held = r.get_op(target)
            if held is not None and held.kind == "contribute" and held.author != me:
                whose = (f"site {held.site}" if held.site != r.site else
                         f"another key of site {r.site} (membership op {held.author[0][:12]})")
                raise NotAuthorized(f"op {target[:12]} is a contribution of {whose}; this key "
                                    "can retract only its own (every replica would ignore "
                                    "this retract)")
        op = r.retract(targets)
        return 0, {"op_id": op.id, "targets": op.body["targets"],
                   "text": f"retracted {len(op.body['targets'])} contribution(s): op {op.id[:12]}"}


def _anchor(r: Replica, anchor: str) -> str:
    if is_id(anchor) or (len(anchor) < 64 and not Path(anchor).exists()
                         and all(ch in "0123456789abcdef" for ch in anchor) and len(anchor) >= 4):
        if not is_id(anchor):
            anchor = expand_op_id(r, anchor)
        held = r.get_op(anchor)
        if held is not None and held.kind == "contribute":
            return held.body["manifest"]
        if r.store.has(anchor):
            return anchor
        raise OpMissing(anchor)
    return import_model_into(r, anchor).manifest_id


def check_drafts(r: Replica, drafts: list[Op], force: bool, hint: str = FORCE_HINT) -> None:
    """Refuse ops that the plan would answer with an exclusion or a failure (unless
    ``force``): the plan's own check, run as if the ops were written."""
    if force:
        return
    contributions = [op for op in [*r.ops().values(), *drafts] if op.kind == "contribute"]
    if not contributions:
        return  # a recipe before any contribution: nothing to check it against yet
    after, why = _planned(r, drafts)
    if after is None:
        raise PlanError(f"the plan would fail: {why} {hint}")
    out = refused_of(after)
    if out:
        labels = {op.id: f"{op.site} {op.body['label']!r}" for op in contributions}
        lines = "".join(f"\n  excluded {d['op_id'][:12]} {labels.get(d['op_id'], '')}: "
                        f"{d['detail']}" for d in out)
        raise PlanError(f"the plan would exclude {len(out)} contribution(s); fix them or "
                        f"retract them {hint}:{lines}")


def cmd_recipe(args: Any) -> tuple[int, Any]:
    if args.from_mergekit:
        from crdt_merge.cli.mergekit_yaml import apply_mergekit_yaml
        with Replica.open(args.dir) as r:
            payload = apply_mergekit_yaml(
                r, args.from_mergekit, import_model_into,
                check=lambda rep, drafts: check_drafts(rep, drafts, args.force))
            for note in payload["notes"]:
                warn(note)
            return 0, payload
    if not args.method:
        raise BadParameter("give --method NAME (or --from-mergekit YAML)")
    from crdt_merge.methods import get_method
    params = parse_params(args.param)
    method = get_method(args.method)
    check_recipe(method, params)
    with Replica.open(args.dir) as r:
        r.membership()
        anchor = _anchor(r, args.anchor) if args.anchor else None
        draft = r.set_recipe(method.name, params, anchor=anchor, draft=True)
        check_drafts(r, [draft], args.force)
        op = r.set_recipe(method.name, params, anchor=anchor)
        return 0, {"op_id": op.id, "method": method.name, "params": params, "anchor": anchor,
                   "text": f"recipe {method.name}: op {op.id[:12]}"}


def fates(r: Replica) -> tuple[dict[str, str], str | None, Any]:
    """Each contribution's fate in the current plan (:mod:`crdt_merge.resolve.fates`), why
    there is no plan (or None), and the plan."""
    from crdt_merge.resolve.fates import planned_fates

    the_plan, error, fate = planned_fates(r)
    why = None if error is None else f"{error.code}: {error.detail}"
    return {i: str(f) for i, f in fate.items()}, why, the_plan


def cmd_status(args: Any) -> tuple[int, Any]:
    from crdt_merge.resolve.checkpoint_cache import Checkpoints

    with Replica.open(args.dir) as r:
        s = maintenance.status(r)
        fate, why, the_plan = fates(r)
        for c in s["contributions"]:
            c["fate"] = fate[c["op_id"]]
        s["plan_error"] = why
        s["plan_id"] = the_plan.id if the_plan is not None else None
        s["checkpoint_id"] = (Checkpoints(r).cached(the_plan)
                              if the_plan is not None else None)
        s["text"] = status_text(s, short_ids(r.op_ids()))
        if the_plan is not None and the_plan.outliers is not None:
            s["text"] += "\n" + "\n".join(_outlier_status(the_plan, s))
        return 0, s


def _outlier_status(the_plan: Any, s: dict[str, Any]) -> list[str]:
    """The plan's outlier report (specs/methods.md): lines for the text, and ``s``'s
    ``outliers`` / ``outliers_excluded``."""
    from crdt_merge.resolve.output import outlier_lines

    s["outliers"] = [dict(e) for e in the_plan.outliers]
    excluded = [d for d in the_plan.decisions if str(d.get("detail", "")).startswith("outlier")]
    s["outliers_excluded"] = [d["op_id"] for d in excluded]
    return outlier_lines(the_plan.to_wire(), {})[1:] + [
        f"  excluded as outlier: {d['op_id'][:16]}" for d in excluded]


def cmd_sync(args: Any) -> tuple[int, Any]:
    with Replica.open(args.dir) as r:
        with closing_peer(open_peer(args.peer, client_token(args), args.ca)) as peer:
            stats = _sync(r, peer)
        payload = _stats(stats)
        payload["state_root"] = r.state_root()
        payload["text"] = (f"received {stats.ops_received} ops, {stats.objects_received} objects; "
                           f"sent {stats.ops_sent} ops, {stats.objects_sent} objects; "
                           f"state root {r.state_root()}")
        return (1 if stats.rejected else 0), payload


def cmd_plan(args: Any) -> tuple[int, Any]:
    from crdt_merge.resolve import plan
    with Replica.open(args.dir) as r:
        d = plan(r).describe()
        if not args.json:
            d["text"] = plan_text(d, short_ids(r.op_ids()))
        return 0, d


def report_exclusions(r: Replica, the_plan: Any) -> list[dict[str, Any]]:
    """Print every excluded contribution on stderr (plain text: op id prefix, site, label,
    reason); return them."""
    out = excluded_of(the_plan)
    held = r.ops()
    for d in out:
        op = held.get(d["op_id"])
        who = f" {op.site} {op.body.get('label', '')!r}" if op is not None else ""
        warn(f"excluded {d['op_id'][:12]}{who}: {d['detail']}")
    return out


def cmd_resolve(args: Any) -> tuple[int, Any]:
    from crdt_merge.resolve import execute, plan, resolve_recorded
    from crdt_merge.resolve.checkpoint_cache import Checkpoints
    max_shard = size_arg(args.max_shard_size, "--max-shard-size")
    with Replica.open(args.dir) as r:
        if args.plan:
            with progress.meter("resolve", None, "wchar"):
                result = resolve_recorded(r, args.plan, args.out, workers=args.workers)
        else:
            the_plan = plan(r)
            with progress.meter("resolve", output_bytes(r, the_plan), "wchar"):
                result = execute(r, the_plan, args.out, workers=args.workers,
                                 max_shard_size=max_shard)
        Checkpoints(r).record(result)
        excluded = report_exclusions(r, result.plan)
        payload = result.to_json()
        payload["excluded"] = excluded
        if getattr(args, "format", "safetensors") == "gguf":
            from crdt_merge.formats.gguf import export_gguf
            target = Path(args.gguf_file or f"{Path(result.out)}.gguf")
            with progress.meter("gguf", None, "wchar"):
                payload["gguf"] = export_gguf(
                    Path(result.out), target, args.gguf_type,
                    tokenizer=not getattr(args, "gguf_no_tokenizer", False))
            payload["text_gguf"] = f"gguf {target} ({args.gguf_type}) blake3 {payload['gguf']['blake3']}"
        payload["text"] = (f"checkpoint {result.checkpoint_id}\nplan {result.plan_id}\n"
                           f"state root {result.state_root}\nwritten to {result.out}"
                           + (f"\n{len(excluded)} contribution(s) excluded (see above)"
                              if excluded else "")
                           + (f"\n{payload.pop('text_gguf')}" if "text_gguf" in payload else ""))
        return 0, payload


def size_arg(value: str | int, flag: str, *, count: bool = False) -> int:
    if isinstance(value, int):
        return value
    try:
        return progress.parse_size(value, count=count)
    except ValueError as exc:
        raise BadParameter(f"{flag} {exc}") from None


def output_bytes(r: Replica, the_plan: Any) -> int | None:
    """The bytes of the output's tensors (what resolve writes), for its progress bar."""
    if not progress.enabled():
        return None
    from crdt_merge.store.manifests import DTYPE_SIZES

    ref = the_plan.base or the_plan.contributions[0].manifest
    total = 0
    for rec in r.get_manifest(ref).tensors.values():
        n = DTYPE_SIZES.get(the_plan.dtype or rec.dtype, 4)
        for d in rec.shape:
            n *= d
        total += n
    return total


def checkpoint_of(r: Replica) -> dict[str, Any]:
    """The replica's checkpoint id for its current plan (resolving it once if needed)."""
    from crdt_merge.resolve import numeric_profile, plan, resolve
    from crdt_merge.resolve.checkpoint_cache import Checkpoints
    try:
        p = plan(r)
    except (PlanError, ShapeMismatch) as exc:
        return {"state_root": r.state_root(), "checkpoint_id": None, "plan_id": None,
                "detail": exc.detail, "numeric_profile": numeric_profile()}
    cache = Checkpoints(r)
    cached = cache.cached(p)
    if cached is None:
        with tempfile.TemporaryDirectory() as tmp, progress.meter(
                "resolve", output_bytes(r, p), "wchar"):
            result = resolve(r, Path(tmp) / "out")
        cache.record(result)
        cached = result.checkpoint_id
    return {"state_root": r.state_root(), "checkpoint_id": cached, "plan_id": p.id,
            "numeric_profile": numeric_profile(p.method)}


def cmd_verify(args: Any) -> tuple[int, Any]:
    views = {}
    for where in [args.dir, *args.peers]:
        if is_url(where):
            with closing_peer(open_peer(where, client_token(args), args.ca)) as peer:
                views[where] = peer.checkpoint()
        else:
            with Replica.open(where) as r:
                views[where] = checkpoint_of(r)
    first = views[args.dir]
    verdicts = {}
    ok = True
    for where, view in views.items():
        if view["state_root"] != first["state_root"]:
            verdicts[where] = "diverged: different state roots (sync them)"
            ok = False
        elif view["checkpoint_id"] != first["checkpoint_id"]:
            if view.get("numeric_profile") != first.get("numeric_profile"):
                verdicts[where] = "different numeric profile"
            else:
                verdicts[where] = "diverged: same state, different checkpoint"
            ok = False
        else:
            verdicts[where] = "agrees"
    lines = [f"{w}: {v}  state {views[w]['state_root'][:16]}  checkpoint "
             f"{(views[w]['checkpoint_id'] or 'none')[:16]}" for w, v in verdicts.items()]
    return (0 if ok else 1), {"ok": ok, "replicas": views, "verdicts": verdicts,
                              "text": "\n".join(lines)}


def cmd_fsck(args: Any) -> tuple[int, Any]:
    repaired = False
    if args.genesis:  # put the genesis back first (the replica may not open without it)
        if not is_url(args.genesis) and Path(args.genesis).is_file():
            data = Path(args.genesis).read_bytes()
        else:
            with closing_peer(open_peer(args.genesis, client_token(args), args.ca)) as peer:
                data = peer.get_ops([peer.state().genesis])[0]
        Replica.repair_genesis(args.dir, data)
        repaired = True
    with Replica.open(args.dir) as r:
        report = maintenance.fsck(r)
        report["genesis_restored"] = repaired or report["genesis_restored"]
        report["text"] = (("genesis op restored; " if report["genesis_restored"] else "")
                          + f"{report['objects']} objects; corrupt: {len(report['corrupt'])}; "
                          f"ops lacking objects: {len(report['incomplete_ops'])}"
                          + ("" if report["ok"] else "; run `crdt-merge sync` to fetch them again"))
        return (0 if report["ok"] else 1), report


def cmd_gc(args: Any) -> tuple[int, Any]:
    with Replica.open(args.dir) as r:
        report = maintenance.gc(r, grace=args.grace)
        report["text"] = (f"deleted {report['deleted']} objects ({report['unreferenced']} "
                          "that no op references)")
        return 0, report


def cmd_serve(args: Any) -> tuple[int, Any]:
    """Replace this process with the server program (``python -m crdt_merge_server``): the package
    never imports the server (it depends on us, not the reverse)."""
    import importlib.util

    if importlib.util.find_spec("crdt_merge_server") is None or importlib.util.find_spec("fastapi") is None:
        raise CrdtMergeError("serving needs the server extra: pip install 'crdt-model-merge[server]'")
    argv = [sys.executable, "-m", "crdt_merge_server", args.dir]
    for flag, value in (("--host", args.host), ("--port", args.port),
                        ("--token-file", args.token_file),
                        ("--peer-token-file", args.peer_token_file),
                        ("--sync-interval", args.sync_interval),
                        ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                        ("--peer-ca", args.peer_ca), ("--log-format", args.log_format)):
        if value is not None:
            argv += [flag, str(value)]
    for peer in args.peer:
        argv += ["--peer", peer]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    raise AssertionError("unreachable")  # pragma: no cover


def cmd_eval(args: Any) -> tuple[int, Any]:
    from crdt_merge.cli.evaluate import evaluate, read_text
    result = evaluate(args.model, read_text(args.text, args.max_bytes), window=args.window,
                      stride=args.stride).to_json()
    result["text"] = (f"bits per byte {result['bits_per_byte']:.4f}  perplexity "
                      f"{result['perplexity']:.2f}  ({result['tokens']} tokens, "
                      f"{result['bytes']} bytes)")
    return 0, result


def cmd_families(args: Any) -> tuple[int, Any]:
    from crdt_merge.families import cli as families_cli
    code, payload = families_cli.run_families_cli(args)
    return code, {**payload, "text": families_cli.render(payload)}
