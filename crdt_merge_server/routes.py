"""Routes for the state, the ops, the checkpoint and anti-entropy (specs/http.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from crdt_merge import ENGINE
from crdt_merge.errors import SchemaError
from crdt_merge.sync import reconcile, wire
from crdt_merge_server.auth import ADMIN, CONTRIBUTE, READ, SITE_KEY
from crdt_merge_server.bodies import read_body, reply
from crdt_merge_server.service import Service

router = APIRouter()

MSGPACK_BODY: dict[str, Any] = {
    "requestBody": {"required": True,
                    "content": {wire.MSGPACK: {"schema": {"type": "string", "format": "binary"}}}},
}


def service_of(request: Request) -> Service:
    return request.app.state.service


async def message(request: Request) -> tuple[Service, bytes]:
    """The service and the whole request body, a sync message (``max_message_bytes``)."""
    service = service_of(request)
    return service, await read_body(request, service.settings.max_message_bytes)


async def answer_ids(request: Request, what: str,
                     answer: Callable[[Service, list[str]], dict[str, Any]]) -> Response:
    """Answer a request whose body is ``{ids: [id]}`` (each a ``what``), decoded and
    answered off the event loop."""
    service, body = await message(request)

    def run() -> dict[str, Any]:
        return answer(service, wire.id_list(wire.decode_map(body, {"ids": list})["ids"], what))

    return reply(request, await run_in_threadpool(run))


def etag_matches(header: str | None, tag: str) -> bool:
    """True when an ``If-None-Match`` header names the strong ETag ``"tag"`` (or ``*``)."""
    if not header:
        return False
    wanted = f'"{tag}"'
    return any(part.strip() in (wanted, "*") for part in header.split(","))


@router.get("/healthz", tags=["meta"], summary="Liveness: the replica opens and answers")
def healthz(request: Request) -> Any:
    service = service_of(request)
    return {"ok": True, "engine": ENGINE, "genesis": service.replica.genesis_id}


@router.get("/v1/state", tags=["state"], summary="The replica's state; 304 when unchanged",
            responses={304: {"description": "the state root is the one in If-None-Match"}},
            dependencies=[READ])
def get_state(request: Request) -> Response:
    """Genesis id, state root, op count, checkpoint id (when this server resolved the
    current state), engine, protocol and numeric versions. The strong ETag is the state
    root: send it back in ``If-None-Match`` and an unchanged replica answers ``304``."""
    service = service_of(request)
    root = service.replica.state_root()
    if etag_matches(request.headers.get("if-none-match"), root):
        return Response(status_code=304, headers={"ETag": f'"{root}"',
                                                  "Cache-Control": "no-cache"})
    state = service.state()  # the tag is the root of this body (ops may commit meanwhile)
    headers = {"ETag": f'"{state["state_root"]}"', "Cache-Control": "no-cache"}
    return reply(request, state, headers=headers)


@router.get("/v1/ops", tags=["ops"], summary="Every committed op id (the plain id list)",
            dependencies=[READ])
def list_ops(request: Request) -> Response:
    return reply(request, {"ids": service_of(request).replica.op_ids()})


@router.post("/v1/ops/reconcile", tags=["ops"], openapi_extra=MSGPACK_BODY,
             summary="One round of range-based set reconciliation of op ids",
             dependencies=[READ])
async def reconcile_ops(request: Request) -> Response:
    service, body = await message(request)

    def answer() -> bytes:
        return reconcile.respond(service.id_index(), body)

    return Response(await run_in_threadpool(answer), media_type=wire.MSGPACK)


@router.post("/v1/ops/fetch", tags=["ops"], openapi_extra=MSGPACK_BODY,
             summary="The bytes of the ops named (body {ids: [op id]})",
             dependencies=[READ])
async def fetch_ops(request: Request) -> Response:
    return await answer_ids(request, "op id",
                            lambda service, ids: {"ops": service.replica.serve_ops(ids)})


@router.post("/v1/ops", tags=["ops"], openapi_extra=MSGPACK_BODY,
             summary="Push ops (body {ops: [op bytes]}): staged, committed once complete",
             dependencies=[CONTRIBUTE])
async def push_ops(request: Request) -> Response:
    """Every op is decoded and checked for its project first; one malformed op refuses the
    whole request and stages nothing. Then all are staged and every staged op whose
    membership op and objects are held is committed. Ops whose signature does not verify
    are refused (``rejected``) and not kept; ops still lacking objects stay staged
    (``waiting``) until the objects arrive. Pushing an op twice changes nothing."""
    service, body = await message(request)

    def apply() -> dict[str, Any]:
        raw = wire.decode_map(body, {"ops": list})["ops"]
        if not all(isinstance(data, bytes) for data in raw):
            raise SchemaError("ops must be byte strings (each op's canonical msgpack)")
        # staged as coming from the token's site (or the client address): a flood from one
        # source evicts its own staged ops, never another's (StagingLimits)
        site = request.scope.get(SITE_KEY)
        source = (f"push:{site}" if site else
                  f"push:{request.client.host if request.client else 'unknown'}")
        report = service.replica.receive(raw, source=source)
        return {"committed": report.committed, "already": report.already,
                "waiting": report.waiting,
                "rejected": {k: {"code": v.code, "detail": v.detail}
                             for k, v in report.rejected.items()}}

    answer = await run_in_threadpool(apply)
    request.app.state.metrics.ops_received.labels("push").inc(len(answer["committed"]))
    request.app.state.notifier.poke()  # push on write: tell the peers of the new root
    return reply(request, answer)


@router.get("/v1/checkpoint", tags=["state"],
            summary="The checkpoint id of the current state, and its files",
            dependencies=[READ])
def get_checkpoint(request: Request) -> Response:
    """Resolves the current plan once (into the server's checkpoint directory) and answers
    ``{state_root, checkpoint_id, plan_id, numeric_profile, files}``; ``checkpoint_id`` is
    null with a ``detail`` when the state has no plan yet (no recipe, no contribution)."""
    return reply(request, service_of(request).checkpoint())


@router.post("/v1/sync", tags=["state"],
             summary="Run one anti-entropy round now: pull from every configured peer",
             dependencies=[ADMIN])
def sync_now(request: Request) -> Response:
    return reply(request, {"peers": service_of(request).anti_entropy.run_once()})
