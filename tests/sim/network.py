"""A simulated network between in-process replicas, as a :class:`~crdt_merge.sync.Peer`.

Every call a sync driver makes through :class:`SimPeer` is one request and one response
crossing :class:`SimNetwork`, which, drawing only from its own seeded ``random.Random``:

- refuses calls between sites on the two sides of a partition (``PeerError``);
- drops a request (the peer never sees it) or a response (the peer acted, the caller
  sees a failure), both as the ``PeerError`` a real transport raises on a timeout;
- duplicates a write (``put_ops``/``put_object`` delivered twice) and reorders batches
  (the ops of a ``put_ops``, the ids and ops of a response);
- delays a ``put_ops`` batch: the caller times out, and the batch arrives later, at a
  step the simulation chooses, or is lost at the heal.

Nothing here reads the clock or the global RNG, so one seed gives one history.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from crdt_merge.errors import PeerError
from crdt_merge.replica import Replica
from crdt_merge.sync import LocalPeer
from crdt_merge.sync.protocol import Peer, PeerState

T = TypeVar("T")


@dataclass
class Faults:
    """Per-call probabilities of each fault (all zero: a perfect network)."""

    drop_request: float = 0.0
    drop_response: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0


LOSSY = Faults(drop_request=0.02, drop_response=0.02, duplicate=0.15, reorder=0.5, delay=0.15)
HEALED = Faults(duplicate=0.15, reorder=0.5)  # anti-entropy: nothing lost, still messy


@dataclass
class Delayed:
    """A ``put_ops`` batch in flight to ``dst``."""

    src: str
    dst: str
    ops: list[bytes]


@dataclass
class SimNetwork:
    """The wires between sites: faults, partitions, and the messages still in flight."""

    rng: random.Random
    log: Callable[[str], None]
    faults: Faults = field(default_factory=Faults)
    groups: dict[str, int] = field(default_factory=dict)  # site -> partition side
    in_flight: list[Delayed] = field(default_factory=list)

    def reachable(self, a: str, b: str) -> bool:
        return self.groups.get(a, 0) == self.groups.get(b, 0)

    def partition(self, sides: dict[str, int]) -> None:
        self.groups = dict(sides)

    def heal(self) -> None:
        self.groups = {}

    def chance(self, p: float) -> bool:
        return p > 0 and self.rng.random() < p

    def shuffled(self, items: Sequence[T]) -> list[T]:
        out = list(items)
        if len(out) > 1 and self.chance(self.faults.reorder):
            self.rng.shuffle(out)
        return out

    def deliver_one(self, replicas: dict[str, Replica]) -> None:
        """Deliver one delayed batch, chosen at random among those whose route is up."""
        ready = [i for i, m in enumerate(self.in_flight) if self.reachable(m.src, m.dst)]
        if not ready:
            self.log("deliver: nothing in flight can arrive")
            return
        msg = self.in_flight.pop(self.rng.choice(ready))
        self.log(f"deliver: delayed put_ops {msg.src}->{msg.dst} ({len(msg.ops)} ops)")
        receive(replicas[msg.dst], self.shuffled(msg.ops))

    def flush(self, replicas: dict[str, Replica]) -> None:
        """At the heal: each message still in flight arrives or is lost."""
        while self.in_flight:
            msg = self.in_flight.pop(self.rng.randrange(len(self.in_flight)))
            if self.rng.random() < 0.5:
                self.log(f"flush: lost put_ops {msg.src}->{msg.dst}")
            else:
                self.log(f"flush: delivered put_ops {msg.src}->{msg.dst} ({len(msg.ops)} ops)")
                receive(replicas[msg.dst], msg.ops)


def receive(replica: Replica, ops: Sequence[bytes]) -> list[str]:
    """What a peer does with a ``put_ops`` request (as :class:`LocalPeer` does)."""
    return replica.receive(ops).committed


class SimPeer(Peer):
    """``dst`` as ``src`` reaches it through ``net``: a faulty :class:`LocalPeer`."""

    def __init__(self, net: SimNetwork, src: str, dst: Replica) -> None:
        self.net, self.src, self.dst = net, src, dst
        self.inner = LocalPeer(dst)

    def _call(self, name: str, run: Callable[[], T], *, write: bool = False) -> T:
        net, route = self.net, f"{self.src}->{self.dst.site}"
        if not net.reachable(self.src, self.dst.site):
            net.log(f"  {name} {route}: unreachable")
            raise PeerError(f"{self.dst.site} is unreachable (partition)")
        if net.chance(net.faults.drop_request):
            net.log(f"  {name} {route}: request dropped")
            raise PeerError(f"{name}: request lost")
        result = run()
        if write and net.chance(net.faults.duplicate):
            net.log(f"  {name} {route}: duplicated")
            result = run()
        if net.chance(net.faults.drop_response):
            net.log(f"  {name} {route}: response dropped")
            raise PeerError(f"{name}: response lost")
        return result

    def state(self) -> PeerState:
        return self._call("state", self.inner.state)

    def op_ids(self) -> list[str]:
        return self._call("op_ids", lambda: self.net.shuffled(self.inner.op_ids()))

    def get_ops(self, ids: Sequence[str]) -> list[bytes]:
        def run() -> list[bytes]:
            out = self.inner.get_ops(ids)
            if out and self.net.chance(self.net.faults.duplicate):
                out = out + out[: self.net.rng.randint(1, len(out))]  # a batch re-sent
            return self.net.shuffled(out)
        return self._call("get_ops", run)

    def missing(self, ids: Sequence[str]) -> set[str]:
        return self._call("missing", lambda: self.inner.missing(ids))

    def get_object(self, object_id: str) -> bytes:
        return self._call("get_object", lambda: self.inner.get_object(object_id))

    def put_object(self, object_id: str, data: bytes) -> None:
        self._call("put_object", lambda: self.inner.put_object(object_id, data), write=True)

    def put_ops(self, ops: Sequence[bytes]) -> list[str]:
        net = self.net
        if net.reachable(self.src, self.dst.site) and net.chance(net.faults.delay):
            net.in_flight.append(Delayed(self.src, self.dst.site, list(ops)))
            net.log(f"  put_ops {self.src}->{self.dst.site}: delayed ({len(ops)} ops)")
            raise PeerError("put_ops: timed out")
        return self._call("put_ops", lambda: receive(self.dst, net.shuffled(ops)), write=True)
