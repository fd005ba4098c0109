"""The ``crdt-merge`` command line. Every command takes ``--json``.

User mistakes end with one line on stderr and a non-zero exit, never a traceback: every
:class:`~crdt_merge.errors.CrdtMergeError` is caught here and printed with its code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from crdt_merge import testpoints
from crdt_merge.cli import commands, folder, ops_export, progress
from crdt_merge.cli import transfer as transfer_cli
from crdt_merge.errors import CrdtMergeError


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("crdt-model-merge")
    except PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
        return "unknown (not installed)"


def client_args(c: argparse.ArgumentParser) -> None:
    """How a command that may talk to a server authenticates and checks it."""
    c.add_argument("--token", help="bearer token for a server (visible to other local users "
                                   "in the process list: prefer --token-file or "
                                   "CRDT_MERGE_TOKEN)")
    c.add_argument("--token-file", dest="client_token_file", metavar="FILE",
                   help="a file holding the bearer token")
    c.add_argument("--ca", help="PEM CA bundle to check an https server's certificate against "
                                "(default: the system's; or CRDT_MERGE_CA)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crdt-merge", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--version", action="version", version=f"crdt-merge {_version()}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print machine-readable JSON")
        return c

    def replica_dir(c: argparse.ArgumentParser) -> None:
        c.add_argument("dir", help="the replica directory")

    force = "record it even when the plan would exclude it or fail"

    c = cmd("merge", "merge the models of a mergekit YAML into OUT (a drop-in for "
                     "mergekit-yaml)")
    c.add_argument("config", help="a mergekit merge config (YAML)")
    c.add_argument("out", help="the output model folder")
    c.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base model's tokenizer files to OUT (default: yes)")
    c.add_argument("--out-shard-size", metavar="SIZE",
                   help="parameters per output shard, as mergekit: 5B, 500M (default: 5 GiB "
                        "of data)")
    c.add_argument("--allow-crimes", action="store_true",
                   help="mergekit's mixing of architectures: refused, use cross_family")
    # mergekit-yaml's other options: honoured where they make sense, accepted with a note
    # where they change nothing here, refused by name where they would change the output
    c.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                   help="no progress bars (as mergekit)")
    c.add_argument("-j", "--num-threads", type=int, metavar="N", help="the same as --workers")
    c.add_argument("--transformers-cache", metavar="DIR",
                   help="the Hugging Face cache to find org/name models in (sets HF_HUB_CACHE)")
    for flag in ("cuda", "lazy-unpickle", "low-cpu-memory", "read-to-gpu", "multi-gpu",
                 "async-write", "clone-tensors", "trust-remote-code"):
        c.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=False,
                       help="accepted for mergekit compatibility; changes nothing (the merge "
                            "runs on the CPU in float64, reads safetensors lazily, runs no "
                            "model code)")
    c.add_argument("--gpu-rich", action="store_true",
                   help="accepted for mergekit compatibility; changes nothing")
    c.add_argument("-v", dest="verbose", action="count", default=0,
                   help="accepted for mergekit compatibility; changes nothing")
    for flag in ("device", "write-threads", "lora-merge-cache", "lora-merge-dtype"):
        c.add_argument(f"--{flag}", metavar="VALUE",
                       help="accepted for mergekit compatibility; changes nothing")
    c.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="the card is always written (the checkpoint id covers it): "
                        "--no-write-model-card is refused")
    c.add_argument("--safe-serialization", action=argparse.BooleanOptionalAction,
                   default=True, help="the output is always safetensors: "
                                      "--no-safe-serialization is refused")
    c.add_argument("--random-seed", type=int, metavar="N",
                   help="refused: DARE/DELLA masks come from BLAKE3 keyed by the plan (set the "
                        "recipe's `seed:` parameter in the config instead)")
    c.add_argument("--unsafe-truncate-embeddings", action="store_true",
                   help="refused: a vocabulary size that differs from the base's excludes "
                        "the model (--allow-exclusions merges without it)")
    c.add_argument("--allow-exclusions", action="store_true",
                   help="merge even when a model is excluded (shape, vocabulary, NaN, bad "
                        "parameter); by default that fails")
    c.add_argument("--cache", metavar="DIR",
                   help="the replica folder to use (default: one per config under "
                        "$CRDT_MERGE_CACHE or ~/.cache/crdt-merge)")
    c.add_argument("--workers", type=int, help="worker threads (default: CPU count, at most 8)")

    c = cmd("init", "create a merge project, or join one with --join PEER")
    replica_dir(c)
    c.add_argument("--site", required=True, help="this site's name")
    c.add_argument("--join", metavar="PEER", help="a replica directory (or URL) to join")
    c.add_argument("--name", default="merge", help="project name (new projects)")
    client_args(c)
    c.add_argument("--profile", default="v1", choices=["v1", "test"],
                   help="piece size profile: v1 (16 MiB) or test (4 KiB)")

    c = cmd("admit", "admit a site's public key (admins only)")
    replica_dir(c)
    c.add_argument("site", help="the site's name, as it gave it to init")
    c.add_argument("public_key", help="64 hex characters, from the joining site's init")
    c.add_argument("--role", default="member", choices=["member", "admin"],
                   help="member (contributes, retracts its own) or admin (also admits)")

    c = cmd("revoke", "revoke a member's key (admins only; never the last admin)")
    replica_dir(c)
    c.add_argument("site", help="the site whose live key is revoked")
    c.add_argument("--member", help="its membership op id, when concurrent admits gave the "
                                    "site name to more than one key")

    c = cmd("rotate-key", "give a site a new key; its old key is revoked (admins only)")
    replica_dir(c)
    c.add_argument("site", help="the site that gets the new key")
    c.add_argument("public_key", help="64 hex characters: the site's new public key")
    c.add_argument("--role", choices=["member", "admin"], help="default: the old key's role")
    c.add_argument("--member", help="the old key's membership op id, when ambiguous")

    c = cmd("contribute", "contribute a donor model or delta")
    replica_dir(c)
    c.add_argument("model", help="a .safetensors, .bin or .gguf file, a model folder, a PEFT "
                                 "LoRA adapter folder (needs --base) or an org/name[@rev] repo id")
    c.add_argument("--base", help="the model this one was fine-tuned from")
    c.add_argument("--delta", action="store_true", help="MODEL is a delta against --base")
    c.add_argument("--weight", help="the donor's weight (mergekit `weight`)")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a per-model parameter (density, epsilon, ...); repeatable")
    c.add_argument("--label", help="a name for the model card (default: MODEL as given when "
                                   "it is an org/name repo id, else its file or folder name)")
    c.add_argument("--force", action="store_true", help=force)

    c = cmd("retract", "retract contributions this site made")
    replica_dir(c)
    c.add_argument("op_ids", nargs="+", metavar="OP_ID",
                   help="a contribution's op id or a unique prefix of it (as status prints)")

    c = cmd("recipe", "agree the merge method, its parameters and the anchor")
    replica_dir(c)
    c.add_argument("--method", help="the merge method (mergekit's name: linear, ties, slerp...)")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe parameter (lambda, t, dtype, seed...); repeatable")
    c.add_argument("--anchor", help="the base/anchor model (path, repo id, manifest id or "
                                    "contribution op id)")
    c.add_argument("--from-mergekit", metavar="YAML", help="a mergekit merge config")
    c.add_argument("--force", action="store_true", help=force)

    c = cmd("status", "the replica's state: members, recipe, each contribution's fate")
    replica_dir(c)

    c = cmd("sync", "sync with a peer both ways")
    replica_dir(c)
    c.add_argument("peer", help="another replica directory or a server URL")
    client_args(c)

    c = cmd("plan", "print the merge plan without computing it")
    replica_dir(c)

    c = cmd("resolve", "compute the merged checkpoint")
    replica_dir(c)
    c.add_argument("--out", required=True, help="the output model folder")
    c.add_argument("--plan", metavar="MERGE_MANIFEST", help="re-derive a recorded checkpoint")
    c.add_argument("--workers", type=int, help="worker threads (default: CPU count, at most 8)")
    c.add_argument("--max-shard-size", default=str(5 * 1024**3), metavar="SIZE",
                   help="bytes of tensor data per output shard: 5GB, 500MiB, 1e9 (default 5 GiB)")
    c.add_argument("--format", choices=["safetensors", "gguf"], default="safetensors",
                   help="gguf: also write the checkpoint as one GGUF file (llama, qwen2, gemma3), "
                        "its hash recorded in merge_manifest.json")
    c.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                   help="the GGUF tensor type (default f16; 1-D tensors stay f32)")
    c.add_argument("--gguf-file", metavar="PATH", help="where the GGUF goes (default: OUT.gguf, "
                                                        "beside the folder)")
    c.add_argument("--gguf-no-tokenizer", action="store_true",
                   help="write the GGUF without tokenizer metadata, on purpose (llama.cpp cannot "
                        "run it); without this flag a tokenizer the export cannot write is refused")

    c = cmd("verify", "check that replicas hold the same state and checkpoint")
    replica_dir(c)
    c.add_argument("peers", nargs="+", help="other replica directories or server URLs")
    client_args(c)

    c = cmd("verify-folder", "recompute a checkpoint folder's id from its files (no replica)")
    c.add_argument("folder", help="a checkpoint folder resolve wrote")
    c.add_argument("--expect", metavar="ID", help="the checkpoint id the files must have")
    c.add_argument("--piece-size", type=int,
                   help="bytes per piece (default: as merge_manifest.json records; without "
                        "it, the profile's that gives --expect, else 16 MiB)")

    c = cmd("ops", "export the replica's ops")
    ops = c.add_subparsers(dest="ops_command", required=True)
    oe = ops.add_parser("export", help="every op of the state, canonical bytes, one file")
    oe.add_argument("dir", help="the replica directory")
    oe.add_argument("--out", required=True, help="the file to write (- for stdout)")
    oe.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="print machine-readable JSON")

    c = cmd("transfer", "carry a fine-tune from another family into an anchor (activations)")
    transfer_cli.add_arguments(c)

    c = cmd("fsck", "verify every stored object and op")
    replica_dir(c)
    c.add_argument("--genesis", metavar="PEER_OR_FILE",
                   help="put the project's genesis op back first, from a file holding it "
                        "(such as another replica's genesis.op), a replica directory or a "
                        "server (when opening fails with genesis_corrupt)")
    client_args(c)

    c = cmd("gc", "delete objects only retracted contributions, or no op at all, reference")
    replica_dir(c)
    c.add_argument("--grace", type=float, default=24 * 3600.0,
                   help="seconds an object no op references is kept (default one day)")

    c = cmd("serve", "serve a replica over HTTP (needs the server extra)")
    replica_dir(c)
    c.add_argument("--host", help="address to listen on (default 127.0.0.1; another address "
                                  "needs --token-file)")
    c.add_argument("--port", type=int, help="port (default 8000; 0: any free port)")
    c.add_argument("--token-file", help="accepted tokens, one `SITE SCOPES TOKEN` a line")
    c.add_argument("--peer", action="append", default=[], metavar="URL",
                   help="a server to pull from periodically (anti-entropy); repeatable")
    c.add_argument("--peer-token-file", help="a file holding this site's token for its peers")
    c.add_argument("--sync-interval", type=float, help="seconds between pulls (default 30)")
    c.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS (with --tls-key)")
    c.add_argument("--tls-key", help="PEM private key of --tls-cert")
    c.add_argument("--peer-ca", help="PEM CA bundle to check https peers against")
    c.add_argument("--log-format", choices=["text", "json"],
                   help="access log and server log lines as text (default) or JSON")

    c = cmd("eval", "bits per byte and perplexity of a causal LM on a text")
    c.add_argument("model", help="a model folder (config, safetensors, tokenizer)")
    c.add_argument("--text", required=True, help="a UTF-8 text file")
    c.add_argument("--max-bytes", type=int, help="score only the first N bytes of the text")
    c.add_argument("--window", type=int, default=1024, help="tokens per scoring window")
    c.add_argument("--stride", type=int, default=512, help="new tokens scored per window")

    c = cmd("families", "model families and their canonical namespace")
    fam = c.add_subparsers(dest="families_command", required=True)
    fl = fam.add_parser("list", help="supported families")
    fl.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="print machine-readable JSON")
    fc = fam.add_parser("check", help="detect a model's family and check the round trip")
    fc.add_argument("model", help="a model folder, .safetensors file or repo id")
    fc.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="print machine-readable JSON")
    return p


def _print(payload: Any, as_json: bool) -> None:
    """The payload as JSON (without the people's ``text`` rendering of it), or its text."""
    if as_json:
        if isinstance(payload, dict):
            payload = {k: v for k, v in payload.items() if k != "text"}
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
        return
    if isinstance(payload, dict) and "text" in payload:
        print(payload["text"])
        return
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (130 when interrupted, never a traceback for
    Ctrl-C or a closed pipe)."""
    try:
        args = _parser().parse_args(argv)
        extra = {"verify-folder": folder.cmd_verify_folder, "ops": ops_export.cmd_ops,
                 "transfer": transfer_cli.cmd_transfer}
        if args.command == "merge":
            from crdt_merge.cli.merge import cmd_merge as handler
        else:
            handler = (extra.get(args.command)
                       or getattr(commands, "cmd_" + args.command.replace("-", "_")))
        progress.enable(not args.json)
        try:
            code, payload = handler(args)
        except CrdtMergeError as exc:
            if args.json:
                print(json.dumps({"error": exc.code, "detail": exc.detail}), file=sys.stderr)
            else:
                print(f"crdt-merge: {exc.code}: {exc.detail}", file=sys.stderr)
            return 2
        if payload is not None:
            _print(payload, args.json)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except BaseException as exc:  # noqa: BLE001 - Ctrl-C may surface as a cleanup error
        if _interrupted(exc):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while we print
            print("crdt-merge: interrupted", file=sys.stderr, flush=True)
            return 130
        raise


def _interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or was raised while handling, a KeyboardInterrupt (Ctrl-C in
    the middle of a ``with`` block can surface as the block's cleanup error)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__ or exc.__cause__
        seen += 1
    return False


def _closed_pipe() -> int:
    """The reader went away (``| head``): stop quietly, as other tools do (exit 141)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def run() -> None:
    """The ``crdt-merge`` console script: :func:`main`, then exit. An interrupted run
    exits at once, without waiting for worker threads still finishing a tensor (what is
    on disk is consistent: ops and objects are written atomically)."""
    try:
        testpoints.arm(os.environ.get(testpoints.ENV))
    except ValueError as exc:
        print(f"crdt-merge: {exc}", file=sys.stderr)
        sys.exit(2)
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: a late Ctrl-C changes nothing now
    if code in (130, 141):
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
