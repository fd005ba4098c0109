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
    random membership op and is signed by a random key: what a keyless relay can make.

    A genuine retract is authored on a throw-away copy of ``replica`` (so the forged body
    has whatever fields the op format requires), then its ``member`` is replaced by a
    random id and it is signed again with a key nobody admitted."""
    shutil.copytree(replica.path, scratch)
    with Replica.open(scratch) as copy:
        genuine = copy.retract([target])
    body = {k: v for k, v in genuine.body.items() if k != "sig"}
    body["member"] = os.urandom(32).hex()
    forged = opmod.sign(body, Ed25519PrivateKey.generate())
    shutil.rmtree(scratch)
    return forged
