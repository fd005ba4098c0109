"""The package's tables written once: the error codes (crdt_merge/errors.py) and the tensor
dtypes (crdt_merge/dtypes.py), checked against literal expectations."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import crdt_merge
from crdt_merge import dtypes, errors


def _every_module() -> None:
    for info in pkgutil.walk_packages(crdt_merge.__path__, "crdt_merge."):
        if info.name not in ("crdt_merge.__main__",):
            importlib.import_module(info.name)


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


def test_every_error_of_the_package_is_in_the_code_table_once():
    _every_module()
    ours = [c for c in _subclasses(errors.CrdtMergeError) if c.__module__.startswith("crdt_merge")]
    assert all(c.__module__ == "crdt_merge.errors" for c in ours), \
        [c.__qualname__ for c in ours if c.__module__ != "crdt_merge.errors"]
    codes = [c.__dict__["code"] for c in ours]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)
    assert {c.code: c for c in ours} == errors.CODES


def test_a_code_decodes_without_importing_the_module_that_raises_it():
    """error_for_code once searched the subclasses imported so far: in a client that had
    not imported the families, ``unknown_family`` decoded as the root class."""
    code = ("from crdt_merge.errors import error_for_code; "
            "print(*(error_for_code(c).__name__ for c in "
            "('unknown_family', 'body_too_large', 'unsupported_mergekit_feature', 'nope')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["UnknownFamily", "BodyTooLarge", "UnsupportedFeature",
                                   "CrdtMergeError"]


def test_shape_mismatch_is_not_a_plan_error():
    """The store, the methods and the families raise it too: it is about tensors, not
    about the plan."""
    assert not issubclass(errors.ShapeMismatch, errors.PlanError)
    assert issubclass(errors.ShapeMismatch, ValueError)
    assert errors.error_for_code("shape_mismatch") is errors.ShapeMismatch


def test_the_dtype_table():
    assert dtypes.SIZES == {
        "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
        "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
    assert dtypes.RECIPE_DTYPES == {"float32": "F32", "bfloat16": "BF16", "float16": "F16",
                                    "float64": "F64"}
    assert dtypes.CONFIG_NAMES == {"F32": "float32", "BF16": "bfloat16", "F16": "float16",
                                   "F64": "float64"}
    assert set(dtypes.FLOATS) == {"F16", "BF16", "F32", "F64"}
    assert {d.name for d in dtypes.DTYPES.values() if d.float} == set(dtypes.FLOATS)
    assert dtypes.TORCH_NAMES == {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
        "BOOL": "bool"}
    assert dtypes.FROM_TORCH == {
        "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
        "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
        "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
        "uint16": "U16", "uint32": "U32", "uint64": "U64"}


def test_the_tables_derived_from_it():
    from crdt_merge.numeric import RAW_DTYPES
    from crdt_merge.store.manifests import DTYPE_SIZES

    assert RAW_DTYPES == {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                          "BF16": np.uint16}
    assert DTYPE_SIZES is dtypes.SIZES


@pytest.mark.parametrize(("plan", "stored", "out"), [
    ("BF16", "F32", "BF16"), ("BF16", "I64", "I64"), (None, "F16", "F16"), ("F32", "BOOL", "BOOL")])
def test_out_dtype(plan, stored, out):
    assert dtypes.out_dtype(plan, stored) == out
