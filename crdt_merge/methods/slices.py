"""Layer slicing (mergekit's ``slices:``): which source tensors make each output tensor.

A recipe's ``slices`` is a list of output slices, each with ``sources``: one per input model,
``{model, layer_range: [start, end)}``, all of the same length. The output model's layers are
the slices' layers one after the other; output layer ``o`` in slice ``k`` at offset ``i``
comes from layer ``start + i`` of each of the slice's sources. With ``passthrough`` every
slice has one source, so each output tensor is a copy (frankenmerges, depth up-scaling);
with another method the sources of a slice are merged layer by layer.

Tensors outside the layers follow mergekit 0.1.5 (``MergePlanner.plan_module``): those
before the layers (embeddings) come from the first slice's sources and take its parameters,
all others (final norm, lm_head) the last slice's.

The gradient position of a layer tensor (see :func:`crdt_merge.methods.params.layer_t`) is
its offset ``i`` in its slice of ``end - start`` layers (``t = i / (L - 1)``, ``t = 1`` in a
one-layer slice, as ``MergePlanner.plan_slice``); other tensors have ``t = 0``.

Everything here is a pure function of the slices and the models' tensor names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from crdt_merge.errors import BadParameter

LAYER_NAME = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)(?P<suffix>\..+)$"
)
"""A layer tensor's name: ``model.layers.7.mlp.up_proj.weight``, ``transformer.h.7.attn...``."""

_PRE = re.compile(r"embed|(^|\.)(wte|wpe)(\.|$)")


def is_pre_layer(name: str) -> bool:
    """Default rule for tensors outside the layers: embeddings come before the layers."""
    return _PRE.search(name) is not None


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output model.

    Attributes:
        name: its name in the output model.
        sources: ``(model index, source tensor name)`` per source of its slice, in the
            slice's source order.
        layer_index: its offset inside its output slice (``None`` outside the layers).
        num_layers: the length of that slice (``None`` outside the layers).
        slice_index: which output slice it belongs to; for a tensor outside the layers,
            the slice whose sources (and parameters) it takes: the first or the last.
    """

    name: str
    sources: tuple[tuple[int, str], ...]
    layer_index: int | None = None
    num_layers: int | None = None
    slice_index: int | None = None


@dataclass(frozen=True)
class SlicePlan:
    """The output model's tensors in output order, and its number of layers."""

    tensors: tuple[OutputTensor, ...]
    num_layers: int


@dataclass(frozen=True)
class _Layers:
    prefix: str
    suffixes: dict[int, tuple[str, ...]]
    outside: tuple[str, ...]


def _index_layers(name: str, tensors: Sequence[str], pattern: re.Pattern[str]) -> _Layers:
    prefixes = set()
    suffixes: dict[int, list[str]] = {}
    outside = []
    for t in tensors:
        m = pattern.match(t)
        if m is None:
            outside.append(t)
            continue
        prefixes.add(m.group("prefix"))
        suffixes.setdefault(int(m.group("index")), []).append(m.group("suffix"))
    if len(prefixes) > 1:
        raise BadParameter(f"model {name!r} has layers under several prefixes: {sorted(prefixes)}")
    return _Layers(
        prefix=prefixes.pop() if prefixes else "",
        suffixes={i: tuple(sorted(s)) for i, s in suffixes.items()},
        outside=tuple(outside),
    )


def _sources(
    number: int, spec: Mapping, models: Mapping[str, Sequence[str]]
) -> list[tuple[int, int, int]]:
    """``(model index, start, end)`` of each source of output slice ``number``."""
    if not isinstance(spec, Mapping) or "sources" not in spec:
        raise BadParameter(f"slice #{number} has no 'sources'")
    unsupported = set(spec) - {"sources", "parameters", "base_model"}
    if unsupported:
        raise BadParameter(f"slice #{number}: {sorted(unsupported)} is not supported yet")
    order = list(models)
    out = []
    sources = spec["sources"]
    if not isinstance(sources, Sequence) or isinstance(sources, str):
        raise BadParameter(f"slice #{number}: 'sources' must be a list")
    for src in sources:
        if not isinstance(src, Mapping):
            raise BadParameter(f"slice #{number}: a source is a mapping {{model, layer_range}}")
        extra = set(src) - {"model", "layer_range"}
        if extra:
            raise BadParameter(
                f"slice #{number}: source key(s) {sorted(extra)} are not supported yet"
            )
        model, rng = src.get("model"), src.get("layer_range")
        if not isinstance(model, str) or model not in models:
            raise BadParameter(f"slice #{number} names model {model!r}, which is not in the recipe")
        if (
            not isinstance(rng, Sequence)
            or len(rng) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
        ):
            raise BadParameter(f"slice #{number}: layer_range of {model!r} must be [start, end]")
        out.append((order.index(model), int(rng[0]), int(rng[1])))
    if not out:
        raise BadParameter(f"slice #{number} has no sources")
    names = [order[model] for model, _, _ in out]
    if len(set(names)) != len(names):
        raise BadParameter(
            f"slice #{number} names one model twice; a slice merges different models"
        )
    if len({end - start for _, start, end in out}) != 1:
        raise BadParameter(f"slice #{number}: all sources must span the same number of layers")
    return out


def plan_slices(
    slices: Sequence[Mapping],
    models: Mapping[str, Sequence[str]],
    *,
    is_pre: Callable[[str], bool] = is_pre_layer,
    pattern: re.Pattern[str] = LAYER_NAME,
) -> SlicePlan:
    """Map every output tensor of a sliced recipe to its source tensors.

    Args:
        slices: the recipe's ``slices:`` as parsed YAML (``sources`` with ``model`` and
            ``layer_range``; ``parameters`` and ``base_model`` are left to the caller).
        models: each model's tensor names, keyed by the name the slices use; the mapping's
            order defines the model indices of the result.
        is_pre: which tensors outside the layers come before them.
        pattern: how a layer tensor's name splits into prefix, index and suffix.

    Raises:
        BadParameter: a slice names an unknown model or layer, its sources differ in length,
            a source lacks a tensor of the first source's layer, or a key is unsupported.
    """
    if not slices:
        raise BadParameter("slices is empty")
    order = list(models)
    layers = {name: _index_layers(name, models[name], pattern) for name in order}
    plan = [_sources(k, spec, models) for k, spec in enumerate(slices)]
    out: list[OutputTensor] = []

    def outside(k: int, keep: Callable[[str], bool]) -> None:
        first = layers[order[plan[k][0][0]]]
        for t in first.outside:
            if not keep(t):
                continue
            for model, _, _ in plan[k]:
                if t not in layers[order[model]].outside:
                    raise BadParameter(f"model {order[model]!r} has no tensor {t!r}")
            out.append(
                OutputTensor(t, tuple((model, t) for model, _, _ in plan[k]), slice_index=k)
            )

    outside(0, is_pre)
    produced = 0
    for k, sources in enumerate(plan):
        length = sources[0][2] - sources[0][1]
        for model, start, end in sources:
            known = layers[order[model]].suffixes
            if not 0 <= start < end or any(i not in known for i in range(start, end)):
                raise BadParameter(
                    f"slice #{k}: layer_range [{start}, {end}] is outside model "
                    f"{order[model]!r}'s {len(known)} layers"
                )
        prefix = layers[order[sources[0][0]]].prefix
        for offset in range(length):
            suffixes = layers[order[sources[0][0]]].suffixes[sources[0][1] + offset]
            for suffix in suffixes:
                refs = []
                for model, start, _ in sources:
                    lay = layers[order[model]]
                    if suffix not in lay.suffixes[start + offset]:
                        raise BadParameter(
                            f"model {order[model]!r} layer {start + offset} has no {suffix[1:]!r}"
                        )
                    refs.append((model, f"{lay.prefix}{start + offset}{suffix}"))
                out.append(
                    OutputTensor(
                        f"{prefix}{produced + offset}{suffix}", tuple(refs), offset, length, k
                    )
                )
        produced += length
    outside(len(plan) - 1, lambda t: not is_pre(t))
    return SlicePlan(tensors=tuple(out), num_layers=produced)


def passthrough_sources(
    slices: Sequence[Mapping],
    models: Mapping[str, Sequence[str]],
    *,
    is_pre: Callable[[str], bool] = is_pre_layer,
    pattern: re.Pattern[str] = LAYER_NAME,
) -> dict[str, tuple[int, str]]:
    """``{output tensor name: (model index, source tensor name)}`` for a passthrough recipe.

    Raises:
        BadParameter: as :func:`plan_slices`, or a slice with more than one source.
    """
    plan = plan_slices(slices, models, is_pre=is_pre, pattern=pattern)
    result = {}
    for t in plan.tensors:
        if len(t.sources) != 1:
            raise BadParameter(
                f"passthrough takes one source per slice; {t.name} has {len(t.sources)}"
            )
        result[t.name] = t.sources[0]
    return result
