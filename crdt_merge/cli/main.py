"""The ``crdt-merge`` command line. Every command takes ``--json``.

User mistakes end with one line on stderr and a non-zero exit, never a traceback: every
:class:`~crdt_merge.errors.CrdtMergeError` is caught here and printed with its code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from crdt_merge.cli import commands, folder, ops_export
from crdt_merge.errors import CrdtMergeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crdt-merge", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print machine-readable JSON")
        return c

    c = cmd("init", "create a merge project, or join one with --join PEER")
    c.add_argument("dir")
    c.add_argument("--site", required=True, help="this site's name")
    c.add_argument("--join", metavar="PEER", help="a replica directory (or URL) to join")
    c.add_argument("--name", default="merge", help="project name (new projects)")
    c.add_argument("--token", help="bearer token when PEER is a server")
    c.add_argument("--profile", default="v1", choices=["v1", "test"],
                   help="piece size profile: v1 (16 MiB) or test (4 KiB)")

    c = cmd("admit", "admit a site's public key (admins only)")
    c.add_argument("dir")
    c.add_argument("site")
    c.add_argument("public_key", help="64 hex characters, from the joining site's init")
    c.add_argument("--role", default="member", choices=["member", "admin"])

    c = cmd("contribute", "contribute a donor model or delta")
    c.add_argument("dir")
    c.add_argument("model", help="a .safetensors file, a model folder or an org/name[@rev] repo id")
    c.add_argument("--base", help="the model this one was fine-tuned from")
    c.add_argument("--delta", action="store_true", help="MODEL is a delta against --base")
    c.add_argument("--weight", help="the donor's weight (mergekit `weight`)")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a per-model parameter (density, epsilon, ...)")
    c.add_argument("--label", help="a name for the model card (default: MODEL)")

    c = cmd("retract", "retract contributions this site made")
    c.add_argument("dir")
    c.add_argument("op_ids", nargs="+")

    c = cmd("recipe", "agree the merge method, its parameters and the anchor")
    c.add_argument("dir")
    c.add_argument("--method")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--anchor", help="the base/anchor model (path, repo id, manifest id or "
                                    "contribution op id)")
    c.add_argument("--from-mergekit", metavar="YAML", help="a mergekit merge config")

    c = cmd("status", "the replica's state")
    c.add_argument("dir")

    c = cmd("sync", "sync with a peer both ways")
    c.add_argument("dir")
    c.add_argument("peer", help="another replica directory or a server URL")
    c.add_argument("--token", help="bearer token for a server")

    c = cmd("plan", "print the merge plan without computing it")
    c.add_argument("dir")

    c = cmd("resolve", "compute the merged checkpoint")
    c.add_argument("dir")
    c.add_argument("--out", required=True)
    c.add_argument("--plan", metavar="MERGE_MANIFEST", help="re-derive a recorded checkpoint")
    c.add_argument("--workers", type=int, help="worker threads (default: CPU count, at most 8)")
    c.add_argument("--max-shard-size", type=int, default=5 * 1024**3)

    c = cmd("verify", "check that replicas hold the same state and checkpoint")
    c.add_argument("dir")
    c.add_argument("peers", nargs="+")
    c.add_argument("--token")

    c = cmd("verify-folder", "recompute a checkpoint folder's id from its files (no replica)")
    c.add_argument("folder")
    c.add_argument("--expect", metavar="ID", help="the checkpoint id the files must have")
    c.add_argument("--piece-size", type=int, help="default: as merge_manifest.json records")

    c = cmd("ops", "export the replica's ops")
    ops = c.add_subparsers(dest="ops_command", required=True)
    oe = ops.add_parser("export", help="every op of the state, canonical bytes, one file")
    oe.add_argument("dir")
    oe.add_argument("--out", required=True, help="the file to write (- for stdout)")
    oe.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    c = cmd("fsck", "verify every stored object and op")
    c.add_argument("dir")

    c = cmd("gc", "delete objects only retracted contributions reference")
    c.add_argument("dir")

    c = cmd("serve", "serve a replica over HTTP (needs the server extra)")
    c.add_argument("dir")
    c.add_argument("--host", help="address to listen on (default 127.0.0.1; another address "
                                  "needs --token-file)")
    c.add_argument("--port", type=int, help="port (default 8000; 0: any free port)")
    c.add_argument("--token-file", help="accepted tokens, one `SITE SCOPES TOKEN` a line")
    c.add_argument("--peer", action="append", default=[], metavar="URL",
                   help="a server to pull from periodically (anti-entropy); repeatable")
    c.add_argument("--peer-token-file", help="a file holding this site's token for its peers")
    c.add_argument("--sync-interval", type=float, help="seconds between pulls (default 30)")

    c = cmd("eval", "bits per byte and perplexity of a causal LM on a text")
    c.add_argument("model", help="a model folder (config, safetensors, tokenizer)")
    c.add_argument("--text", required=True, help="a UTF-8 text file")
    c.add_argument("--max-bytes", type=int, help="score only the first N bytes of the text")
    c.add_argument("--window", type=int, default=1024, help="tokens per scoring window")
    c.add_argument("--stride", type=int, default=512, help="new tokens scored per window")

    c = cmd("families", "model families and their canonical namespace")
    fam = c.add_subparsers(dest="families_command", required=True)
    fl = fam.add_parser("list", help="supported families")
    fl.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    fc = fam.add_parser("check", help="detect a model's family and check the round trip")
    fc.add_argument("model")
    fc.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    return p


def _print(payload: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
        return
    if isinstance(payload, dict) and "text" in payload:
        print(payload["text"])
        return
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    extra = {"verify-folder": folder.cmd_verify_folder, "ops": ops_export.cmd_ops}
    handler = extra.get(args.command) or getattr(commands, "cmd_" + args.command.replace("-", "_"))
    try:
        code, payload = handler(args)
    except CrdtMergeError as exc:
        if args.json:
            print(json.dumps({"error": exc.code, "detail": exc.detail}), file=sys.stderr)
        else:
            print(f"crdt-merge: {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crdt-merge: interrupted", file=sys.stderr)
        return 130
    if payload is not None:
        _print(payload, args.json)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
