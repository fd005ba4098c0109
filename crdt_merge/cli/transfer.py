"""``crdt-merge transfer DIR --donor-base M --donor M' --anchor A --calibration TEXT``.

Carries a fine-tune (``M' - M``) made in one architecture family into the anchor's family
from activations on a calibration text (crdt_merge/transfer.py, specs/cross-family.md
section 7), and contributes the result as an ordinary, signed delta against the anchor,
with its provenance in the op. The activation step runs here, once, and is not bit-exact
across CPUs; every replica then resolves the same bytes from the stored delta.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from crdt_merge import codec
from crdt_merge.errors import BadParameter
from crdt_merge.hashing import digest


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _decimal(value: float) -> str:
    return codec.canonical_decimal(value)


def add_arguments(c: Any) -> None:
    c.add_argument("dir", help="the replica directory")
    c.add_argument("--donor-base", required=True, metavar="MODEL",
                   help="the model the donor was fine-tuned from (a local model folder)")
    c.add_argument("--donor", required=True, metavar="MODEL",
                   help="the fine-tuned donor, of the donor base's family")
    c.add_argument("--anchor", required=True, metavar="MODEL",
                   help="the model to carry the fine-tune into (another family is fine)")
    c.add_argument("--calibration", required=True, metavar="TEXT_FILE",
                   help="UTF-8 text the models are run on (a few thousand words or more)")
    c.add_argument("--mode", choices=["direct", "local"], default="direct",
                   help="direct: every projection carries its own change (default); local: "
                        "attention output and MLP down projection fit each sublayer's change")
    c.add_argument("--roles", help="comma-separated roles (default all: attn_q, attn_k, "
                                   "attn_v, attn_o, mlp_gate, mlp_up, mlp_down)")
    c.add_argument("--ridge", type=float, default=1e-4,
                   help="relative ridge of the update's least squares (default 1e-4)")
    c.add_argument("--align-ridge", type=float, default=1e-4,
                   help="relative ridge of the output alignment (default 1e-4)")
    c.add_argument("--top-k", type=int, default=0,
                   help="keep each update's top-k singular directions (default 0: all)")
    c.add_argument("--tau", type=float, default=0.0,
                   help="trust region: ||update|| <= tau ||anchor matrix|| (default 0: off)")
    c.add_argument("--window-chars", type=int, default=1200,
                   help="characters of calibration text per forward pass (default 1200)")
    c.add_argument("--max-windows", type=int, default=0,
                   help="use only the first N windows of the text (default 0: all)")
    c.add_argument("--chunk-layers", type=int, default=0, metavar="N",
                   help="fit the anchor's layers N at a time, holding one chunk's statistics "
                        "in memory (the text runs once per chunk; same result; default 0: all "
                        "at once). About 5 GB per layer at 7B width")
    c.add_argument("--weight", default="1", help="the contribution's weight (default 1)")
    c.add_argument("--label", help="a name for the model card (default: transfer of DONOR)")
    c.add_argument("--keep", metavar="DIR",
                   help="also keep the delta folder here (default: a temporary folder)")


def cmd_transfer(args: Any) -> tuple[int, Any]:
    from crdt_merge import transfer as tr
    from crdt_merge.recipe import parse_value
    from crdt_merge.replica import Replica
    from crdt_merge.store.importer import import_model

    roles = tuple(r.strip() for r in args.roles.split(",")) if args.roles else tr.ROLES
    params = tr.TransferParams(roles=roles, ridge=float(args.ridge),
                               align_ridge=float(args.align_ridge),
                               window_chars=args.window_chars, max_windows=args.max_windows,
                               top_k=args.top_k, tau=float(args.tau), mode=args.mode,
                               chunk_layers=args.chunk_layers)
    params.check()
    try:
        raw = Path(args.calibration).read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadParameter(f"calibration text {args.calibration}: {exc}") from None
    weight = parse_value(args.weight)
    for path in (args.donor_base, args.donor, args.anchor):
        if not Path(path).is_dir():
            raise BadParameter(f"{path}: the transfer runs transformers models, give a local "
                               "model folder (config, weights, tokenizer)")
    with Replica.open(args.dir) as r:
        r.membership()  # fail before running three models when this site cannot author ops
        donor_base, donor_tok = tr.load(args.donor_base)
        donor, _ = tr.load(args.donor)
        anchor, anchor_tok = tr.load(args.anchor)
        result = tr.transfer(donor_base, donor, anchor, donor_tok, anchor_tok, text, params)
        ids = {key: import_model(r.store, path, r.piece_size).manifest_id
               for key, path in (("donor_base", args.donor_base), ("donor", args.donor))}
        anchor_import = import_model(r.store, args.anchor, r.piece_size)
        provenance = {
            "engine": tr.ENGINE, "donor_base": ids["donor_base"], "donor": ids["donor"],
            "anchor": anchor_import.manifest_id, "calibration_blake3": digest(raw),
            "calibration_bytes": len(raw), "positions": result.positions,
            "windows": result.windows, "mode": params.mode, "roles": list(params.roles),
            "ridge": _decimal(params.ridge), "align_ridge": _decimal(params.align_ridge),
            "top_k": params.top_k, "tau": _decimal(params.tau),
            "window_chars": params.window_chars, "max_windows": params.max_windows,
            "chunk_layers": params.chunk_layers,
            "torch": _package("torch"), "transformers": _package("transformers"),
        }
        with tempfile.TemporaryDirectory(prefix="crdt-merge-transfer-") as tmp:
            folder = Path(args.keep) if args.keep else Path(tmp) / "delta"
            tr.write_delta(result, anchor, folder, provenance)
            delta = import_model(r.store, str(folder), r.piece_size)
        label = args.label or f"transfer of {Path(args.donor).name}"
        op = r.contribute(delta.manifest_id, form="delta", base=anchor_import.manifest_id,
                          params={"weight": weight}, label=label[:200],
                          family=str(anchor_import.manifest.meta.get("model_type", ""))[:200],
                          provenance=provenance)
    changed = sorted(result.deltas)
    return 0, {"op_id": op.id, "manifest": delta.manifest_id,
               "base": anchor_import.manifest_id, "provenance": provenance,
               "changed_tensors": len(changed),
               "text": (f"transferred {Path(args.donor).name} into {Path(args.anchor).name}: "
                        f"{len(changed)} matrices from {result.positions} matched positions "
                        f"({result.windows} windows); contributed as delta op {op.id}")}
