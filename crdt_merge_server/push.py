"""Push on write: after its state root moves, a server tells its peers (a small notice);
a peer that hears of a root it does not hold pulls from its own configured peers.

Sending (:class:`Notifier`): one thread sends ``POST /v1/notify {"state_root": id}`` to
every configured peer whenever the root differs from the one it last announced. It is
woken by commits the server makes (pushed ops, anti-entropy rounds) and looks every
``watch_interval`` seconds for commits other processes made in the directory (the CLI).
Roots that move while it sends are announced once, as the latest: a burst of writes makes
few notices. A notice that fails is counted and dropped: anti-entropy is the fallback.

Receiving (:class:`Puller`): a notice carries nothing but a root, and is never trusted for
more. Its sender is not asked for anything: the server pulls from its own configured peers
(the only addresses it ever contacts), in the ordinary anti-entropy round, which verifies
every op and object. A notice costs the receiver O(1): a root equal to its own is
ignored (``current``), any other sets one flag (``pull``; ``coalesced`` when set already).
One thread runs the rounds: never two at once, at least ``notice_interval`` seconds apart,
and the flag is cleared only once a round has the round lock, so all the notices that
arrive while a round waits are served by that one round. A burst of notices makes one
round (plus one more only for notices that arrive while that round is pulling).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import APIRouter, Request, Response

from crdt_merge import codec
from crdt_merge.hashing import check_id
from crdt_merge.sync import wire
from crdt_merge_server.auth import CONTRIBUTE
from crdt_merge_server.bodies import read_body, reply
from crdt_merge_server.metrics import Metrics, peer_label

if TYPE_CHECKING:
    from crdt_merge_server.service import Service

log = logging.getLogger("crdt_merge.server.push")
router = APIRouter()

#: the largest notice body read (a notice is ~80 bytes)
NOTICE_MAX_BYTES = 1024
#: roots remembered from notices, to skip a pending round that every one of them is
#: settled by; past this many the round simply runs
MAX_HINTS = 64
#: seconds a notice may take to reach a peer
NOTICE_TIMEOUT = 5.0


class Notifier:
    """Announces this server's state root to its peers when it moves."""

    def __init__(self, service: Service, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics
        self.peers = service.settings.peers if service.settings.push else ()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.announced = service.replica.state_root()  # a fresh start announces nothing
        self.sent = 0

    def start(self) -> None:
        if self.peers and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="crdt-merge-notifier",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def poke(self) -> None:
        """The root may have moved: look now (cheap; many pokes make one look)."""
        self._wake.set()

    def _loop(self) -> None:
        interval = self.service.settings.watch_interval
        ca = self.service.settings.peer_ca  # https peers: checked as anti-entropy checks them
        verify = ssl.create_default_context(cafile=str(ca)) if ca else True
        with httpx.Client(timeout=NOTICE_TIMEOUT, verify=verify) as client:
            while not self._stop.is_set():
                self._wake.wait(interval)
                self._wake.clear()
                if self._stop.is_set():
                    return
                try:
                    self.announce(client)
                except Exception:  # a bug must not end the notices for good
                    log.exception("push notice failed")

    def announce(self, client: httpx.Client) -> None:
        root = self.service.replica.state_root()
        if root == self.announced:
            return
        body = codec.encode({"state_root": root})
        headers = {"Content-Type": wire.MSGPACK, "Accept": wire.MSGPACK}
        token = self.service.settings.peer_token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        for url in self.peers:
            try:
                response = client.post(url + "/v1/notify", content=body, headers=headers)
                result = "ok" if response.status_code == 202 else f"http_{response.status_code}"
            except httpx.HTTPError as exc:
                result = "unreachable"
                log.info("notice to %s failed: %s", peer_label(url), type(exc).__name__)
            self.metrics.notices_sent.labels(peer_label(url),
                                             result if result in ("ok", "unreachable")
                                             else "refused").inc()
        self.announced = root
        self.sent += 1


class Puller:
    """Runs the anti-entropy rounds that notices ask for (see the module docstring)."""

    def __init__(self, service: Service, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics
        self._cond = threading.Condition()
        self._wanted = False
        self._hints: set[str] = set()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._last_round = float("-inf")
        self.rounds = 0
        self.skipped = 0
        self.busy = False

    def start(self) -> None:
        if self.service.settings.peers and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="crdt-merge-puller",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._wanted and not self.busy

    def hinted(self, root: str) -> bool:
        with self._cond:
            return root in self._hints

    def notice(self, root: str) -> str:
        """Take a notice of ``root``: ``current``, ``pull`` or ``coalesced``."""
        if root == self.service.replica.state_root() or not self.service.settings.peers:
            result = "current"
        else:
            with self._cond:
                result = "coalesced" if self._wanted else "pull"
                self._wanted = True
                if len(self._hints) <= MAX_HINTS:
                    self._hints.add(root)
                self._cond.notify()
        self.metrics.notices_received.labels(result).inc()
        return result

    def _settled(self, hints: set[str]) -> bool:
        """True when the replica's root is every hinted root (nothing to pull for them)."""
        return len(hints) <= MAX_HINTS and hints <= {self.service.replica.state_root()}

    def _loop(self) -> None:
        anti_entropy = self.service.anti_entropy
        while True:
            with self._cond:
                while not self._wanted and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                self.busy = True
                wait = self._last_round + self.service.settings.notice_interval - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)  # notices meanwhile join this round
                    if self._stop:
                        return
            try:
                with anti_entropy.round_lock:
                    with self._cond:  # from here on, notices ask for the next round
                        hints, self._hints = self._hints, set()
                        self._wanted = False
                    if self._settled(hints):
                        self.skipped += 1
                    else:
                        self.rounds += 1
                        anti_entropy.run_once("notice")
            except Exception:  # a bug must not end the pulls for good
                log.exception("notice-started round failed")
            finally:
                self._last_round = time.monotonic()
                with self._cond:
                    self.busy = False


@router.post("/v1/notify", tags=["state"], status_code=202, dependencies=[CONTRIBUTE],
             summary="A peer's notice of its new state root; this server pulls from its own "
                     "configured peers (body {state_root: id})",
             openapi_extra={"requestBody": {"required": True, "content": {
                 wire.MSGPACK: {"schema": {"type": "string", "format": "binary"}}}}})
async def notify(request: Request) -> Response:
    body = await read_body(request, NOTICE_MAX_BYTES)
    root = check_id(wire.decode_map(body, {"state_root": str})["state_root"], "state root")
    puller: Puller = request.app.state.puller
    return reply(request, {"result": puller.notice(root)}, status=202)


def install(app: Any, service: Service, metrics: Metrics) -> tuple[Notifier, Puller]:
    """Make the app's notifier and puller (started by the app's lifespan) and its route."""
    notifier = Notifier(service, metrics)
    puller = Puller(service, metrics)
    app.state.notifier = notifier
    app.state.puller = puller
    service.anti_entropy.listeners.append(lambda *_: notifier.poke())
    app.include_router(router)
    return notifier, puller
