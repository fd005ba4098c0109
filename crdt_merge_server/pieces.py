"""Routes for objects (pieces and manifests: one content-addressed store, one set of routes).

``GET`` serves an object verified (or a byte range of it, for resumed downloads) with its id
as a strong ETag and immutable caching; ``PUT`` streams a body to a temp file, hashing it as
it arrives, and stores it only when it is whole, within the size cap and equal to its id.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool

from crdt_merge.errors import PieceMissing
from crdt_merge.sync import wire
from crdt_merge_server.auth import CONTRIBUTE, READ
from crdt_merge_server.bodies import body_chunks, declared_length, read_body, reply, wants_json
from crdt_merge_server.routes import MSGPACK_BODY, answer_ids, etag_matches, service_of

router = APIRouter(tags=["pieces"])

ID_PATTERN = "^[0-9a-f]{64}$"
IMMUTABLE = "public, max-age=31536000, immutable"
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
#: positions longer than this many digits are past the end of any object (and int() refuses
#: strings of thousands of digits)
_MAX_DIGITS = 19
ObjectId = Annotated[str, Path(pattern=ID_PATTERN,
                                   description="BLAKE3-256 of the object, 64 lowercase hex")]


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else 1 << 64


def parse_range(header: str, size: int) -> tuple[int, int] | Literal[False] | None:
    """A single ``bytes=`` range as ``(start, end inclusive)``; None to ignore the header
    (malformed or several ranges: the whole object is sent); False when unsatisfiable."""
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = _position(last)
        return (max(0, size - n), size - 1) if n and size else False
    start = _position(first)
    end = min(_position(last), size - 1) if last else size - 1
    if last and _position(last) < start:
        return None
    if start >= size:
        return False
    return start, end


@router.post("/v1/pieces/missing", openapi_extra=MSGPACK_BODY,
             summary="Which of these objects this replica lacks (body {ids: [id]})",
             dependencies=[READ])
async def missing(request: Request) -> Response:
    return await answer_ids(request, "object id", lambda service, ids: {
        "missing": sorted(service.replica.store.missing(ids))})


@router.get("/v1/pieces/{object_id}", summary="An object's bytes (Range requests allowed)",
            responses={206: {"description": "a byte range"}, 304: {"description": "unchanged"},
                       416: {"description": "range not satisfiable"}},
            dependencies=[READ])
def get_object(request: Request, object_id: ObjectId) -> Response:
    store = service_of(request).replica.store
    if not store.has(object_id):
        raise PieceMissing(object_id)
    if wants_json(request):
        return reply(request, {"id": object_id, "size": store.size(object_id)})
    headers = {"ETag": f'"{object_id}"', "Cache-Control": IMMUTABLE, "Accept-Ranges": "bytes",
               "Vary": "Accept"}
    if etag_matches(request.headers.get("if-none-match"), object_id):
        return Response(status_code=304, headers=headers)
    asked = request.headers.get("range")
    if asked:
        size = store.size(object_id)
        span = parse_range(asked, size)
        if span is False:
            return Response(status_code=416, headers={**headers,
                                                      "Content-Range": f"bytes */{size}"})
        if span:
            start, end = span
            data = store.read_range(object_id, start, end + 1)
            return Response(data, status_code=206, media_type=wire.OCTETS, headers={
                **headers, "Content-Range": f"bytes {start}-{start + len(data) - 1}/{size}"})
    return Response(store.get(object_id), media_type=wire.OCTETS, headers=headers)


@router.put("/v1/pieces/{object_id}", status_code=201,
            summary="Store an object; its bytes must hash to its id",
            openapi_extra={"requestBody": {"required": True, "content": {
                wire.OCTETS: {"schema": {"type": "string", "format": "binary"}}}}},
            responses={200: {"description": "already held"}, 201: {"description": "stored"}},
            dependencies=[CONTRIBUTE])
async def put_object(request: Request, object_id: ObjectId) -> Response:
    service = service_of(request)
    store = service.replica.store
    limit = service.settings.max_object_bytes
    declared_length(request, limit)
    if await run_in_threadpool(store.has, object_id):
        # held already: drain the body (under the cap) so the connection stays usable
        await read_body(request, limit)
        return reply(request, {"id": object_id, "new": False}, status=200)
    writer = await run_in_threadpool(store.writer, object_id)
    try:
        async for chunk in body_chunks(request, limit):  # under the size and time limits
            writer.write(chunk)  # a page-cache write; the fsyncs happen in finish()
        _, new = await run_in_threadpool(store.finish, writer)
    except BaseException:
        writer.discard()
        raise
    return reply(request, {"id": object_id, "new": new}, status=201 if new else 200)

