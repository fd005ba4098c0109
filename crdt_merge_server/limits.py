"""What a client may make the server wait for, or hold, per connection (specs/http.md
section 2, "Time and header limits").

uvicorn bounds none of this by itself: a connection that never sends a request, a request
head trickled a byte at a time, a body that stalls or trickles, or a head of thousands of
headers would each hold a connection (and, for a PUT, a temp file) for as long as the
client likes. Here:

- the request line and headers must arrive within ``header_timeout`` seconds of the
  connection opening, or of the first byte of the next request on a kept-alive connection
  (idle kept-alive connections are uvicorn's keep-alive timeout's); else the connection is
  closed (:class:`GuardedH11Protocol`);
- a body the route reads: see :func:`server.bodies.body_chunks` (``408 request_timeout``);
- the rest of a body the route did not read (it answered first: 401, 413, ...) must arrive
  within ``body_timeout`` seconds of the answer; else the connection is closed;
- the request line and headers may hold ``max_header_bytes`` bytes and ``max_headers``
  headers; else ``431 headers_too_large`` (:class:`HeaderLimits`; h11 also stops buffering
  an incomplete head at ``max_header_bytes``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from crdt_merge.sync import wire
from crdt_merge_server.errors import error_response
from crdt_merge_server.settings import Settings


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on whatever the server waits for from the
    client between answers: a request head (``header_timeout``), or the unread rest of a
    body it already answered (``drain_timeout``). While a route runs, no deadline applies
    here (the route's body reads have their own)."""

    header_timeout = 20.0
    drain_timeout = 30.0

    _phase: str | None = None  # "head", "idle" (kept alive, nothing sent yet), "drain"
    _deadline: asyncio.TimerHandle | None = None

    def _set(self, phase: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        seconds = {"head": self.header_timeout, "drain": self.drain_timeout}.get(phase or "")
        if seconds is not None:
            self._deadline = self.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    def _update(self) -> None:
        """Set the deadline the h11 states call for (after events were handled)."""
        theirs, ours = self.conn.their_state, self.conn.our_state
        if theirs is h11.IDLE and ours is h11.IDLE:
            if self._phase not in ("head", "idle"):  # a new cycle: idle until a byte comes
                self._set("head" if self.conn.trailing_data[0] else "idle")
        elif theirs is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            if self._phase != "drain":
                self._set("drain")
        elif self._phase is not None:
            self._set(None)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._set("head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._set(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":
            self._set("head")
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._update()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._update()


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn (``Config(http=...)``), with ``settings``' limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": settings.header_timeout,
                 "drain_timeout": settings.body_timeout})


class HeaderLimits:
    """ASGI middleware: ``431 headers_too_large`` for a request whose line and headers
    exceed ``max_bytes`` or that has more than ``max_count`` headers (counted as sent:
    ``name: value`` and CRLF each)."""

    def __init__(self, app: Any, max_bytes: int, max_count: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_count = max_count

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = (len(scope["method"]) + len(scope.get("raw_path") or b"")
                    + len(scope.get("query_string") or b"") + 12
                    + sum(len(k) + len(v) + 4 for k, v in headers))
            if len(headers) > self.max_count or size > self.max_bytes:
                response = error_response(wire.HeadersTooLarge(self.max_bytes, self.max_count))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
