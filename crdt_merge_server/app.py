"""The FastAPI application: ``create_app(replica_dir, settings)``.

One app serves one replica directory. The CLI (and other processes) may keep using that
directory while the app runs: every answer is computed from the current SQLite state.
Routes and bodies are specified in specs/http.md; FastAPI serves the OpenAPI schema at
``/openapi.json`` (and a browsable one at ``/docs``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from crdt_merge import __version__
from crdt_merge.replica import Replica
from crdt_merge_server import errors, metrics, page, pieces, push, routes
from crdt_merge_server.auth import Gate
from crdt_merge_server.limits import HeaderLimits
from crdt_merge_server.logs import AccessLog
from crdt_merge_server.service import Service
from crdt_merge_server.settings import Settings


def create_app(replica_dir: str | os.PathLike[str], settings: Settings | None = None) -> FastAPI:
    """An app serving the replica in ``replica_dir``.

    Args:
        replica_dir: a replica directory (``crdt-merge init``).
        settings: defaults to :meth:`Settings.from_env`, read here, once.

    Raises:
        NotAReplica: ``replica_dir`` is not a replica.
    """
    settings = settings if settings is not None else Settings.from_env()
    service = Service(Replica.open(replica_dir), settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.anti_entropy.start()  # pulls from the peers, commits what became complete
        notifier.start()  # tells the peers when the state root moves
        puller.start()  # pulls when a peer tells of a root this replica lacks
        try:
            yield
        finally:
            notifier.stop()
            puller.stop()
            service.close()

    app = FastAPI(
        title="crdt-merge replica", version=__version__, lifespan=lifespan,
        description="Sync a crdt-merge replica: state, op reconciliation, ops and "
                    "content-addressed objects. Bodies are msgpack (application/vnd.msgpack); "
                    "GET routes answer JSON to `Accept: application/json`; errors are JSON "
                    "`{code, detail, fields}`. See specs/http.md.",
    )
    app.state.settings = settings
    app.state.service = service
    app.state.gate = Gate(settings)
    errors.install(app)
    app.add_middleware(HeaderLimits, max_bytes=settings.max_header_bytes,
                       max_count=settings.max_headers)
    app.include_router(routes.router)
    app.include_router(pieces.router)
    # what an operator sees: the status page, /metrics, the access log, push on write
    app.state.metrics = registry = metrics.Metrics(service)
    service.anti_entropy.listeners.append(registry.round)
    app.state.plan_view = page.PlanView()
    notifier, puller = push.install(app, service, registry)
    app.include_router(page.router)
    app.include_router(metrics.router)
    app.add_middleware(AccessLog, metrics=registry)  # outermost: sees every answer
    return app
