"""``python -m crdt_merge_server DIR [--host H] [--port P] ...``: serve a replica (``crdt-merge serve``
hands over to this program)."""

from __future__ import annotations

import argparse
import sys

from crdt_merge.errors import CrdtMergeError
from crdt_merge_server.main import serve
from crdt_merge_server.settings import Settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crdt-merge serve", description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--token-file")
    p.add_argument("--peer", action="append", default=[])
    p.add_argument("--peer-token-file")
    p.add_argument("--sync-interval", type=float)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--peer-ca")
    p.add_argument("--log-format", choices=["text", "json"])
    args = p.parse_args(argv)
    try:
        settings = Settings.from_env(host=args.host, port=args.port, token_file=args.token_file,
                                     peers=tuple(args.peer) or None,
                                     peer_token_file=args.peer_token_file,
                                     sync_interval=args.sync_interval,
                                     tls_cert=args.tls_cert, tls_key=args.tls_key,
                                     peer_ca=args.peer_ca, log_format=args.log_format)
        serve(args.dir, settings)
    except CrdtMergeError as exc:
        print(f"crdt-merge: {exc.code}: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
