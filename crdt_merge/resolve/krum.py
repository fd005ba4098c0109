"""The resolve side of ``krum`` and ``multi_krum`` (whole-model methods, issue 16).

The plan scores every kept contribution over the whole model
(:func:`crdt_merge.resolve.outliers.krum_scores` on the fixed-order squared distances of
:func:`crdt_merge.resolve.outliers.task_vector_stats`), keeps the best one (``krum``) or
``m`` (``multi_krum``, default ``n - f``; ties: the lower op id) and records scores and
choice in its section, so the plan id covers them; every other contribution is an
``excluded`` decision. Execution is the standard per-tensor path with the method's kernel
(the mean of the kept task vectors, :mod:`crdt_merge.methods.krum`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crdt_merge.errors import PlanError
from crdt_merge.methods.params import parse_scalar
from crdt_merge.replica import Replica
from crdt_merge.resolve.merge_plan import (
    Contribution,
    JobInputs,
    MergePlan,
    Section,
    register_whole_model,
)
from crdt_merge.resolve.outliers import cached_stats, krum_scores, krum_select


def plan_section(name: str, replica: Replica, base: str | None,
                 contributions: Sequence[Contribution], params: Mapping[str, Any]) -> Section:
    if base is None:
        raise PlanError(f"{name} needs a base model: give the recipe an anchor")
    n = len(contributions)
    f = int(parse_scalar(params.get("f", 1), int))
    if n - f - 2 < 1:
        raise PlanError(f"{name} with f={f} needs at least {f + 3} contributions (each is "
                        f"scored on its n - f - 2 nearest others); {n} are kept")
    if name == "krum":
        m = 1
    else:
        raw = params.get("m")
        m = n - f if raw is None else int(parse_scalar(raw, int))
        if not 1 <= m <= n:
            raise PlanError(f"multi_krum keeps m={m} of {n} contributions; use 1 <= m <= {n}")
    stats = cached_stats(replica.store, replica.get_manifest(base),
                         [(replica.get_manifest(c.manifest), c.form) for c in contributions])
    scores = krum_scores(stats.dist2, f)
    chosen = krum_select(scores, m)
    section = {"f": f, "m": m,
               "scores": [{"op_id": c.op_id, "score": f"{s:.6g}"}
                          for c, s in zip(contributions, scores, strict=True)],
               "selected": [contributions[i].op_id for i in chosen]}
    decisions: list[dict[str, Any]] = []
    for i, c in enumerate(contributions):
        if i not in chosen:
            decisions.append({"decision": "excluded", "op_id": c.op_id, "by_recipe": True,
                              "detail": f"{name}: score {scores[i]:.6g} is not among the {m} "
                                        f"lowest (f={f})"})
    return Section(section, decisions, tuple(contributions[i] for i in chosen))


@dataclass(frozen=True)
class _Krum:
    """``krum`` / ``multi_krum`` (:class:`~crdt_merge.resolve.plan.WholeModel`)."""

    name: str
    same_shapes: bool = True
    processes: bool = False
    adapters: bool = True  # scored on their materialised task vectors, merged per tensor

    @property
    def run_job(self) -> Any:
        return None

    def plan_section(self, replica: Replica, base: str | None,
                     contributions: Sequence[Contribution], params: Mapping[str, Any],
                     recipe: Mapping[str, Any]) -> Section:
        return plan_section(self.name, replica, base, contributions, params)

    def plan_jobs(self, plan: MergePlan, inputs: JobInputs) -> None:
        return None


KRUM = register_whole_model(_Krum("krum"))
MULTI_KRUM = register_whole_model(_Krum("multi_krum"))
