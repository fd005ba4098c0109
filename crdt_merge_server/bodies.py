"""Request bodies read under a size cap, responses in the media type the client accepts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
from fastapi import Request, Response
from fastapi.responses import JSONResponse

from crdt_merge import codec
from crdt_merge.errors import SchemaError
from crdt_merge.sync import wire


def wants_json(request: Request) -> bool:
    """True when the client asked for JSON (``Accept: application/json``) and not msgpack."""
    accept = request.headers.get("accept", "")
    return wire.JSON in accept and wire.MSGPACK not in accept


def reply(request: Request, value: Any, status: int = 200,
          headers: Mapping[str, str] | None = None) -> Response:
    """``value`` as canonical msgpack, or as JSON (bytes as hex) when the client wants it."""
    out = dict(headers or {})
    out["Vary"] = "Accept"
    if wants_json(request):
        return JSONResponse(wire.to_json(value), status_code=status, headers=out)
    return Response(codec.encode(value), status_code=status, media_type=wire.MSGPACK,
                    headers=out)


def declared_length(request: Request, limit: int) -> int | None:
    """The Content-Length, if sent.

    Raises:
        BodyTooLarge: it is over ``limit`` (refused before a byte of the body is read).
        SchemaError: it is not a number.
    """
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not (declared.isascii() and declared.isdigit()):  # "²".isdigit() is True
        raise SchemaError("Content-Length is not a number")
    digits = declared.lstrip("0") or "0"
    if len(digits) > 19 or int(digits) > limit:  # int() refuses thousands of digits
        raise wire.BodyTooLarge(limit)
    return int(digits)


async def body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it streams in, under a size cap and a time limit (the server's
    settings ``body_timeout`` and ``min_body_rate``; specs/http.md section 2).

    Raises:
        BodyTooLarge: a declared Content-Length over ``limit`` (before anything is read),
            or ``limit`` + 1 bytes received (reading stops there).
        RequestTimeout: no chunk for ``body_timeout`` seconds, or, once the body has taken
            ``body_timeout`` seconds, fewer than ``min_body_rate`` bytes per second since
            it began.
        SchemaError: a Content-Length that is not a number.
    """
    declared_length(request, limit)
    settings = request.app.state.settings
    start = time.monotonic()
    total = 0
    chunks = request.stream()
    while True:
        # the next chunk, within the idle timeout and the deadline the rate sets
        deadline = start + settings.body_timeout + total / settings.min_body_rate
        wait = min(settings.body_timeout, deadline - time.monotonic())
        try:
            with anyio.fail_after(max(wait, 0)):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise wire.RequestTimeout(time.monotonic() - start, total) from None
        total += len(chunk)
        if total > limit:
            raise wire.BodyTooLarge(limit)
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, read by :func:`body_chunks` (under its size and time limits)."""
    return b"".join([chunk async for chunk in body_chunks(request, limit)])
