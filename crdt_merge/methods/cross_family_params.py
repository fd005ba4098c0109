"""The ``cross_family`` method's name, parameters and presets, for recipe validation.

The maths (Procrustes alignment of donors of other architecture families, spectral delta,
trust region, anchor blend) is :mod:`crdt_merge.families.align`, and resolve runs it per
canonical tensor (:mod:`crdt_merge.resolve.cross_family`), because donors of another family
have other tensor names and shapes. This module only registers the name and its parameters,
so that ``crdt-merge recipe --method cross_family`` is validated like any other method; the
plain per-tensor path never runs it (its kernel says so). specs/cross-family.md is normative.

Presets (``preset=NAME``; any parameter given next to it overrides the preset's value):

==================== ========= ======== ===== ======
preset               tau_attn  tau_ffn  top_k beta
==================== ========= ======== ===== ======
asymmetric (default) 0.05      0.20     3     0.60
conservative_uniform 0.02      0.02     1     0.80
aggressive_uniform   0.30      0.30     32    0.20
==================== ========= ======== ===== ======
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crdt_merge.errors import BadParameter, RecipeError
from crdt_merge.lazy import torch
from crdt_merge.methods.base import Bound, Method, ParamSpec, TensorJob, register

NAME = "cross_family"

#: preset name -> parameter values (canonical decimal strings, as recipes hold them)
PRESETS: dict[str, dict[str, str]] = {
    "asymmetric": {"tau_attn": "0.05", "tau_ffn": "0.2", "top_k": "3", "beta": "0.6"},
    "conservative_uniform": {"tau_attn": "0.02", "tau_ffn": "0.02", "top_k": "1", "beta": "0.8"},
    "aggressive_uniform": {"tau_attn": "0.3", "tau_ffn": "0.3", "top_k": "32", "beta": "0.2"},
}
DEFAULT_PRESET = "asymmetric"
PRESET = "preset"

PARAMS = (
    ParamSpec(
        "tau_attn",
        "global",
        float,
        None,
        low=0.0,
        doc="trust radius of attention matrices, relative to the anchor's norm",
    ),
    ParamSpec(
        "tau_ffn",
        "global",
        float,
        None,
        low=0.0,
        doc="trust radius of MLP matrices, relative to the anchor's norm",
    ),
    ParamSpec(
        "top_k",
        "global",
        int,
        None,
        low=0,
        doc="at most this many singular directions of a matrix change",
    ),
    ParamSpec(
        "beta",
        "global",
        float,
        None,
        low=0.0,
        high=1.0,
        doc="anchor blend: 1 keeps the anchor, 0 applies the whole trusted delta",
    ),
    ParamSpec(
        "relax_activation",
        "global",
        bool,
        False,
        doc="merge MLP matrices across activations (silu vs gelu): an approximation",
    ),
    ParamSpec(
        "relax_qk_norm",
        "global",
        bool,
        False,
        doc="merge attention q/k across per-head q/k norms: an approximation",
    ),
    ParamSpec("weight", "per_model", float, "1", low=0.0, doc="the donor's weight"),
)


def _no_kernel(job: TensorJob, bound: Bound) -> torch.Tensor:
    raise RecipeError(
        f"{NAME} aligns donors of other families tensor by canonical tensor; resolve runs it "
        f"through crdt_merge.resolve.cross_family, not the per-tensor path ({job.name})"
    )


@dataclass(frozen=True)
class CrossFamilyMethod(Method):
    """A :class:`Method` whose recipe may also name a ``preset`` (a string, which
    :class:`ParamSpec` does not type); the rest validates as usual."""

    def validate(
        self, global_params: Mapping[str, object], per_model: Sequence[Mapping[str, object]]
    ) -> None:
        super().validate(_without_preset(global_params), per_model)

    def validate_recipe(self, global_params: Mapping[str, object]) -> None:
        super().validate_recipe(_without_preset(global_params))


def _without_preset(params: Mapping[str, object]) -> dict[str, object]:
    preset = params.get(PRESET, DEFAULT_PRESET)
    if not isinstance(preset, str) or preset not in PRESETS:
        raise BadParameter(f"{NAME}: preset {preset!r} is not one of {', '.join(sorted(PRESETS))}")
    return {k: v for k, v in params.items() if k != PRESET}


def effective_params(params: Mapping[str, object]) -> dict[str, object]:
    """The recipe's parameters with its preset expanded: the preset's values, then every
    parameter the recipe sets, then the defaults of the rest (``preset`` itself dropped).

    Raises:
        BadParameter: an unknown preset or parameter, or a value out of range.
    """
    METHOD.validate_recipe(params)
    out: dict[str, object] = dict(PRESETS[str(params.get(PRESET, DEFAULT_PRESET))])
    out.update({k: v for k, v in params.items() if k != PRESET})
    for spec in METHOD.params:
        if spec.scope == "global" and spec.name not in out:
            out[spec.name] = spec.default
    return dict(sorted(out.items()))


METHOD = register(
    CrossFamilyMethod(
        name=NAME,
        paper="https://doi.org/10.1007/BF02289451",  # Schonemann, orthogonal Procrustes
        base="required",
        params=PARAMS,
        kernel=_no_kernel,
        min_donors=1,
        blas=True,
    ),
    per_tensor=False,
)
