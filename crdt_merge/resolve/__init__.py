"""resolve: the pure function from (op set, store) to a checkpoint.

The one place where the store, the CRDT, the methods and the families meet. Its modules,
each one job, import each other in this order only (tests/test_layering.py checks it)::

    profile     numeric profile, checkpoint cache key
    merge_plan  MergePlan, the typed, printable, hashable decision, and plan() that makes
                it (and the registry of whole-model methods)
    io        piece reads, streaming buffers, output writes, write-back, the store cache
    jobs      a plan expanded into typed per-tensor jobs
    runner    jobs computed on worker threads (or processes) within a memory budget
    output    the checkpoint folder: shards, config, model card
    checkpoint  the checkpoint id of a folder, from its files alone; checking a folder
    executor  execute / resolve / resolve_recorded
    cross_family  the cross_family whole-model method (registers itself)
    krum      krum / multi_krum, whole-model robust selection (registers itself)
    (outliers: task-vector statistics and the outlier report, below plan)

This module only re-exports: ``plan``, ``execute`` and ``resolve`` are functions, and no
submodule has their names (``crdt_merge.resolve.plan`` is the function, from
``merge_plan``).
"""

from crdt_merge.resolve import (
           cross_family,  # noqa: F401  (registers its whole-model method)
           krum,  # noqa: F401  (registers krum and multi_krum)
)
from crdt_merge.resolve.checkpoint import MANIFEST_FILE, check_folder, checkpoint_manifest
from crdt_merge.resolve.executor import Resolved, execute, resolve, resolve_recorded
from crdt_merge.resolve.merge_plan import MergePlan, plan
from crdt_merge.resolve.profile import checkpoint_key, numeric_profile

__all__ = ["MANIFEST_FILE", "MergePlan", "Resolved", "check_folder", "checkpoint_key",
           "checkpoint_manifest", "execute", "numeric_profile", "plan", "resolve",
           "resolve_recorded"]
