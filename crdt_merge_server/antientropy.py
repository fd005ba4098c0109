"""Background anti-entropy: every ``sync_interval`` seconds, pull from each configured peer
(with no peers, a round only commits staged ops that became complete).

Pushes are a speed-up that can be lost; this periodic pull is what makes replicas converge
whatever was lost. Each round also commits staged ops whose objects arrived since (a push
whose objects came after its ops). A round can be run on demand (``POST /v1/sync``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from crdt_merge.errors import CrdtMergeError
from crdt_merge.replica import Replica
from crdt_merge.sync.http import HttpPeer
from crdt_merge.sync.protocol import pull
from crdt_merge_server.settings import Settings

log = logging.getLogger("crdt_merge.server")


class AntiEntropy:
    """Pulls from ``settings.peers`` into ``replica``, on a thread, until stopped."""

    def __init__(self, replica: Replica, settings: Settings,
                 jitter: random.Random | None = None) -> None:
        self.replica = replica
        self.settings = settings
        self._jitter = jitter or random.Random()
        self._stop = threading.Event()
        self._round = threading.RLock()
        self._thread: threading.Thread | None = None
        self.last: dict[str, dict[str, Any]] = {}
        #: called after each round with (trigger, seconds, results): metrics, push
        self.listeners: list[Callable[[str, float, dict[str, dict[str, Any]]], None]] = []
        self.round_lock = self._round  # held while a round runs

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="crdt-merge-anti-entropy",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while True:
            # +-10% so that servers started together do not pull in lockstep
            wait = self.settings.sync_interval * self._jitter.uniform(0.9, 1.1)
            if self._stop.wait(wait):
                return
            try:
                self.run_once("timer")
            except Exception:  # a bug must not end anti-entropy for good: log it, go on
                log.exception("anti-entropy round failed")

    def pull_from(self, url: str) -> dict[str, Any]:
        """One pull from ``url``: what moved and what it cost on the wire."""
        ca = str(self.settings.peer_ca) if self.settings.peer_ca else None
        with HttpPeer(url, self.settings.peer_token,
                      workers=self.settings.transfer_workers, ca=ca) as peer:
            try:
                stats = pull(self.replica, peer)
            except (CrdtMergeError, OSError) as exc:
                code = getattr(exc, "code", "os_error")
                log.warning("anti-entropy pull from %s failed: %s", url, exc)
                return {"ok": False, "code": code, "detail": str(exc),
                        "wire": peer.wire_totals()}
            return {"ok": True, **stats.__dict__, "wire": peer.wire_totals(),
                    "state_root": self.replica.state_root()}

    def run_once(self, trigger: str = "request") -> dict[str, dict[str, Any]]:
        """Pull from every peer once (rounds never overlap); then commit what can be.
        ``trigger`` (``timer``, ``notice``, ``request``) is passed to the listeners."""
        with self._round:
            started = time.perf_counter()
            out = {}
            for url in self.settings.peers:
                began = time.perf_counter()
                result = self.pull_from(url)
                result["seconds"] = round(time.perf_counter() - began, 6)
                result["at"] = time.time()  # shown to operators; never part of any state
                out[url] = result
            if self.replica.staged_count():
                self.replica.commit_staged()
            self.last = {**self.last, **out}
            seconds = time.perf_counter() - started
            for listener in self.listeners:
                try:
                    listener(trigger, seconds, out)
                except Exception:  # an observer's bug must not fail the round
                    log.exception("anti-entropy listener failed")
            return out
