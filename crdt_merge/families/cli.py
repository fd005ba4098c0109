"""``crdt-merge families list`` and ``crdt-merge families check MODEL [--json]``.

The CLI package wires these in with :func:`add_parser` and :func:`run_families_cli`;
``python -m crdt_merge.families.cli`` runs them alone. Exit codes: 0 done (and lossless),
1 the round trip is not lossless, 2 the model cannot be read or its family is unknown.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from crdt_merge.errors import CrdtMergeError
from crdt_merge.families.check import check
from crdt_merge.families.detect import list_families

EXIT_OK = 0
EXIT_NOT_LOSSLESS = 1
EXIT_BAD_MODEL = 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``families {list,check}`` to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser("families", help="supported model families and the G1 check")
    commands = parser.add_subparsers(dest="families_command", required=True)
    listing = commands.add_parser("list", help="list the supported families")
    listing.add_argument("--json", action="store_true", help="print JSON")
    checking = commands.add_parser(
        "check", help="detect a model's family and check native -> canonical -> native"
    )
    checking.add_argument("model", metavar="MODEL", help="a folder with config.json and *.safetensors")
    checking.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="crdt-merge")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["families", *argv])


def run_families_cli(args: argparse.Namespace | Sequence[str]) -> tuple[int, dict[str, Any]]:
    """Run ``families list`` or ``families check``; nothing is printed.

    Args:
        args: the namespace :func:`add_parser`'s parser produced, or the arguments after
            ``families`` (``["check", "path/to/model"]``).

    Returns:
        The exit code and the JSON-able payload: ``{"families": [...]}`` for list, the
        :func:`~crdt_merge.families.check` report for check, or ``{"error": {"code",
        "detail"}}`` when the model cannot be read or its family is unknown.
    """
    if not isinstance(args, argparse.Namespace):
        args = _parse(list(args))
    if args.families_command == "list":
        return EXIT_OK, {"families": [family.describe() for family in list_families()]}
    try:
        payload = check(args.model)
    except CrdtMergeError as exc:
        return EXIT_BAD_MODEL, {"error": {"code": exc.code, "detail": exc.detail}}
    except OSError as exc:
        return EXIT_BAD_MODEL, {"error": {"code": "bad_model", "detail": str(exc)}}
    code = EXIT_OK if payload["round_trip"]["lossless"] else EXIT_NOT_LOSSLESS
    return code, payload


def render(payload: dict[str, Any]) -> str:
    """The payload as text for a person."""
    if "error" in payload:
        return f"error ({payload['error']['code']}): {payload['error']['detail']}"
    if "families" in payload:
        width = max(len(f["family"]) for f in payload["families"])
        return "\n".join(
            f"{f['family']:<{width}}  {', '.join(f['model_types']):<22}  {f['description']}"
            for f in payload["families"]
        )
    trip = payload["round_trip"]
    layers = ", ".join(f"{stack} {n}" for stack, n in payload["layers"].items())
    lines = [
        f"family: {payload['family']} (model_type {payload['model_type']}; {layers} layers)",
        f"tensors: {payload['tensors']} native, {len(payload['mapping'])} mapped, "
        f"{len(payload['unmapped'])} unmapped",
    ]
    lines += [f"  tied: {a} = {b}" for a, b in payload["ties"].items()]
    lines += [f"  unmapped: {name}" for name in payload["unmapped"]]
    verdict = "lossless" if trip["lossless"] else "NOT lossless"
    lines.append(
        f"round trip: {verdict} (max_abs_diff {trip['max_abs_diff']}, missing "
        f"{len(trip['missing'])}, extra {len(trip['extra'])}, changed {len(trip['changed'])})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m crdt_merge.families.cli``."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    code, payload = run_families_cli(args)
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(render(payload))
    return code


if __name__ == "__main__":
    sys.exit(main())
