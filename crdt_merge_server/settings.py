"""Server settings: from arguments, else ``CRDT_MERGE_*`` environment variables, read once.

    CRDT_MERGE_HOST               address to listen on (127.0.0.1)
    CRDT_MERGE_PORT               port (8000)
    CRDT_MERGE_TOKEN_FILE         tokens accepted by this server (format below); none: open
                                  to loopback clients only
    CRDT_MERGE_PEERS              peer URLs to pull from, separated by spaces or commas
    CRDT_MERGE_PEER_TOKEN_FILE    a file holding this site's token for those peers
    CRDT_MERGE_SYNC_INTERVAL      seconds between anti-entropy pulls (30)
    CRDT_MERGE_MAX_OBJECT_BYTES   largest object a PUT may carry (64 MiB)
    CRDT_MERGE_MAX_MESSAGE_BYTES  largest msgpack request body (32 MiB)
    CRDT_MERGE_TRANSFER_WORKERS   objects fetched at once when pulling (4)
    CRDT_MERGE_CHECKPOINT_DIR     where GET /v1/checkpoint renders checkpoints
                                  (REPLICA/checkpoints)
    CRDT_MERGE_HEADER_TIMEOUT     seconds a client has to send a request line and headers,
                                  from connecting or from the request's first byte (20)
    CRDT_MERGE_BODY_TIMEOUT       seconds the server waits for the next part of a request
                                  body, or for the unread rest of one it answered (30)
    CRDT_MERGE_MIN_BODY_RATE      bytes per second a request body must average once it
                                  has taken BODY_TIMEOUT seconds (1024)
    CRDT_MERGE_MAX_HEADER_BYTES   largest request line and headers, in bytes (16 KiB)
    CRDT_MERGE_MAX_HEADERS        most headers in one request (100)
    CRDT_MERGE_MAX_STAGED_OPS     most ops kept staged (not yet committable) (10000)
    CRDT_MERGE_MAX_STAGED_BYTES   most bytes of staged ops (16 MiB)
    CRDT_MERGE_MAX_STAGED_AGE     seconds a staged op is kept (86400)
    CRDT_MERGE_KEEP_CHECKPOINTS   rendered checkpoints kept besides the current one (2)
    CRDT_MERGE_TLS_CERT           PEM certificate chain: serve HTTPS (with TLS_KEY)
    CRDT_MERGE_TLS_KEY            PEM private key of that certificate
    CRDT_MERGE_PEER_CA            PEM CA bundle to check https peers against (else the
                                  system's)
    CRDT_MERGE_LOG_FORMAT         ``text`` or ``json``: the access log and the server's own
                                  log lines (text)
    CRDT_MERGE_METRICS_SCOPE      the scope ``GET /metrics`` needs: ``read``, ``contribute``,
                                  ``admin``, or ``none`` for anyone who can reach the server
                                  (read)
    CRDT_MERGE_PUSH               ``0`` to stop notifying the peers after a commit (1)
    CRDT_MERGE_NOTICE_INTERVAL    least seconds between two pulls that notices started (1)
    CRDT_MERGE_WATCH_INTERVAL     seconds between looks at the state root for commits made
                                  by other processes (the CLI), which are then pushed (1)

Token file: one token per line, ``SITE SCOPES TOKEN``, scopes comma-separated from
``read``, ``contribute``, ``admin`` (each implies the ones before it); ``#`` starts a
comment. For example::

    alpha admin   4f3c...   # the site that runs this server
    beta  contribute 9a1e...
    ci    read    77d0...
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from crdt_merge.crdt.ops import SITE_NAME
from crdt_merge.errors import BadParameter

SCOPES = ("read", "contribute", "admin")
LOG_FORMATS = ("text", "json")
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Token:
    site: str
    scopes: frozenset[str]
    secret: str = field(repr=False)


def _implied(scope: str) -> frozenset[str]:
    return frozenset(SCOPES[:SCOPES.index(scope) + 1])


def parse_tokens(text: str, source: str = "token file") -> tuple[Token, ...]:
    """Parse a token file (see the module docstring).

    Raises:
        BadParameter: a malformed line, an unknown scope, a short or repeated token.
    """
    tokens: list[Token] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise BadParameter(f"{source}:{number}: write SITE SCOPES TOKEN")
        site, scopes, secret = parts
        if not SITE_NAME.fullmatch(site):
            raise BadParameter(f"{source}:{number}: {site!r} is not a site name")
        granted: set[str] = set()
        for scope in scopes.split(","):
            if scope not in SCOPES:
                raise BadParameter(f"{source}:{number}: scope {scope!r}: use {', '.join(SCOPES)}")
            granted |= _implied(scope)
        if len(secret) < MIN_TOKEN_LENGTH:
            raise BadParameter(f"{source}:{number}: tokens need at least {MIN_TOKEN_LENGTH} "
                               "characters (use `openssl rand -hex 32`)")
        if secret in seen:
            raise BadParameter(f"{source}:{number}: the same token appears twice")
        seen.add(secret)
        tokens.append(Token(site, frozenset(granted), secret))
    return tuple(tokens)


def _flag(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


#: how a setting's environment variable is read, by the field's declared type
_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str, "int": int, "float": float, "bool": _flag, "Path | None": Path}


def _read_text(path: str | os.PathLike[str], what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise BadParameter(f"cannot read the {what} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: tuple[Token, ...] = ()
    peers: tuple[str, ...] = ()
    peer_token: str | None = field(default=None, repr=False)
    sync_interval: float = 30.0
    max_object_bytes: int = 64 << 20
    max_message_bytes: int = 32 << 20
    transfer_workers: int = 4
    checkpoint_dir: Path | None = None
    header_timeout: float = 20.0
    body_timeout: float = 30.0
    min_body_rate: int = 1024
    max_header_bytes: int = 16 << 10
    max_headers: int = 100
    max_staged_ops: int = 10_000
    max_staged_bytes: int = 16 << 20
    max_staged_age: float = 86400.0
    keep_checkpoints: int = 2
    tls_cert: Path | None = None
    tls_key: Path | None = None
    peer_ca: Path | None = None
    log_format: str = "text"
    metrics_scope: str = "read"
    push: bool = True
    notice_interval: float = 1.0
    watch_interval: float = 1.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``environ`` (default: the process environment), with ``overrides``
        (keyword arguments named as the fields; None means "not given") taking precedence.
        ``token_file`` and ``peer_token_file`` may be given instead of ``tokens`` and
        ``peer_token``.

        Raises:
            BadParameter: a malformed value or an unreadable file.
        """
        env = os.environ if environ is None else environ
        given = {k: v for k, v in overrides.items() if v is not None}

        def pick(name: str, var: str, default: Any, parse: Any = str) -> Any:
            if name in given:
                return given.pop(name)
            raw = env.get(var)
            if raw is None or raw == "":
                return default
            try:
                return parse(raw)
            except ValueError:
                raise BadParameter(f"{var}={raw!r} is not a valid value") from None

        token_file = pick("token_file", "CRDT_MERGE_TOKEN_FILE", None)
        tokens = given.pop("tokens", None)
        if tokens is None:
            tokens = parse_tokens(_read_text(token_file, "token file"), str(token_file)) \
                if token_file else ()
        peer_token_file = pick("peer_token_file", "CRDT_MERGE_PEER_TOKEN_FILE", None)
        peer_token = given.pop("peer_token", None)
        if peer_token is None and peer_token_file:
            peer_token = _read_text(peer_token_file, "peer token file").strip() or None
        peers = pick("peers", "CRDT_MERGE_PEERS", (),
                     lambda raw: tuple(p for p in re.split(r"[\s,]+", raw) if p))
        # every other field: its CRDT_MERGE_ variable, parsed by the field's type
        values = {f.name: pick(f.name, f"CRDT_MERGE_{f.name.upper()}", f.default,
                               _PARSERS[str(f.type)])
                  for f in fields(cls) if f.name not in ("tokens", "peers", "peer_token")}
        settings = cls(tokens=tuple(tokens), peers=tuple(p.rstrip("/") for p in peers),
                       peer_token=peer_token, **values)
        if given:
            raise BadParameter(f"unknown settings: {sorted(given)}")
        for peer in settings.peers:
            if not peer.startswith(("http://", "https://")):
                raise BadParameter(f"peer {peer!r} is not an http(s) URL")
        if settings.sync_interval <= 0 or settings.transfer_workers < 1:
            raise BadParameter("the sync interval and transfer workers must be positive")
        if (settings.tls_cert is None) != (settings.tls_key is None):
            raise BadParameter("give both --tls-cert and --tls-key (or neither)")
        for path in (settings.tls_cert, settings.tls_key, settings.peer_ca):
            if path is not None and not Path(path).is_file():
                raise BadParameter(f"{path}: no such file")
        if min(settings.max_staged_ops, settings.max_staged_bytes, settings.max_staged_age) <= 0 \
                or settings.keep_checkpoints < 0:
            raise BadParameter("the staging bounds must be positive and keep_checkpoints at "
                               "least 0")
        if (min(settings.header_timeout, settings.body_timeout) <= 0
                or min(settings.min_body_rate, settings.max_header_bytes,
                       settings.max_headers) < 1):
            raise BadParameter("the header and body timeouts, the minimum body rate and the "
                               "header limits must be positive")
        if settings.log_format not in LOG_FORMATS:
            raise BadParameter(f"log format {settings.log_format!r}: use text or json")
        if settings.metrics_scope not in (*SCOPES, "none"):
            raise BadParameter(f"metrics scope {settings.metrics_scope!r}: use "
                               f"{', '.join(SCOPES)} or none")
        if settings.notice_interval < 0 or settings.watch_interval <= 0:
            raise BadParameter("the notice interval must not be negative and the watch "
                               "interval must be positive")
        return settings

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)
