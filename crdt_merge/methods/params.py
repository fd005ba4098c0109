"""Recipe parameter values: parsing scalars and resolving mergekit's gradients and filters.

A mergekit parameter value is one of:

* a scalar: ``0.5`` (here usually the canonical decimal string ``"0.5"``), ``true``, ``"x"``;
* a layer gradient: a list of scalars, interpolated across the layers of a slice;
* a filtered list: ``[{filter: "self_attn", value: 0.3}, {value: 0.7}]``; the first entry whose
  ``filter`` is a substring of the tensor name (or is absent or ``"*"``) gives the value,
  which may itself be a scalar or a gradient. A single ``{filter, value}`` mapping counts
  as a one-entry list.

:func:`resolve_param` evaluates one such value for one tensor exactly as mergekit 0.1.5 does
(``mergekit.config.evaluate_setting`` with the ``t`` of ``mergekit.plan``), except that an
interpolated number is clamped to its two endpoints, so rounding can never push a
``density`` of ``[1, 1]`` to ``1.0000000000000002``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

Scalar = float | int | bool | str

_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


def parse_scalar(value: object, kind: type) -> Scalar:
    """Parse one scalar parameter value as ``kind`` (``float``, ``int``, ``bool`` or ``str``).

    Numbers may arrive as canonical decimal strings (``"0.5"``), ints or floats; booleans as
    ``True``/``False`` or the strings ``"true"``/``"false"``. Non-finite numbers are refused.

    Raises:
        ValueError: the value is not of that kind (the message says what was expected).
    """
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value!r}")
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return float(value)
    if isinstance(value, float):
        x = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        x = float(value)
    else:
        raise ValueError(f"expected a decimal number, got {value!r}")
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {value!r}")
    return x


def _is_scalar(value: object) -> bool:
    return isinstance(value, (bool, int, float, str))


def _as_number(value: Scalar) -> float | None:
    """The number a scalar denotes, or None for booleans and non-numeric strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if _DECIMAL.fullmatch(value.strip()):
        return float(value)
    return None


def _entries(value: object) -> list[Mapping] | None:
    """The ``{filter, value}`` entries of a filtered value, or None if it is not one."""
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        if all(isinstance(e, Mapping) for e in value):
            for e in value:
                extra = set(e) - {"filter", "value"}
                if extra or "value" not in e:
                    raise ValueError(
                        f"a filtered parameter entry has keys {sorted(e)}; "
                        "expected 'value' and an optional 'filter'"
                    )
                if e.get("filter") is not None and not isinstance(e["filter"], str):
                    raise ValueError(f"a filter must be a string, got {e['filter']!r}")
            return list(value)
    return None


def leaves(value: object) -> list[Scalar | None]:
    """Every scalar a parameter value can evaluate to (for validation before resolve).

    Raises:
        ValueError: the value is not a scalar, a gradient or a filtered list.
    """
    if value is None or _is_scalar(value):
        return [value]
    entries = _entries(value)
    if entries is not None:
        out: list[Scalar | None] = []
        for e in entries:
            out.extend(leaves(e["value"]))
        return out
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise ValueError("an empty list is not a value")
        if all(_is_scalar(e) for e in value):
            return list(value)
    raise ValueError(f"expected a number, a layer gradient or a filtered list, got {value!r}")


def layer_t(layer_index: int | None, num_layers: int | None) -> float:
    """The gradient position ``t`` of a tensor, as mergekit computes it.

    ``t = layer_index / (num_layers - 1)`` for a tensor of layer ``layer_index`` (counted
    within its output slice) of a slice of ``num_layers`` layers; ``1`` in a one-layer
    slice; ``0`` for tensors outside the layers (embeddings, final norm, lm_head).
    """
    if layer_index is None:
        return 0.0
    if num_layers is None or num_layers < 1 or not 0 <= layer_index < num_layers:
        raise ValueError(f"layer {layer_index} is not inside a slice of {num_layers} layers")
    if num_layers > 1:
        return layer_index / (num_layers - 1)
    return 1.0


def resolve_param(
    value: object,
    tensor_name: str,
    layer_index: int | None = None,
    num_layers: int | None = None,
) -> Scalar | None:
    """Evaluate one mergekit-style parameter value for one tensor.

    Args:
        value: a scalar, a layer gradient (list of scalars) or a filtered list.
        tensor_name: the name filters are matched against (a substring test).
        layer_index: the tensor's layer, counted within its output slice; ``None`` for
            tensors outside the layers.
        num_layers: the number of layers in that slice.

    Returns:
        A float for numbers (decimal strings included), the bool or string otherwise, or
        ``None`` when no filter entry matches (the caller then falls back to the next scope,
        then to the default).

    Raises:
        ValueError: a malformed value.
    """
    t = layer_t(layer_index, num_layers)
    return _evaluate(value, tensor_name, t)


def _evaluate(value: object, tensor_name: str, t: float) -> Scalar | None:
    if _is_scalar(value):
        number = _as_number(value)  # type: ignore[arg-type]
        return value if number is None else number
    entries = _entries(value)
    if entries is not None:
        for e in entries:
            f = e.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return _evaluate(e["value"], tensor_name, t)
        return None
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        if not all(_is_scalar(e) for e in value):
            raise ValueError(f"a layer gradient holds only scalars, got {value!r}")
        maybe = [_as_number(e) for e in value]
        numbers = [n for n in maybe if n is not None]
        if len(numbers) != len(value):
            # booleans and strings are picked, not interpolated
            picked = value[int(t * (len(value) - 1))]
            number = _as_number(picked)
            return picked if number is None else number
        scaled = t * (len(numbers) - 1)
        i0 = int(scaled)
        i1 = min(len(numbers) - 1, i0 + 1)
        frac = scaled - i0
        a, b = numbers[i0], numbers[i1]
        x = (1 - frac) * a + frac * b
        return min(max(x, min(a, b)), max(a, b))
    raise ValueError(f"expected a number, a layer gradient or a filtered list, got {value!r}")
