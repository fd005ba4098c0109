"""Helpers for the keyless-relay tests: forged ops that decode (their structure is valid)
but that no replica can verify."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crdt_merge.crdt import ops as opmod
from crdt_merge.crdt.ops import Op
from crdt_merge.replica import Replica


def forged_retract(replica: Replica, target: str, scratch: Path) -> Op:
    """A retract of ``target`` (a contribution of ``replica``'s own site) that names a
    random membership op and is signed by a random key: what a keyless relay can make."""
    return forged_retracts(replica, target, scratch, 1)[0]


def forged_retracts(replica: Replica, target: str, scratch: Path, count: int) -> list[Op]:
    """``count`` distinct forged retracts of ``target`` (see :func:`forged_retract`).

    A genuine retract is authored once on a throw-away copy of ``replica`` (so the forged
    bodies have whatever fields the op format requires); each copy of its body gets a random
    ``member`` id and is signed with a key nobody admitted."""
    shutil.copytree(replica.path, scratch)
    with Replica.open(scratch) as copy:
        genuine = copy.retract([target])
    shutil.rmtree(scratch)
    body = {k: v for k, v in genuine.body.items() if k != "sig"}
    return [opmod.sign(dict(body, member=os.urandom(32).hex()), Ed25519PrivateKey.generate())
            for _ in range(count)]
