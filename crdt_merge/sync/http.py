"""The HTTP transport's client: a :class:`~crdt_merge.sync.protocol.Peer` that is a server.

``HttpPeer(url, token)`` speaks the routes of specs/http.md with httpx. Beyond the plain
Peer it offers what the sync drivers use when present: a conditional state query (an
in-sync check is one ``304``), range-based reconciliation of op ids, and object transfers
on a pool of threads. Downloads are resumable: each object streams into
``tmp/<id>.part`` of the receiving replica, and a transfer that was interrupted (a dropped
connection, a killed server or client) continues with a ``Range`` request from the bytes
already there, so nothing that arrived is sent again. Every object is verified against its
id before it is stored.

Error responses ``{code, detail}`` become the same typed errors the server raised; a
connection that fails becomes :class:`~crdt_merge.sync.wire.PeerUnreachable`.
"""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from crdt_merge import ENGINE, codec
from crdt_merge.errors import CrdtMergeError, HashMismatch, PeerError
from crdt_merge.hashing import check_id, digest
from crdt_merge.store.local import LocalStore
from crdt_merge.store.objects import ObjectWriter
from crdt_merge.sync import wire
from crdt_merge.sync.protocol import Peer, PeerState

#: the most bytes a download may take when the caller declares no size for the object
MAX_DOWNLOAD_BYTES = 64 << 20
#: ops per POST /v1/ops (and at most this many bytes of them)
OPS_PER_REQUEST = 1000
OP_BYTES_PER_REQUEST = 4 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass(frozen=True)
class Exchange:
    """One request as the client saw it. ``sent``/``received`` count the HTTP/1.1 request
    and response heads and bodies (what crosses the connection, bar TCP/IP framing)."""

    method: str
    path: str
    status: int
    sent: int
    received: int


def _head_size(first_line: str, headers: httpx.Headers) -> int:
    return len(first_line) + 2 + sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


class HttpPeer(Peer):
    """A peer reached over HTTP (see the module docstring).

    Args:
        url: the server's base URL (``http://host:port``).
        token: a bearer token (its scopes decide what this peer may do).
        workers: objects transferred at once.
        timeout: seconds to wait for a connection or between bytes.
        transport: an httpx transport (tests use an in-process ASGI transport).
        ca: a PEM file of the CA(s) to check an https server's certificate against.
    """

    def __init__(self, url: str, token: str | None = None, *, workers: int = 4,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None,
                 ca: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.source = f"pull:{self.url}"
        # https: the server's certificate is checked against ``ca`` (a PEM bundle), else
        # against the system's trusted roots
        verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=ca) if ca
                                         else True)
        headers = {"Accept": wire.MSGPACK, "User-Agent": ENGINE}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.workers = max(1, workers)
        self._client = httpx.Client(
            base_url=self.url, headers=headers, transport=transport, verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=self.workers + 2,
                                max_keepalive_connections=self.workers + 2))
        self._lock = threading.Lock()
        self.log: list[Exchange] = []
        #: objects this peer served us / we sent it (as :class:`LocalPeer` counts them)
        self.objects_served = 0
        self.objects_received = 0
        #: per object id, the body bytes downloaded (to check nothing is fetched twice)
        self.downloaded: dict[str, int] = {}
        #: ops the server refused in put_ops: id -> "code: detail"
        self.rejected: dict[str, str] = {}

    def close(self) -> None:
        self._client.close()

    def __del__(self) -> None:
        # callers that drop a peer without closing it (the CLI's open_peer) must not leak
        # its connections
        client = getattr(self, "_client", None)
        if client is not None and not client.is_closed:
            client.close()

    reconciles = True

    # -- plumbing -------------------------------------------------------------------------------

    def _record(self, response: httpx.Response, body_received: int) -> None:
        request = response.request
        sent = _head_size(f"{request.method} {request.url.raw_path.decode()} HTTP/1.1",
                          request.headers) + int(request.headers.get("content-length", 0))
        received = _head_size(f"HTTP/1.1 {response.status_code} {response.reason_phrase}",
                              response.headers) + body_received
        with self._lock:
            self.log.append(Exchange(request.method, request.url.path, response.status_code,
                                     sent, received))

    @contextmanager
    def _unreachable(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            raise wire.PeerUnreachable(f"{self.url}: {type(exc).__name__}: {exc}") from None

    def _call(self, method: str, path: str, *, body: bytes | None = None,
              headers: dict[str, str] | None = None,
              ok: tuple[int, ...] = (200,)) -> httpx.Response:
        extra = dict(headers or {})
        if body is not None:
            extra.setdefault("Content-Type", wire.MSGPACK)
        with self._unreachable():
            response = self._client.request(method, path, content=body, headers=extra)
        self._record(response, len(response.content))
        if response.status_code not in ok:
            raise wire.error_from_body(response.status_code, response.content)
        return response

    def _msgpack(self, response: httpx.Response) -> Any:
        kind = response.headers.get("content-type", "")
        if not kind.startswith(wire.MSGPACK):
            raise PeerError(f"{self.url} answered {kind or 'no content type'}, not msgpack")
        # a hostile server's answer costs this client no more than a request costs a server
        return codec.decode(response.content, max_items=wire.max_items(response.content, 8))

    def _post(self, path: str, value: Any) -> Any:
        return self._msgpack(self._call("POST", path, body=codec.encode(value)))

    # -- the Peer protocol ------------------------------------------------------------------------

    def _peer_state(self, value: Any) -> PeerState:
        try:
            if value["protocol"] != wire.PROTOCOL_VERSION:
                raise PeerError(f"{self.url} speaks sync protocol {value['protocol']}, "
                                f"this client {wire.PROTOCOL_VERSION}; upgrade one of them")
            return PeerState(check_id(value["genesis"], "genesis id"),
                             check_id(value["state_root"], "state root"), int(value["ops"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PeerError(f"{self.url}: malformed state ({exc})") from None

    def state(self) -> PeerState:
        return self._peer_state(self._msgpack(self._call("GET", "/v1/state")))

    def state_unless(self, root: str) -> PeerState | None:
        """The peer's state, or None when its state root is ``root`` (a 304: one round trip
        of a few hundred bytes)."""
        response = self._call("GET", "/v1/state", headers={"If-None-Match": f'"{root}"'},
                              ok=(200, 304))
        if response.status_code == 304:
            return None
        return self._peer_state(self._msgpack(response))

    def op_ids(self) -> list[str]:
        value = self._msgpack(self._call("GET", "/v1/ops"))
        return wire.id_list(value["ids"], "op id")

    def reconcile(self, message: bytes) -> bytes:
        response = self._call("POST", "/v1/ops/reconcile", body=message)
        kind = response.headers.get("content-type", "")
        if not kind.startswith(wire.MSGPACK):  # reconcile decodes (strictly, bounded) itself
            raise PeerError(f"{self.url} answered {kind or 'no content type'}, not msgpack")
        return response.content

    def get_ops(self, ids: Sequence[str]) -> list[bytes]:
        out: list[bytes] = []
        for i in range(0, len(ids), OPS_PER_REQUEST):
            batch = list(ids[i:i + OPS_PER_REQUEST])
            value = self._post("/v1/ops/fetch", {"ids": batch})
            ops = value.get("ops") if isinstance(value, dict) else None
            if not isinstance(ops, list) or len(ops) != len(batch) or not all(
                    isinstance(op, bytes) for op in ops):
                raise PeerError(f"{self.url} answered {len(batch)} op ids with something else")
            out.extend(ops)
        return out

    def missing(self, ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(ids))
        out: set[str] = set()
        for i in range(0, len(ids), wire.BATCH):
            batch = ids[i:i + wire.BATCH]
            value = self._post("/v1/pieces/missing", {"ids": batch})
            got = set(wire.id_list(value["missing"], "object id"))
            if not got <= set(batch):
                raise PeerError(f"{self.url} reported missing objects it was not asked about")
            out |= got
        return out

    def get_object(self, object_id: str) -> bytes:
        check_id(object_id, "object id")
        response = self._call("GET", f"/v1/pieces/{object_id}", headers={"Accept": wire.OCTETS})
        data = response.content
        actual = digest(data)
        if actual != object_id:
            raise HashMismatch(object_id, actual)
        with self._lock:
            self.objects_served += 1
            self.downloaded[object_id] = self.downloaded.get(object_id, 0) + len(data)
        return data

    def put_object(self, object_id: str, data: bytes) -> None:
        check_id(object_id, "object id")
        self._call("PUT", f"/v1/pieces/{object_id}", body=bytes(data),
                   headers={"Content-Type": wire.OCTETS}, ok=(200, 201))
        with self._lock:
            self.objects_received += 1

    def put_ops(self, ops: Sequence[bytes]) -> list[str]:
        committed: list[str] = []
        batch: list[bytes] = []
        size = 0

        def send() -> None:
            value = self._post("/v1/ops", {"ops": batch})
            committed.extend(wire.id_list(value["committed"], "op id"))
            for op_id, err in value["rejected"].items():
                self.rejected[op_id] = f"{err['code']}: {err['detail']}"

        for op in ops:
            if batch and (len(batch) >= OPS_PER_REQUEST or size + len(op) > OP_BYTES_PER_REQUEST):
                send()
                batch, size = [], 0
            batch.append(bytes(op))
            size += len(op)
        if batch:
            send()
        return committed

    # -- batched, parallel, resumable transfers ---------------------------------------------------

    def _parallel(self, work: Callable[[str], int], ids: Sequence[str],
                  progress: Callable[[int, int], None]) -> tuple[int, int]:
        """Run ``work(id) -> bytes`` for each id on the pool; raise the first error once every
        transfer has ended (so what could arrive did arrive)."""
        done = nbytes = 0
        errors: list[BaseException] = []
        total = len(ids)
        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, total)),
                                thread_name_prefix="crdt-merge-transfer") as pool:
            futures = [pool.submit(work, i) for i in ids]
            try:
                for future in futures:
                    try:
                        n = future.result()
                    except (CrdtMergeError, OSError) as exc:
                        errors.append(exc)
                        continue
                    done += 1
                    nbytes += n
                    progress(done, total)
            except BaseException:  # Ctrl-C: the transfers not yet started never start
                for future in futures:
                    future.cancel()
                raise
        if errors:
            raise errors[0]
        return done, nbytes

    def fetch_objects(self, store: LocalStore, ids: Sequence[str],
                      progress: Callable[[int, int], None],
                      limits: Mapping[str, int] | None = None) -> tuple[int, int]:
        """Download ``ids`` into ``store``, ``workers`` at a time, each verified and resumable,
        and each cut off (its part file deleted) past ``limits[id]`` bytes (default
        :data:`MAX_DOWNLOAD_BYTES`). Returns (objects, body bytes) received."""
        limits = limits or {}
        return self._parallel(
            lambda i: self._download(store, i, limits.get(i, MAX_DOWNLOAD_BYTES)), ids, progress)

    def put_objects(self, store: LocalStore, ids: Sequence[str],
                    progress: Callable[[int, int], None]) -> tuple[int, int]:
        """Upload ``ids`` from ``store``, ``workers`` at a time. Returns (objects, bytes)."""
        def upload(object_id: str) -> int:
            data = store.get(object_id)
            self.put_object(object_id, data)
            return len(data)

        return self._parallel(upload, ids, progress)

    def _download(self, store: LocalStore, object_id: str,
                  limit: int = MAX_DOWNLOAD_BYTES) -> int:
        check_id(object_id, "object id")
        received = 0
        for attempt in range(2):
            with store.writer(object_id, resumable=True) as writer:
                if store.has(object_id):  # another transfer finished it meanwhile
                    writer.discard()
                    return received
                resumed = writer.size > 0
                received += self._stream_into(writer, object_id, limit)
                try:
                    store.finish(writer)
                except HashMismatch:
                    if attempt == 0 and resumed:
                        continue  # the bytes kept from before were stale: fetch it whole
                    raise
                with self._lock:
                    self.objects_served += 1
                return received
        raise AssertionError("unreachable")  # pragma: no cover

    def _stream_into(self, writer: ObjectWriter, object_id: str,
                     limit: int = MAX_DOWNLOAD_BYTES) -> int:
        """GET the object's bytes from ``writer.size`` on into ``writer``; body bytes read.

        Raises:
            PeerError: the peer sent more than ``limit`` bytes in all (the part file is
                deleted: those bytes cannot be the object).
        """
        offset = writer.size
        headers = {"Accept": wire.OCTETS}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        received = 0
        response = None
        try:
            with self._unreachable(), self._client.stream(
                    "GET", f"/v1/pieces/{object_id}", headers=headers) as response:
                status = response.status_code
                if status == 416 and offset:
                    return 0  # the part file is whole already; finish() checks it
                if status == 206:
                    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
                    if match is None or int(match.group(1)) != offset:
                        raise PeerError(f"{self.url} answered a Range request with another range")
                elif status == 200:
                    if offset:
                        writer.restart()  # the server sent it whole
                else:
                    response.read()
                    received = len(response.content)
                    raise wire.error_from_body(status, response.content)
                for chunk in response.iter_bytes():
                    if writer.size + len(chunk) > limit:
                        writer.discard()
                        raise PeerError(f"{self.url} sent more than the {limit} bytes object "
                                        f"{object_id} can have; its download was dropped")
                    writer.write(chunk)
                    received += len(chunk)
        finally:
            if response is not None:
                self._record(response, received)
                with self._lock:
                    self.downloaded[object_id] = self.downloaded.get(object_id, 0) + received
        return received

    # -- beyond the Peer protocol ------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """The server's checkpoint view: ``state_root``, ``checkpoint_id``, ``plan_id``,
        ``numeric_profile``, ``files`` (``checkpoint_id`` is None with a ``detail`` when
        the state cannot be resolved)."""
        value = self._msgpack(self._call("GET", "/v1/checkpoint"))
        if not isinstance(value, dict) or "state_root" not in value:
            raise PeerError(f"{self.url}: malformed checkpoint view")
        return value

    def wire_totals(self) -> dict[str, int]:
        """Requests made and HTTP bytes sent and received so far."""
        with self._lock:
            return {"requests": len(self.log), "sent": sum(e.sent for e in self.log),
                    "received": sum(e.received for e in self.log)}
