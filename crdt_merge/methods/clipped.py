"""Norm clipping of task vectors, composed with any task-vector method.

A donor whose task vector is far longer than the others' (a delta scaled by mistake, or on
purpose) dominates every weighted sum. ``clipped`` bounds each one first: with
``d_i = x_i - b`` and ``n_i = |d_i|`` (fixed-tree norm), ``M`` the median of the ``n_i``
(even counts: the mean of the two middle values) and ``c = clip * M``,

    ``d_i' = d_i * (c / n_i)``  where ``n_i > c``, else ``d_i`` unchanged,

and the method named by ``then`` (``ties``, ``task_arithmetic``, ``median``...) runs on
the donors ``b + d_i'`` (float64; the result is rounded once). Every other parameter is
``then``'s and is checked by it. Norms are per tensor here; with ``norms: model`` the
resolver supplies each donor's whole-model task-vector norm as its ``model_norm``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crdt_merge.errors import BadParameter
from crdt_merge.lazy import torch
from crdt_merge.methods.base import (
    METHODS,
    Bound,
    Method,
    ParamSpec,
    TensorJob,
    get_method,
    register,
)
from crdt_merge.methods.reduce import f64, norm

THEN = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "median",
    "trimmed_mean",
    "sce",
)
"""The methods ``then`` may name: those over task vectors (plus linear)."""

OWN = (
    ParamSpec("clip", "global", float, 1.0, low=0.0, low_open=True,
              doc="clip task-vector norms to clip * the median norm"),
    ParamSpec("then", "global", str, doc="the method run on the clipped donors"),
    ParamSpec("norms", "global", str, "tensor",
              doc="'tensor': norms per tensor; 'model': whole-model norms (model_norm)"),
    ParamSpec("model_norm", "per_model", float, None, low=0.0,
              doc="the donor's whole-model task-vector norm (set by the resolver)"),
)
_OWN_NAMES = {p.name for p in OWN}


def median_value(values: Sequence[float]) -> float:
    """The median of a few floats (even counts: ``((0 + lo) + hi) / 2``)."""
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else ((0.0 + v[mid - 1]) + v[mid]) / 2.0


def clip_factors(norms: Sequence[float], clip: float) -> list[float]:
    """Each donor's scale: ``c / n_i`` where ``n_i > c = clip * median(n)``, else 1."""
    cap = clip * median_value(norms)
    return [cap / n if n > cap else 1.0 for n in norms]


def _then(value: object, where: str) -> Method:
    if not isinstance(value, str) or value not in THEN:
        raise BadParameter(
            f"{where}: clipped's 'then' must name one of {', '.join(THEN)}; got {value!r}"
        )
    return get_method(value)


def _split(params: Mapping[str, object]) -> tuple[dict, dict]:
    own = {k: v for k, v in params.items() if k in _OWN_NAMES}
    rest = {k: v for k, v in params.items() if k not in _OWN_NAMES}
    return own, rest


def _check_norms(own: Mapping[str, object], where: str) -> None:
    mode = own.get("norms", "tensor")
    if mode not in ("tensor", "model"):
        raise BadParameter(f"{where}: clipped's 'norms' is 'tensor' or 'model', got {mode!r}")


@dataclass(frozen=True)
class Clipped(Method):
    """``clipped``: its own parameters plus those of the method ``then`` names."""

    def validate_recipe(self, global_params: Mapping[str, object]) -> None:
        own, rest = _split(global_params)
        Method.validate_recipe(self._own(), own)
        _check_norms(own, "clipped recipe")
        _then(global_params.get("then"), "clipped recipe").validate_recipe(rest)

    def validate(self, global_params: Mapping[str, object],
                 per_model: Sequence[Mapping[str, object]]) -> None:
        own, rest = _split(global_params)
        mine = [_split(p) for p in per_model]
        Method.validate(self._own(), own, [m for m, _ in mine])
        _check_norms(own, "clipped recipe")
        _then(global_params.get("then"), "clipped recipe").validate(rest, [r for _, r in mine])

    def _own(self) -> Method:
        return Method(name=self.name, paper=self.paper, base=self.base, params=OWN,
                      kernel=self.kernel, min_donors=self.min_donors)

    def bind_values(self, name: str, options_in: Mapping[str, object],
                    params_in: Sequence[Mapping[str, object]]) -> Bound:
        own, rest = _split(options_in)
        mine = [_split(p) for p in params_in]
        bound = Method.bind_values(self._own(), name, own, [m for m, _ in mine])
        _check_norms(bound.options, f"clipped {name}")
        then = _then(bound.options["then"], f"clipped {name}")
        then.bind_values(name, rest, [r for _, r in mine])  # its own checks, now
        return bound


def _clipped(job: TensorJob, bound: Bound) -> torch.Tensor:
    base = job.base
    if base is None:
        raise ValueError("clipped needs a base")
    then = get_method(str(bound.options["then"]))
    flat_b = base.reshape(-1)
    n = flat_b.numel()
    deltas = [torch.sub(x.reshape(-1), flat_b) for x in job.donors]
    if bound.options["norms"] == "model":
        norms = bound.column("model_norm")
        if any(v is None for v in norms):
            raise BadParameter(
                f"clipped {job.name}: norms: model needs every donor's model_norm "
                "(the resolver supplies it)"
            )
        norms = [float(v) for v in norms]
    else:
        norms = [norm(lambda s, e, d=d: f64(d, s, e), n) for d in deltas]
    factors = clip_factors(norms, float(bound.options["clip"]))
    donors = []
    for d, c in zip(deltas, factors, strict=True):
        if c != 1.0:
            d.mul_(c)
        donors.append(d.add_(flat_b).reshape(base.shape))  # b + d_i'
    _, options = _split(job.options)
    params = [_split(p)[1] for p in job.params]
    return then.merge(TensorJob(
        name=job.name, base=base if then.base != "ignored" else None, donors=donors,
        params=params, options=options, keys=job.keys, layer_index=job.layer_index,
        num_layers=job.num_layers))


def _union() -> tuple[ParamSpec, ...]:
    """OWN plus every ``then`` method's parameters, all optional here (``then`` binds its
    own defaults): resolve looks per-model names up in :attr:`Method.params`."""
    specs = {p.name: p for p in OWN}
    for name in THEN:
        for p in METHODS[name].params:
            if p.name not in specs:
                specs[p.name] = ParamSpec(p.name, p.scope, p.type, None, doc=p.doc)
    return tuple(specs.values())


def register_clipped() -> Method:
    """Register ``clipped`` (after every method ``then`` may name)."""
    return register(Clipped(
        name="clipped",
        paper="https://arxiv.org/abs/2012.10333",
        base="required",
        params=_union(),
        kernel=_clipped,
        min_donors=1,
    ))
