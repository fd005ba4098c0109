"""The access log (one line per request) and the server's log format (``text`` or ``json``).

Each request answered makes one line on the ``crdt_merge.server.access`` logger: client
address, site of the token (``-`` when none was accepted), method, route template (never
the raw path or query string, which may carry ids or anything a client typed), status,
bytes received and sent, and milliseconds from arrival to the end of the answer. The token
itself is never logged: only the site name the server's own token file gives it.

``text`` lines read as ``key=value`` pairs; ``json`` lines are one JSON object each, for
the access log and for every other line the server logs (uvicorn's included).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any

from crdt_merge_server.auth import SITE_KEY
from crdt_merge_server.metrics import UNMATCHED, Metrics

access_log = logging.getLogger("crdt_merge.server.access")

#: the fields of an access line, in order
FIELDS = ("client", "site", "method", "route", "status", "bytes_in", "bytes_out", "ms")


def route_of(scope: dict[str, Any]) -> str:
    """The template of the route that served the request (``/v1/pieces/{object_id}``)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class AccessLog:
    """ASGI middleware: times each HTTP request, counts its bytes, then logs one line and
    updates the request metrics."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen = {"status": 500, "in": 0, "out": 0}

        async def counting_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                seen["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            seconds = time.perf_counter() - started
            route = route_of(scope)
            client = scope.get("client")
            fields = {
                "client": client[0] if client else "-",
                "site": scope.get(SITE_KEY) or "-",
                "method": scope["method"], "route": route, "status": seen["status"],
                "bytes_in": seen["in"], "bytes_out": seen["out"],
                "ms": round(seconds * 1000, 3),
            }
            self.metrics.request(scope["method"], route, seen["status"], seconds,
                                 seen["out"], seen["in"])
            access_log.info("%s %s %s", fields["method"], route, fields["status"],
                            extra={"access": fields})


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER key=value ...`` for access lines, ``TIME LEVEL LOGGER message``
    for the rest."""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{_timestamp(record)} {record.levelname.lower()} {record.name}"
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            return head + " " + " ".join(f"{k}={_text_value(fields[k])}" for k in FIELDS)
        line = f"{head} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts``, ``level``, ``logger``, then the access fields or
    ``message`` (and ``exception``)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname.lower(),
                               "logger": record.name}
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            out["event"] = "request"
            out.update({k: fields[k] for k in FIELDS})
        else:
            out["message"] = record.getMessage()
            if record.exc_info:
                out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True, separators=(",", ":"))


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(fmt: str, stream: Any = None) -> logging.Handler:
    """Send the server's log lines (``crdt_merge.*`` at INFO, uvicorn's at WARNING) to
    ``stream`` (stderr) in ``fmt``; return the handler. For the server process only: an
    app made in a test leaves the process's logging alone."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    for name, level in (("crdt_merge", logging.INFO), ("uvicorn", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False
    return handler
