"""`crdt-merge ops export`: the state's ops as one file of canonical bytes that a reader
without crdt-merge decodes and checks (op ids, state root), the same on every replica."""

from __future__ import annotations

from pathlib import Path

import blake3
import msgpack
import pytest

from crdt_merge.cli.main import main
from tests.resolve.test_resolve import anchor, contribute, sync_all
from tests.verifier.independent import enc


def test_two_replicas_in_one_state_export_the_same_checkable_bytes(replicas, models,
                                                                   tmp_path: Path) -> None:
    a, b, c = replicas
    contribute(a, models["ft0"], base=models["base"], weight="1")
    op = contribute(b, models["ft1"], base=models["base"], weight="1")
    b.retract([op.id])
    a.set_recipe("linear", {}, anchor=anchor(a, models["base"]))
    sync_all(a, b, c)
    roots = {r.state_root() for r in (a, b, c)}
    files = [tmp_path / "a.ops", tmp_path / "b.ops"]
    for r, out in zip((a, b), files, strict=True):
        r.close()
        assert main(["ops", "export", str(r.path), "--out", str(out)]) == 0
    data = files[0].read_bytes()
    assert data == files[1].read_bytes()
    export = msgpack.unpackb(data, raw=False)
    assert set(export) == {"v", "project", "state_root", "ops"} and export["v"] == 1
    assert enc(export) == data  # canonical: the independent encoder writes the same bytes
    ids = [blake3.blake3(x).hexdigest() for x in export["ops"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and export["project"] in ids
    root = blake3.blake3(b"crdt-merge/state-root/v1\x00"
                         + b"".join(bytes.fromhex(i) for i in ids)).hexdigest()
    assert {root} == roots == {export["state_root"]}
    assert op.id in ids  # a retracted contribution is still an op of the state


def test_an_anchor_retracted_before_its_pieces_arrived_is_refused_by_name(replicas, models) -> None:
    """Seed 50100 of the simulation: a recipe anchored on the model of a retracted
    contribution whose pieces were never fetched (allowed by causal completeness)."""
    from crdt_merge.errors import IncompleteOp

    a, b, _ = replicas
    op = contribute(a, models["ft0"])
    retract = a.retract([op.id])
    b.stage(a.get_op(retract.id).data)  # the retract first: it waits for its deps
    b.stage(a.get_op(op.id).data)
    b.commit_staged()  # both join; the contribution without its objects (retracted)
    assert {retract.id, op.id} <= set(b.ops())
    manifest = op.body["manifest"]
    b.store.put(a.store.get(manifest))  # the manifest arrived, its pieces never did
    before = b.state_root()
    with pytest.raises(IncompleteOp) as info:
        b.set_recipe("task_arithmetic", {}, anchor=manifest)
    detail = info.value.detail
    assert manifest in detail and op.id in detail and "retracted" in detail
    assert "--anchor PATH" in detail and "sync" in detail
    assert b.state_root() == before  # nothing authored
    # an anchor whose pieces are all held is accepted
    assert b.set_recipe("task_arithmetic", {}, anchor=anchor(b, models["base"])).kind == "recipe"
