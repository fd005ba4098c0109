"""One function per CLI command: ``cmd_NAME(args) -> (exit code, JSON-able payload)``."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crdt_merge import codec
from crdt_merge.errors import (
    BadParameter,
    CrdtMergeError,
    ModelImportError,
    OpMissing,
    PlanError,
)
from crdt_merge.hashing import is_id
from crdt_merge.replica import Replica
from crdt_merge.store.importer import Imported, import_model
from crdt_merge.sync import LocalPeer, SyncStats, sync

# -- helpers ------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A ``--param`` value: true/false, a number (made a canonical decimal), a JSON list or
    map (numbers inside made canonical decimals), or a plain string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if codec.looks_numeric(text.strip()):
        return codec.canonical_decimal(text.strip())
    if text.strip().startswith(("[", "{")):
        try:
            return _canon_numbers(json.loads(text))
        except json.JSONDecodeError as exc:
            raise BadParameter(f"{text!r} is not valid JSON: {exc}") from None
    return text


def _canon_numbers(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        if value is None:
            raise BadParameter("null is not a parameter value")
        return value
    if isinstance(value, (int, float)):
        return codec.canonical_decimal(value)
    if isinstance(value, str):
        return codec.canonical_decimal(value) if codec.looks_numeric(value) else value
    if isinstance(value, list):
        return [_canon_numbers(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canon_numbers(v) for k, v in value.items()}
    raise BadParameter(f"{value!r} is not a parameter value")


def parse_params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadParameter(f"--param {pair!r}: write KEY=VALUE")
        out[key.strip()] = parse_value(value)
    return out


def is_url(peer: str) -> bool:
    return peer.startswith(("http://", "https://"))


def open_peer(peer: str, token: str | None = None) -> Any:
    """A sync peer: another replica directory, or an HTTP server."""
    if is_url(peer):
        try:
            from crdt_merge.sync.http import HttpPeer
        except ImportError:
            raise PlanError("syncing with a URL needs the HTTP client (crdt_merge.sync.http)") from None
        return HttpPeer(peer, token=token)
    return LocalPeer(Replica.open(peer))


@contextmanager
def closing_peer(peer: Any) -> Iterator[Any]:
    """Use a peer and release what it holds (an HTTP client's connections, a replica)."""
    try:
        yield peer
    finally:
        close = getattr(peer, "close", None) or getattr(getattr(peer, "replica", None), "close", None)
        if close is not None:
            close()


def _progress(stage: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\r{stage}: {done}/{total}", end=end, file=sys.stderr, flush=True)


def _import(replica: Replica, model: str) -> Imported:
    return import_model(replica.store, model, replica.piece_size)


def _family(imported: Imported) -> str:
    """The model family as the config names it (``model_type``); empty for bare files."""
    return str(imported.manifest.meta.get("model_type", ""))


def _stats(stats: SyncStats) -> dict[str, Any]:
    return dict(stats.__dict__)


# -- commands ---------------------------------------------------------------------------------


def cmd_init(args: Any) -> tuple[int, Any]:
    if args.join:
        with closing_peer(open_peer(args.join, args.token)) as peer:
            genesis = peer.get_ops([peer.state().genesis])[0]
            replica = Replica.join(args.dir, args.site, genesis)
            stats = sync(replica, peer, _progress)
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


def cmd_admit(args: Any) -> tuple[int, Any]:
    try:
        key = bytes.fromhex(args.public_key)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BadParameter("public key must be 64 hex characters (32 bytes)")
    with Replica.open(args.dir) as r:
        op = r.admit(args.site, key, args.role)
        return 0, {"op_id": op.id, "site": args.site, "role": args.role,
                   "text": f"admitted {args.site} ({args.role}): op {op.id}"}


def cmd_contribute(args: Any) -> tuple[int, Any]:
    params = parse_params(args.param)
    if args.weight is not None:
        params["weight"] = parse_value(args.weight)
    if args.delta and not args.base:
        raise BadParameter("--delta needs --base: a delta is relative to a base model")
    with Replica.open(args.dir) as r:
        r.membership()  # fail before importing gigabytes when this site cannot author ops
        base = _import(r, args.base) if args.base else None
        donor = _import(r, args.model)
        if base is not None and not args.delta:
            _check_same_shapes(donor, base)
        op = r.contribute(donor.manifest_id, form="delta" if args.delta else "full",
                          base=base.manifest_id if base else None, params=params,
                          label=(args.label or Path(args.model).name or args.model)[:200], family=_family(donor)[:200])
        return 0, {"op_id": op.id, "manifest": donor.manifest_id,
                   "base": base.manifest_id if base else None,
                   "new_pieces": donor.new_pieces + (base.new_pieces if base else 0),
                   "pieces": donor.total_pieces,
                   "text": f"contributed {args.model}: op {op.id}"}


def _check_same_shapes(donor: Imported, base: Imported) -> None:
    for name, rec in base.manifest.tensors.items():
        other = donor.manifest.tensors.get(name)
        if other is not None and other.shape != rec.shape:
            raise ModelImportError(f"tensor {name}: donor shape {list(other.shape)} differs from "
                                   f"the base's {list(rec.shape)}; is --base the right model?")


def cmd_retract(args: Any) -> tuple[int, Any]:
    with Replica.open(args.dir) as r:
        op = r.retract(args.op_ids)
        return 0, {"op_id": op.id, "targets": op.body["targets"],
                   "text": f"retracted {len(op.body['targets'])} contribution(s): op {op.id}"}


def _anchor(r: Replica, anchor: str) -> str:
    if is_id(anchor):
        held = r.get_op(anchor)
        if held is not None and held.kind == "contribute":
            return held.body["manifest"]
        if r.store.has(anchor):
            return anchor
        raise OpMissing(anchor)
    return _import(r, anchor).manifest_id


def cmd_recipe(args: Any) -> tuple[int, Any]:
    if args.from_mergekit:
        from crdt_merge.cli.mergekit_yaml import apply_mergekit_yaml
        with Replica.open(args.dir) as r:
            return 0, apply_mergekit_yaml(r, args.from_mergekit, _import)
    if not args.method:
        raise BadParameter("give --method NAME (or --from-mergekit YAML)")
    from crdt_merge.methods import get_method
    from crdt_merge.resolve.plan import check_recipe
    params = parse_params(args.param)
    method = get_method(args.method)
    check_recipe(method, params)
    with Replica.open(args.dir) as r:
        r.membership()
        anchor = _anchor(r, args.anchor) if args.anchor else None
        op = r.set_recipe(method.name, params, anchor=anchor)
        return 0, {"op_id": op.id, "method": method.name, "params": params, "anchor": anchor,
                   "supersedes": op.body["supersedes"],
                   "text": f"recipe {method.name}: op {op.id}"}


def cmd_status(args: Any) -> tuple[int, Any]:
    with Replica.open(args.dir) as r:
        s = r.status()
        lines = [f"project {s['project']}  site {s['site']}",
                 f"state root {s['state_root']}  ({s['ops']} ops, {s['staged']} staged)"]
        for c in s["contributions"]:
            lines.append(f"  {'live     ' if c['live'] else 'retracted'} {c['op_id'][:16]} "
                         f"{c['site']}: {c['label']}")
        rec = s["recipe"]
        lines.append(f"recipe: {rec['method']} {json.dumps(rec['params'])}" if rec else "recipe: none")
        for c in s["conflicts"]:
            lines.append(f"  CONFLICT: recipe {c['op_id'][:16]} ({c['method']}, {c['site']}) "
                         "is also unsuperseded; set a new recipe to resolve it")
        s["text"] = "\n".join(lines)
        return 0, s


def cmd_sync(args: Any) -> tuple[int, Any]:
    with Replica.open(args.dir) as r:
        with closing_peer(open_peer(args.peer, args.token)) as peer:
            stats = sync(r, peer, _progress)
        payload = _stats(stats)
        payload["state_root"] = r.state_root()
        payload["text"] = (f"received {stats.ops_received} ops, {stats.objects_received} objects; "
                           f"sent {stats.ops_sent} ops, {stats.objects_sent} objects; "
                           f"state root {r.state_root()}")
        return (1 if stats.rejected else 0), payload


def cmd_plan(args: Any) -> tuple[int, Any]:
    from crdt_merge.resolve import plan
    with Replica.open(args.dir) as r:
        p = plan(r)
        d = p.describe()
        d["text"] = json.dumps(d, indent=2, sort_keys=True)
        return 0, d


def cmd_resolve(args: Any) -> tuple[int, Any]:
    from crdt_merge.resolve import checkpoint_key, resolve, resolve_recorded
    with Replica.open(args.dir) as r:
        if args.plan:
            result = resolve_recorded(r, args.plan, args.out, workers=args.workers)
        else:
            result = resolve(r, args.out, workers=args.workers, max_shard_size=args.max_shard_size)
        r.store.index.set_meta(checkpoint_key(result.plan_id, result.plan.method), result.checkpoint_id.encode())
        payload = result.to_json()
        payload["text"] = (f"checkpoint {result.checkpoint_id}\nplan {result.plan_id}\n"
                           f"state root {result.state_root}\nwritten to {result.out}")
        return 0, payload


def checkpoint_of(r: Replica) -> dict[str, Any]:
    """The replica's checkpoint id for its current plan (resolving it once if needed)."""
    from crdt_merge.resolve import checkpoint_key, plan, resolve
    from crdt_merge.resolve.execute import numeric_profile
    try:
        p = plan(r)
    except PlanError as exc:
        return {"state_root": r.state_root(), "checkpoint_id": None, "plan_id": None,
                "detail": exc.detail, "numeric_profile": numeric_profile()}
    cached = r.store.index.get_meta(checkpoint_key(p.id, p.method))
    if cached is None:
        with tempfile.TemporaryDirectory() as tmp:
            result = resolve(r, Path(tmp) / "out")
        r.store.index.set_meta(checkpoint_key(p.id, p.method), result.checkpoint_id.encode())
        cached = result.checkpoint_id.encode()
    return {"state_root": r.state_root(), "checkpoint_id": cached.decode(), "plan_id": p.id,
            "numeric_profile": numeric_profile(p.method)}


def cmd_verify(args: Any) -> tuple[int, Any]:
    views = {}
    for where in [args.dir, *args.peers]:
        if is_url(where):
            with closing_peer(open_peer(where, args.token)) as peer:
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
    with Replica.open(args.dir) as r:
        report = r.fsck()
        report["text"] = (f"{report['objects']} objects; corrupt: {len(report['corrupt'])}; "
                          f"ops lacking objects: {len(report['incomplete_ops'])}"
                          + ("" if report["ok"] else "; run `crdt-merge sync` to fetch them again"))
        return (0 if report["ok"] else 1), report


def cmd_gc(args: Any) -> tuple[int, Any]:
    with Replica.open(args.dir) as r:
        report = r.gc()
        report["text"] = f"deleted {report['deleted']} objects"
        return 0, report


def cmd_serve(args: Any) -> tuple[int, Any]:
    """Replace this process with the server program (``python -m crdt_merge_server``): the package
    never imports the server (it depends on us, not the reverse)."""
    import importlib.util
    import os

    if importlib.util.find_spec("crdt_merge_server") is None or importlib.util.find_spec("fastapi") is None:
        raise CrdtMergeError("serving needs the server extra: pip install 'crdt-model-merge[server]'")
    argv = [sys.executable, "-m", "crdt_merge_server", args.dir]
    for flag, value in (("--host", args.host), ("--port", args.port),
                        ("--token-file", args.token_file),
                        ("--peer-token-file", args.peer_token_file),
                        ("--sync-interval", args.sync_interval)):
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
