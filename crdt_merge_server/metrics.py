"""``GET /metrics``: the server's Prometheus metrics (text exposition format).

Each app has its own registry (several apps may live in one process, as in the tests).
Counters move as requests are answered and as sync rounds run; the state of the replica
(ops by kind, objects and bytes stored, quarantined objects, staged ops) is read when
scraped, so it is never stale.

Label values are bounded: route templates (``/v1/pieces/{object_id}``, never the raw
path), methods, status codes, op kinds, error codes of crdt-merge's own classes and the
peer URLs of the server's configuration. No token, id, site label or other string a
client chooses becomes a label value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from crdt_merge import ENGINE
from crdt_merge.errors import error_for_code

if TYPE_CHECKING:
    from crdt_merge_server.service import Service

router = APIRouter()

#: the methods a label may name; any other is counted as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: the route label of a request no route matched (its raw path is never a label)
UNMATCHED = "unmatched"
PIECE_ROUTE = "/v1/pieces/{object_id}"


def peer_label(url: str) -> str:
    """A configured peer's URL without any user or password part."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def error_code(code: Any) -> str:
    """``code`` if it is the code of a crdt-merge error class (a bounded set), else the
    root class's: a peer's answer cannot add label values."""
    if not isinstance(code, str):
        return "crdt_merge_error"
    if code == "os_error":
        return code
    return error_for_code(code).code


class StateCollector(Collector):
    """Gauges read from the replica when scraped."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        r = self.service.replica
        kinds: dict[str, int] = {}
        for op in r.ops().values():
            kinds[op.kind] = kinds.get(op.kind, 0) + 1
        ops = GaugeMetricFamily("crdt_merge_ops", "Committed ops in the replica, by kind",
                                labels=["kind"])
        for kind in sorted(kinds):
            ops.add_metric([kind], kinds[kind])
        yield ops
        count, size = r.store.object_totals()
        yield GaugeMetricFamily("crdt_merge_objects", "Objects (pieces and manifests) stored",
                                value=count)
        yield GaugeMetricFamily("crdt_merge_object_bytes", "Bytes of the objects stored",
                                value=size)
        yield GaugeMetricFamily(
            "crdt_merge_quarantined_objects",
            "Object files moved to quarantine/ because they failed their hash when read",
            value=r.store.quarantined_files())
        yield GaugeMetricFamily(
            "crdt_merge_wanted_objects",
            "Objects lost (quarantined or gone) that the next pull fetches again",
            value=len(r.wanted_objects()))
        yield GaugeMetricFamily("crdt_merge_quarantined_ops",
                                "Stored ops that failed their id or signature when read",
                                value=len(r.quarantined_ops()))
        yield GaugeMetricFamily("crdt_merge_staged_ops",
                                "Ops staged, waiting for their objects or membership op",
                                value=r.staged_count())
        yield GaugeMetricFamily("crdt_merge_peers", "Peers this server pulls from",
                                value=len(self.service.settings.peers))
        last = GaugeMetricFamily("crdt_merge_antientropy_last_round_timestamp_seconds",
                                 "When the last pull from each peer ended (Unix time)",
                                 labels=["peer"])
        ok = GaugeMetricFamily("crdt_merge_antientropy_last_round_ok",
                               "1 when the last pull from each peer succeeded",
                               labels=["peer"])
        for url, result in sorted(self.service.anti_entropy.last.items()):
            if "at" in result:
                last.add_metric([peer_label(url)], result["at"])
            ok.add_metric([peer_label(url)], 1 if result.get("ok") else 0)
        yield last
        yield ok
        info = GaugeMetricFamily("crdt_merge_build_info", "Engine and protocol of this server",
                                 labels=["engine"])
        info.add_metric([ENGINE], 1)
        yield info




class Metrics:
    """The app's registry and the counters the server moves."""

    def __init__(self, service: Service) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "crdt_merge_http_requests", "HTTP requests answered, by route template and status",
            ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "crdt_merge_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by route template",
            ["method", "route"], registry=r,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.pieces_served = Counter(
            "crdt_merge_pieces_served", "Objects served by GET /v1/pieces/{id} (whole or a range)",
            registry=r)
        self.bytes_served = Counter(
            "crdt_merge_piece_bytes_served", "Object bytes served by GET /v1/pieces/{id}",
            registry=r)
        self.pieces_received = Counter(
            "crdt_merge_pieces_received",
            "Objects received: pushed to this server (PUT) or pulled from a peer",
            ["via"], registry=r)
        self.bytes_received = Counter(
            "crdt_merge_piece_bytes_received", "Object bytes received, pushed or pulled",
            ["via"], registry=r)
        self.ops_received = Counter(
            "crdt_merge_ops_received", "Ops received from clients (POST /v1/ops) and peers",
            ["via"], registry=r)
        self.rounds = Counter(
            "crdt_merge_sync_rounds", "Anti-entropy rounds (a pull from every peer), by what "
            "started them", ["trigger"], registry=r)
        self.round_seconds = Histogram(
            "crdt_merge_sync_round_duration_seconds", "Duration of anti-entropy rounds",
            registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        self.pulls = Counter("crdt_merge_antientropy_pulls", "Pulls from each peer, by result",
                             ["peer", "result"], registry=r)
        self.failures = Counter("crdt_merge_antientropy_failures",
                                "Failed pulls from each peer, by error code",
                                ["peer", "code"], registry=r)
        self.notices_sent = Counter("crdt_merge_notices_sent",
                                    "State-root notices sent to each peer after a commit",
                                    ["peer", "result"], registry=r)
        self.notices_received = Counter(
            "crdt_merge_notices_received", "Notices received (POST /v1/notify), by what they "
            "caused: pull (a round was asked for), coalesced (one was pending already), "
            "current (the root is ours)", ["result"], registry=r)
        for via in ("push", "pull"):  # so that rate() sees them from zero
            self.pieces_received.labels(via)
            self.bytes_received.labels(via)
            self.ops_received.labels(via)
        for trigger in ("timer", "notice", "request"):
            self.rounds.labels(trigger)
        r.register(StateCollector(service))

    # -- what the server calls -------------------------------------------------------------

    def request(self, method: str, route: str, status: int, seconds: float, sent: int,
                received: int) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
        if route == PIECE_ROUTE:
            if method == "GET" and status in (200, 206):
                self.pieces_served.inc()
                self.bytes_served.inc(sent)
            elif method == "PUT" and status == 201:
                self.pieces_received.labels("push").inc()
                self.bytes_received.labels("push").inc(received)

    def round(self, trigger: str, seconds: float, results: dict[str, dict[str, Any]]) -> None:
        self.rounds.labels(trigger).inc()
        self.round_seconds.observe(seconds)
        for url, result in results.items():
            peer = peer_label(url)
            if result.get("ok"):
                self.pulls.labels(peer, "ok").inc()
                self.pieces_received.labels("pull").inc(result.get("objects_received", 0))
                self.bytes_received.labels("pull").inc(result.get("bytes_received", 0))
                self.ops_received.labels("pull").inc(result.get("ops_received", 0))
            else:
                self.pulls.labels(peer, "failed").inc()
                self.failures.labels(peer, error_code(result.get("code"))).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_of(request: Request) -> Metrics:
    return request.app.state.metrics


@router.get("/metrics", tags=["meta"], include_in_schema=True,
            summary="Prometheus metrics (text format); the scope CRDT_MERGE_METRICS_SCOPE names")
def get_metrics(request: Request) -> Response:
    from crdt_merge_server.page import page_token  # Bearer, or Basic as Prometheus may send

    settings = request.app.state.settings
    if settings.metrics_scope != "none":
        page_token(request, settings.metrics_scope)
    return Response(metrics_of(request).exposition(), media_type=CONTENT_TYPE_LATEST,
                    headers={"Cache-Control": "no-store"})
