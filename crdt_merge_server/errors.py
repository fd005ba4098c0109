"""The one table from error class to HTTP status, and the handlers that answer
``{code, detail, fields}`` (always JSON, so a person reading curl output can read it).

A class not in the table takes the status of its nearest ancestor that is; an error that is
not a :class:`~crdt_merge.errors.CrdtMergeError` is a bug and answers 500 ``internal_error``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from crdt_merge import errors as e
from crdt_merge.sync import wire

log = logging.getLogger("crdt_merge.server")

STATUS: dict[type[e.CrdtMergeError], int] = {
    e.CrdtMergeError: 500,
    e.FormatError: 400,
    e.NonCanonicalEncoding: 400,
    e.BadId: 400,
    e.SchemaError: 422,
    e.IntegrityError: 422,
    e.HashMismatch: 422,
    e.BadSignature: 422,
    e.StoreError: 500,
    e.PieceMissing: 404,
    e.PieceCorrupt: 503,
    e.OpError: 422,
    e.WrongProject: 409,
    e.UnknownSite: 422,
    e.NotAuthorized: 403,
    e.OpMissing: 404,
    e.IncompleteOp: 409,
    e.RecipeError: 422,
    e.ModelImportError: 422,
    e.PlanError: 409,
    e.ShapeMismatch: 409,
    e.SyncError: 502,
    e.PeerError: 502,
    wire.TransportError: 502,
    wire.PeerUnreachable: 502,
    wire.Unauthenticated: 401,
    wire.Forbidden: 403,
    wire.BodyTooLarge: 413,
    wire.RequestTimeout: 408,
    wire.HeadersTooLarge: 431,
}
#: answers after which the connection is closed: the client is too slow, or what it sent
#: cannot be parsed further
CLOSE = (408, 431)


def status_of(exc: e.CrdtMergeError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 500


def error_response(exc: e.CrdtMergeError) -> JSONResponse:
    status = status_of(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status in CLOSE:
        headers = {"Connection": "close"}
    if status >= 500:
        log.warning("%s: %s", exc.code, exc.detail)
    return JSONResponse(wire.error_body(exc), status_code=status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 406: "not_acceptable"}


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(e.CrdtMergeError)
    async def crdt_merge_error(request: Request, exc: e.CrdtMergeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        loc = first.get("loc", ("",))
        if loc[0] == "path" and str(loc[-1]).endswith("id"):
            return error_response(e.BadId(first.get("input"), where))
        return error_response(e.SchemaError(f"{where}: {first.get('msg', 'invalid')}"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse({"code": code, "detail": str(exc.detail), "fields": {}},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        # the client went away while sending its body: nothing to answer (and no server
        # fault to log as one); whatever the route was writing was discarded
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"code": "internal_error", "detail": "the server failed; see its log",
                             "fields": {}}, status_code=500)
