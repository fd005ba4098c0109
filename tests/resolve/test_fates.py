"""One vocabulary for what the plan does with each contribution (crdt_merge.resolve.fates),
used by `crdt-merge status` and the server's status page alike."""

from __future__ import annotations

from crdt_merge.cli.commands import fates as cli_fates
from crdt_merge.resolve.fates import Fate, fates, planned_fates
from crdt_merge.store.importer import import_model
from crdt_merge.sync import LocalPeer, sync
from crdt_merge_server.page import PlanView

from .conftest import tensors, write_model

REVOKED = "does not count: its author's key was revoked or replaced before it"


def test_every_fate_in_the_words_both_readers_print(replicas, models, tmp_path) -> None:
    a, b, c = replicas

    def put(r, folder):
        return import_model(r.store, str(folder), r.piece_size).manifest_id

    early = a.contribute(put(a, models["ft0"]), params={"weight": "1", "density": "0.5"}).id
    the_plan, error, before = planned_fates(a)
    assert the_plan is None and error is not None and error.code == "plan_error"
    assert {i: str(f) for i, f in before.items()} == {early: "live (no plan yet)"}

    a.set_recipe("linear", {})
    broken = tensors(12, base=tensors(0))
    broken["model.norm.weight"][3] = float("nan")
    nan = a.contribute(put(a, write_model(tmp_path / "nan", broken)), params={"weight": "1"}).id
    gone = a.contribute(put(a, models["ft2"]), params={"weight": "1"}).id
    a.retract([gone])
    late = c.contribute(put(c, models["ft1"]), params={"weight": "1"}).id  # before the revoke
    a.revoke("gamma")  # concurrent with gamma's contribution, which therefore does not count
    sync(a, LocalPeer(c))

    the_plan, error, fate = planned_fates(a)
    assert error is None and the_plan is not None
    text = {i: str(f) for i, f in fate.items()}
    assert text == {
        early: "counted; density is not used by linear; ignored, as mergekit ignores it",
        nan: "excluded: tensor model.norm.weight holds NaN or inf "
             "(set allow_nonfinite=true to keep it)",
        gone: "retracted",
        late: REVOKED,
    }
    assert fate[early] == Fate("counted", notes=(
        "density is not used by linear; ignored, as mergekit ignores it",))
    assert fate[late].kind == "not_counted" and fate[gone].kind == "retracted"
    assert fates(a.ops().values(), the_plan) == fate  # a pure function of (ops, plan)

    # the CLI and the page print the same words, from the same function
    assert cli_fates(a)[0] == text
    assert PlanView().fates(a, a.state_root()) == (text, None)
