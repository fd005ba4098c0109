"""Merge methods: pure tensor maths, one module per method, behind one registry.

Each method takes one :class:`TensorJob` (an output tensor's base and donors in float64, in
canonical order, with its resolved parameters) and returns the merged float64 tensor. The
resolver fixes the order of the inputs and rounds the result; nothing here touches the
store or the op set, and nothing here depends on threads, CPU kernels or a global RNG.

>>> from crdt_merge.methods import get_method
>>> get_method("dare_ties").needs_base
True

The formulas, tie rules and the randomness construction are written down in
``specs/methods.md``.
"""

from crdt_merge.methods import (  # noqa: F401  (each module registers its methods)
    arcee_fusion,
    breadcrumbs,
    cross_family_params,
    dare,
    della,
    karcher,
    krum,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    robust,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from crdt_merge.methods.base import (
    METHODS,
    REQUIRED,
    WHOLE_MODEL,
    Bound,
    Method,
    ParamSpec,
    TensorJob,
    get_method,
)
from crdt_merge.methods.clipped import register_clipped
from crdt_merge.methods.params import layer_t, parse_scalar, resolve_param
from crdt_merge.methods.slices import OutputTensor, SlicePlan, passthrough_sources, plan_slices

register_clipped()

NOT_IN_MERGEKIT = frozenset({"median", "trimmed_mean", "clipped", "krum", "multi_krum"})
"""Robust methods of crdt-merge that mergekit does not have: ``--from-mergekit`` refuses
them by name."""

__all__ = [
    "NOT_IN_MERGEKIT",
    "METHODS",
    "WHOLE_MODEL",
    "REQUIRED",
    "Bound",
    "Method",
    "OutputTensor",
    "ParamSpec",
    "SlicePlan",
    "TensorJob",
    "get_method",
    "layer_t",
    "parse_scalar",
    "passthrough_sources",
    "plan_slices",
    "resolve_param",
]
