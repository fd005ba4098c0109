"""Reading and upkeep of one replica: ``status`` (its state as data), ``fsck`` (verify every
held object and op, quarantine what fails) and ``gc`` (delete objects nothing needs).

Plain functions over a :class:`~crdt_merge.replica.Replica`, through its public API and its
store's: the replica does not import this module, and the SQL stays in the store's index.
The CLI (``status``, ``fsck``, ``gc``) and the server's page call these.
"""

from __future__ import annotations

import time
from typing import Any

from crdt_merge.crdt import opset
from crdt_merge.errors import PieceCorrupt, PieceMissing
from crdt_merge.replica import Replica

#: seconds an object no op references is kept before gc deletes it (one day)
GC_GRACE = 24 * 3600.0


def status(replica: Replica) -> dict[str, Any]:
    """The replica's state: project, site, state root, op and staged counts, sites, every
    contribution (``live``: not retracted by its site; ``counts``: its author's key was
    not revoked before it), the winning recipe and the conflicting ones, the retracts that
    are ignored (by another site than the contribution's), members, and the ops that do not
    count and why."""
    held = replica.ops()
    ops = list(held.values())
    state = opset.membership(ops)
    recipes = opset.recipe_state(ops, state.counted)
    live = {op.id for op in opset.live_contributions(ops, state.counted)}
    contributions = [
        {"op_id": op.id, "site": op.site, "label": op.body["label"],
         "manifest": op.body["manifest"], "form": op.body["form"],
         "params": op.body["params"], "live": op.id in live,
         "counts": op.id in state.counted}
        for op in sorted((o for o in ops if o.kind == "contribute"), key=lambda o: o.id)
    ]
    recipe = None
    if recipes.winner is not None:
        w = recipes.winner.body
        recipe = {"op_id": recipes.winner.id, "method": w["method"], "params": w["params"],
                  "anchor": w.get("anchor"), "site": w["site"]}
    return {
        "project": replica.genesis_id, "site": replica.site, "state_root": replica.state_root(),
        "ops": len(ops), "staged": replica.staged_count(),
        "sites": sorted({op.site for op in ops}),
        "contributions": contributions, "recipe": recipe,
        "conflicts": [{"op_id": op.id, "method": op.body["method"], "site": op.site}
                      for op in recipes.conflicts],
        "ignored_retracts": [{"retract": r.id, "target": t}
                             for r, t in opset.ignored_retracts(ops, state.counted)],
        "members": replica.members(),
        "not_counted": [{"op_id": op_id, "kind": held[op_id].kind,
                         "site": held[op_id].site, "why": why}
                        for op_id, why in state.not_counted.items()],
    }


def gc(replica: Replica, grace: float = GC_GRACE) -> dict[str, int]:
    """Delete objects referenced only by contributions a binding retract by their own
    member names (:func:`opset.self_retracted`: never live again), and
    objects no committed or verified staged op references at all (a PUT nobody's op
    named, an abandoned upload) once they are ``grace`` seconds old: the grace keeps
    the objects of a push whose ops are still on their way. ``deleted`` counts both,
    ``unreferenced`` the second kind; stale download part files go too.

    When a committed op that is not retracted lacks one of its manifests (quarantined,
    waiting to be fetched again), its pieces are unknown, so nothing is deleted: gc
    would otherwise delete pieces that op still needs and no sync would bring back.
    """
    store = replica.store
    held = replica.ops()
    ops = list(held.values())
    # only contributions never live again (formats.md 8): a retract that a later revoke
    # could cancel leaves its target's objects in place
    gone = opset.self_retracted(ops)
    keep: set[str] = set()
    dead: set[str] = set()
    for op in ops + replica.pending():
        refs = [m for m in op.objects() if store.has(m)]
        objects = set(replica.closure(refs))
        if op.id in gone:
            dead |= objects
        else:
            if op.id in held and len(refs) < len(op.objects()):
                return {"deleted": 0, "unreferenced": 0}
            keep |= objects | set(op.objects())
    doomed = sorted(dead - keep)
    now = time.time()
    loose = [o for o in store.object_ids() if o not in keep and o not in dead
             and now - store.mtime(o) >= grace]
    store.delete_objects(doomed + loose)
    store.clean_parts()
    return {"deleted": len(doomed) + len(loose), "unreferenced": len(loose)}


def fsck(replica: Replica) -> dict[str, Any]:
    """Verify every held object and op; quarantine what fails. ``ok`` is False when
    anything was corrupt or an op lacks its objects. ``corrupt`` lists the indexed
    objects whose file failed its hash or was gone; each is wanted again from a peer."""
    store = replica.store
    corrupt = []
    for object_id in store.object_ids():
        try:
            store.get(object_id)
        except (PieceCorrupt, PieceMissing):
            corrupt.append(object_id)
    replica.recheck_ops()
    # a genesis row that failed its id is put back from its copy (GenesisCorrupt without one)
    restored = replica.check_genesis() or replica.genesis_restored
    bad_ops = replica.quarantined_ops()
    ops = list(replica.ops().values())
    gone = opset.self_retracted(ops)
    incomplete = []
    for op in ops:
        needed = replica.objects_needed(op, gone)
        have = [m for m in needed if store.has(m)]
        if len(have) < len(needed) or store.missing(replica.closure(have)):
            incomplete.append(op.id)
    return {"objects": len(store.object_ids()) + len(corrupt), "corrupt": corrupt,
            "bad_ops": bad_ops, "incomplete_ops": incomplete, "genesis_restored": restored,
            "wanted": replica.wanted_objects(),
            "ok": not (corrupt or bad_ops or incomplete)}
