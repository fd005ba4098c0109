"""Which family a model belongs to: from config.json, confirmed by its tensor names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from crdt_merge.errors import UnknownFamily
from crdt_merge.families.family import Family
from crdt_merge.families.registry import specs


def _unknown(reason: str, model_type: Any = None, architectures: Iterable[str] = (),
             sample: Iterable[str] = ()) -> UnknownFamily:
    """:class:`~crdt_merge.errors.UnknownFamily`, naming the supported families."""
    return UnknownFamily(reason, model_type, architectures, sample, sorted(_families()))


@cache
def _families() -> dict[str, Family]:
    return {name: Family(spec) for name, spec in specs().items()}


def list_families() -> list[Family]:
    """Every supported family, by name."""
    return [family for _, family in sorted(_families().items())]


def get_family(name: str) -> Family:
    """The family called ``name`` (``llama``, ``t5``...).

    Raises:
        UnknownFamily: there is no such family.
    """
    family = _families().get(name)
    if family is None:
        raise _unknown(f"no family is called {name!r}")
    return family


def detect(config: Mapping[str, Any], tensor_names: Iterable[str] = ()) -> Family:
    """The family of a model, from ``config.json`` and (when given) its tensor names.

    ``model_type`` decides; ``architectures`` decide only when there is no ``model_type``,
    and must agree with it when both are known. With tensor names, the family's required
    tensors must all be there. Nothing is guessed.

    Raises:
        UnknownFamily: no family, two families, or tensors that do not fit the family.
    """
    names = sorted(tensor_names)
    sample = names[:6]
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    families = _families()
    by_arch = {
        f.name for f in families.values() for a in architectures if a in f.spec.architectures
    }
    by_type = [f for f in families.values() if model_type in f.spec.model_types]
    if model_type is not None and not by_type:
        raise _unknown("no supported family has this model_type", model_type, architectures, sample)
    if by_type:
        family = by_type[0]
        if by_arch - {family.name}:
            raise _unknown(
                f"model_type says {family.name} but architectures say {sorted(by_arch)}",
                model_type, architectures, sample,
            )
    elif len(by_arch) == 1:
        family = families[by_arch.pop()]
    else:
        reason = "architectures match several families" if by_arch else "no model_type and no known architecture"
        raise _unknown(reason, model_type, architectures, sample)
    if names:
        mapped = family.match_names(names).canonical()
        missing = [r for r in family.spec.requires if r not in mapped]
        if missing:
            raise _unknown(
                f"config.json says {family.name}, but the tensors lack what a {family.name} "
                f"model has ({', '.join(missing)})",
                model_type, architectures, sample,
            )
    return family


#: the config keys that hold a model's number of layers, in the order they are read when
#: the family is unknown (``num_hidden_layers`` for Llama, Mistral, Qwen, Gemma...;
#: ``n_layer`` for GPT-2, ``num_layers`` for a few others)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(config: Mapping[str, Any], tensor_names: Iterable[str] = ()) -> int | None:
    """A model's number of layers: its family's (:meth:`Family.layers`) when the family is
    known and has one layer stack, else the first of :data:`LAYER_COUNT_KEYS` the config
    holds as a whole number; None when neither says."""
    try:
        layers = detect(config, tensor_names).layers(config)
    except UnknownFamily:
        layers = {}
    if len(layers) == 1:
        return next(iter(layers.values()))
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    return None
