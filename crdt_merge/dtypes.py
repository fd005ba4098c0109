"""The one table of tensor dtypes: every other dtype mapping in the package derives from it.

A dtype is known by its safetensors name (``"BF16"``), the name manifests, headers and
plans hold. Per dtype the table says its size in bytes, whether resolve merges it (the
floats), copies it (integers and bool) or refuses it (float8, unsigned 16/32/64), the torch
attribute that holds it, the name recipes and ``config.json`` use (``"bfloat16"``) and how
numpy holds its stored bits (numpy has no bfloat16: its bits as ``uint16``).

Imports nothing of ours and not torch: the store, the importer and the CLI read it
without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONFIG_NAMES", "DTYPES", "DType", "FLOATS", "FROM_TORCH", "RECIPE_DTYPES", "SIZES",
           "TORCH_NAMES", "out_dtype"]


@dataclass(frozen=True)
class DType:
    """One safetensors dtype.

    Attributes:
        name: the safetensors name (``"BF16"``).
        size: bytes per element.
        torch: the name of the ``torch`` dtype (``torch.float8_e4m3fn`` -> ``"float8_e4m3fn"``).
        handled: resolve merges (floats) or copies (integers, bool) it; float8 and unsigned
            16/32/64-bit tensors are refused by name.
        float: merged by the methods (every value exactly a float64); the others are
            copied from the base.
        recipe: the name a recipe's ``dtype`` and ``config.json``'s ``torch_dtype`` use for an
            output dtype (floats only), else None.
        numpy: the numpy type holding the stored bits of a float dtype, else None.
    """

    name: str
    size: int
    torch: str
    handled: bool = True
    float: bool = False
    recipe: str | None = None
    numpy: str | None = None


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("F64", 8, "float64", float=True, recipe="float64", numpy="float64"),
    DType("F32", 4, "float32", float=True, recipe="float32", numpy="float32"),
    DType("F16", 2, "float16", float=True, recipe="float16", numpy="float16"),
    DType("BF16", 2, "bfloat16", float=True, recipe="bfloat16", numpy="uint16"),
    DType("I64", 8, "int64"),
    DType("I32", 4, "int32"),
    DType("I16", 2, "int16"),
    DType("I8", 1, "int8"),
    DType("U8", 1, "uint8"),
    DType("BOOL", 1, "bool"),
    DType("F8_E4M3", 1, "float8_e4m3fn", handled=False),
    DType("F8_E5M2", 1, "float8_e5m2", handled=False),
    DType("U16", 2, "uint16", handled=False),
    DType("U32", 4, "uint32", handled=False),
    DType("U64", 8, "uint64", handled=False),
)}

#: safetensors name -> bytes per element (every dtype a manifest may hold)
SIZES: dict[str, int] = {d.name: d.size for d in DTYPES.values()}
#: the dtypes the methods merge, in the order F16, BF16, F32, F64
FLOATS: tuple[str, ...] = ("F16", "BF16", "F32", "F64")
#: safetensors name -> torch attribute, for the dtypes resolve handles
TORCH_NAMES: dict[str, str] = {d.name: d.torch for d in DTYPES.values() if d.handled}
#: torch dtype name -> safetensors name, for every dtype (what a checkpoint may hold)
FROM_TORCH: dict[str, str] = {d.torch: d.name for d in DTYPES.values()}
#: recipe ``dtype`` value (``"bfloat16"``) -> safetensors name
RECIPE_DTYPES: dict[str, str] = {d.recipe: d.name for d in DTYPES.values() if d.recipe}
#: safetensors name -> the ``torch_dtype`` a config.json gives it
CONFIG_NAMES: dict[str, str] = {d.name: d.recipe for d in DTYPES.values() if d.recipe}


def out_dtype(plan_dtype: str | None, dtype: str) -> str:
    """The dtype of an output tensor whose input is ``dtype``: the plan's output dtype for
    a float, the input's own otherwise (integers are copied, not cast)."""
    return plan_dtype if (plan_dtype and dtype in FLOATS) else dtype
