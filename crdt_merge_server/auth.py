"""Bearer tokens with scopes: they gate the transport, never the validity of an op.

Each site holds one token; the server's token file grants it ``read``, ``contribute``
(push ops and objects) or ``admin`` (run anti-entropy on demand). Tokens are compared in
constant time, by their SHA-256 digests against every configured token, so neither the
position nor the length of a near match shows in the timing.

With no tokens configured the server serves only loopback clients (it also refuses to
listen on another address; see :mod:`server.main`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable

from fastapi import Depends, Request

from crdt_merge.sync.wire import Forbidden, Unauthenticated
from crdt_merge_server.settings import Settings, Token


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gate:
    """Decides, per request, which token (if any) it carries and whether it may proceed."""

    def __init__(self, settings: Settings) -> None:
        self.open = not settings.tokens
        self._tokens = [(hashlib.sha256(t.secret.encode()).digest(), t) for t in settings.tokens]

    def token_for(self, presented: str) -> Token | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for known, token in self._tokens:  # no early exit: every token is compared
            if hmac.compare_digest(known, digest):
                found = token
        return found

    def check(self, request: Request, scope: str) -> Token | None:
        """Raise unless the request may use ``scope``; return its token (None when open).

        Raises:
            Unauthenticated: tokens are configured and none valid was presented.
            Forbidden: the token lacks ``scope``, or (no tokens) the client is not local.
        """
        if self.open:
            client = request.client.host if request.client else None
            if not is_loopback(client):
                raise Forbidden("this server has no tokens configured and serves loopback "
                                "clients only")
            return None
        header = request.headers.get("authorization", "")
        kind, _, presented = header.partition(" ")
        if kind.lower() != "bearer" or not presented.strip():
            raise Unauthenticated("send `Authorization: Bearer TOKEN` (crdt-merge sync --token)")
        token = self.token_for(presented.strip())
        if token is None:
            raise Unauthenticated("the bearer token is not one this server accepts")
        if scope not in token.scopes:
            raise Forbidden(f"the token of site {token.site!r} lacks the {scope!r} scope")
        return token


#: where a request's scope records the site of its token (read by the access log)
SITE_KEY = "crdt_merge.site"


def require(scope: str) -> Callable[[Request], Token | None]:
    """A FastAPI dependency: the request needs ``scope``."""

    def dependency(request: Request) -> Token | None:
        gate: Gate = request.app.state.gate
        token = gate.check(request, scope)
        if token is not None:  # for the access log: the site, never the token
            request.scope[SITE_KEY] = token.site
        return token

    dependency.__name__ = f"require_{scope}"
    return dependency


READ = Depends(require("read"))
CONTRIBUTE = Depends(require("contribute"))
ADMIN = Depends(require("admin"))
