"""Request bodies read under a size cap, responses in the media type the client accepts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
    if not declared.isdigit():
        raise SchemaError("Content-Length is not a number")
    if int(declared) > limit:
        raise wire.BodyTooLarge(limit)
    return int(declared)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, counted as it streams in: at ``limit`` + 1 bytes reading
    stops and :class:`~crdt_merge.sync.wire.BodyTooLarge` is raised (nothing is buffered
    past the limit, and a declared Content-Length over it is refused unread)."""
    declared_length(request, limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise wire.BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
