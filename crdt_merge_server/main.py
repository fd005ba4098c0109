"""Run the server under uvicorn: ``crdt-merge serve DIR --host H --port P``.

With no tokens configured the server only listens on a loopback address and says so; asked
to listen anywhere else without tokens it refuses, since anyone who could reach it could
write to the replica. The socket is bound before uvicorn starts, so ``--port 0`` works and
the first line printed names the real address.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TextIO

import uvicorn

from crdt_merge.errors import BadParameter
from crdt_merge_server import logs
from crdt_merge_server.app import create_app
from crdt_merge_server.auth import is_loopback
from crdt_merge_server.limits import guarded_protocol
from crdt_merge_server.settings import Settings

#: seconds an idle keep-alive connection stays open: longer than clients keep theirs (httpx,
#: hence HttpPeer: 5 s), so the client always gives it up first; with equal timeouts a
#: request sent as the server closes the connection fails with a connection reset
KEEP_ALIVE_SECONDS = 30


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise BadParameter(f"cannot resolve {host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BadParameter(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def check_exposure(settings: Settings) -> str | None:
    """The warning to print, or raise when the address is not loopback and no tokens exist.

    Raises:
        BadParameter: tokens are required for a non-loopback address.
    """
    if settings.tokens:
        return None
    if not is_loopback(settings.host):
        raise BadParameter(f"refusing to listen on {settings.host} without tokens: anyone who "
                           "can reach it could read and write this replica; give --token-file "
                           "(or CRDT_MERGE_TOKEN_FILE), or listen on 127.0.0.1")
    return ("no tokens configured: serving loopback clients only, without authentication "
            "(give --token-file to serve other hosts)")


def serve(replica_dir: str | os.PathLike[str], settings: Settings,
          out: TextIO = sys.stdout) -> None:
    """Serve ``replica_dir`` until interrupted (SIGINT/SIGTERM end it gracefully)."""
    warning = check_exposure(settings)
    logs.configure(settings.log_format)  # the access log and the server's lines, to stderr
    app = create_app(replica_dir, settings)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.tls_cert else "http"
    print(f"crdt-merge: serving {replica_dir} on {scheme}://{shown}:{port}", file=out, flush=True)
    if warning:
        print(f"crdt-merge: {warning}", file=out, flush=True)
    if settings.peers:
        print(f"crdt-merge: pulling from {', '.join(settings.peers)} every "
              f"{settings.sync_interval:g}s", file=out, flush=True)
    tls = ({"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
           if settings.tls_cert else {})
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", **tls,
                            log_config=None,  # logs.configure formats uvicorn's lines too
                            timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                            http=guarded_protocol(settings),  # header and drain deadlines
                            h11_max_incomplete_event_size=settings.max_header_bytes)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
