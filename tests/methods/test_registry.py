"""The registry, the Method interface and parameter validation."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import crdt_merge.methods
from crdt_merge.errors import BadParameter, RecipeError, ShapeMismatch, UnknownMethod
from crdt_merge.methods import METHODS, TensorJob, get_method
from tests.methods.helpers import run, tensor

MERGEKIT_NAMES = {
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "passthrough",
    "sce",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
}
ROBUST_NAMES = {"median", "trimmed_mean", "clipped"}


def test_registry_has_exactly_the_standard_set() -> None:
    assert set(METHODS) == MERGEKIT_NAMES | ROBUST_NAMES
    for name, m in METHODS.items():
        assert m.name == name and get_method(name) is m
        assert m.paper.startswith("https://")
        assert m.base in ("required", "optional", "ignored")
        assert len({p.name for p in m.params}) == len(m.params)
        assert m.needs_base == (m.base == "required")


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(UnknownMethod) as info:
        get_method("frankenstein")
    assert "frankenstein" in str(info.value) and "dare_ties" in str(info.value)
    assert "median" in str(info.value) and "sce" in str(info.value)
    assert isinstance(info.value, RecipeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("method", "defaults"),
    [
        ("ties", {"normalize": True, "rescale": False, "lambda": 1.0, "density": 1.0}),
        ("task_arithmetic", {"normalize": False, "rescale": False, "lambda": 1.0}),
        ("dare_ties", {"normalize": False, "rescale": True}),
        ("dare_linear", {"normalize": False, "rescale": True}),
        ("breadcrumbs", {"normalize": False, "gamma": 0.01}),
        ("breadcrumbs_ties", {"normalize": False, "gamma": 0.01}),
        ("della", {"normalize": True, "rescale": True, "epsilon": 0.15}),
        ("della_linear", {"normalize": False, "rescale": True, "epsilon": 0.15}),
        ("linear", {"normalize": True}),
        ("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}),
        ("multislerp", {"normalize_weights": True, "eps": 1e-8}),
        ("karcher", {"max_iter": 10, "tol": 1e-5}),
        ("model_stock", {"filter_wise": False}),
    ],
)
def test_defaults_are_mergekits(method: str, defaults: dict) -> None:
    m = get_method(method)
    for name, value in defaults.items():
        assert m.param(name).default == value, name


def test_required_parameters() -> None:
    assert get_method("ties").param("weight").required
    assert get_method("slerp").param("t").required
    assert get_method("passthrough").param("scale").default is None


def test_validate_accepts_a_typical_recipe() -> None:
    get_method("dare_ties").validate(
        {"normalize": True, "int8_mask": "true", "lambda": "0.9"},
        [
            {"weight": "0.5", "density": ["0.3", "0.7"]},
            {"weight": [{"filter": "mlp", "value": "0.2"}, {"value": "0.4"}], "density": "0.5"},
        ],
    )
    get_method("ties").validate({"weight": "0.5", "density": "0.4"}, [{}, {}])  # global fallback
    get_method("slerp").validate({"t": ["0", "0.5", "1"]}, [{}])


@pytest.mark.parametrize(
    ("method", "glob", "per_model", "message"),
    [
        ("ties", {"desnity": "0.5"}, [{"weight": "1"}], "no parameter 'desnity'"),
        ("ties", {}, [{"weight": "1", "normalize": True}], "'normalize' is a global parameter"),
        ("ties", {}, [{"weight": "1", "density": "1.5"}], "'density' is '1.5', outside"),
        ("ties", {}, [{"weight": "1", "density": "-0.1"}], "'density'"),
        ("ties", {}, [{}], "'weight' is required"),
        ("ties", {}, [{"weight": "abc"}], "expected a decimal number"),
        ("ties", {}, [{"weight": "nan"}], "'weight'"),
        ("ties", {"normalize": "yes"}, [{"weight": "1"}], "expected true or false"),
        ("ties", {"lambda": True}, [{"weight": "1"}], "boolean"),
        ("ties", {}, [{"weight": "1", "density": ["0.5", "2"]}], "'density' is '2'"),
        ("ties", {}, [{"weight": [{"filter": 3, "value": "1"}]}], "filter must be a string"),
        ("ties", {}, [{"weight": [{"flter": "x", "value": "1"}]}], "expected 'value'"),
        ("ties", {}, [{"weight": []}], "empty list"),
        ("slerp", {}, [{}], "'t' is required"),
        ("slerp", {"t": "1.2"}, [{}], "'t' is '1.2', outside its valid range [0, 1]"),
        ("slerp", {"t": "0.5"}, [{}, {}], "exactly 1 donor"),
        ("nuslerp", {}, [{"weight": "1"}], "exactly 2 donor"),
        ("model_stock", {}, [{}], "at least 2 donor"),
        ("passthrough", {}, [{}, {}], "exactly 1 donor"),
        ("karcher", {"max_iter": "2.5"}, [{}, {}], "expected an integer"),
        ("karcher", {"tol": "0"}, [{}, {}], "'tol' is '0', outside"),
        (
            "della",
            {},
            [{"weight": "1", "density": "0.1", "epsilon": "0.2"}],
            "epsilon 0.2 with density 0.1",
        ),
        (
            "della",
            {},
            [{"weight": "1", "density": "0.9", "epsilon": "0.1"}],
            "epsilon 0.1 with density 0.9",
        ),
        ("della", {}, [{"weight": "1", "epsilon": "0.5"}], "'epsilon' is '0.5'"),
    ],
)
def test_validate_errors_name_the_parameter(method, glob, per_model, message) -> None:
    with pytest.raises(BadParameter) as info:
        get_method(method).validate(glob, per_model)
    assert message in str(info.value)


def test_merge_checks_the_job() -> None:
    x = tensor("x", (4, 3))
    with pytest.raises(RecipeError, match="needs a base model"):
        run("ties", None, [x], [{"weight": "1"}])
    with pytest.raises(ShapeMismatch, match="different shapes"):
        run("ties", x, [tensor("y", (3, 4))], [{"weight": "1"}])
    with pytest.raises(TypeError, match="float tensors"):
        run("ties", x, [x.to(torch.int32)], [{"weight": "1"}])
    with pytest.raises(BadParameter, match="'weight' is required"):
        run("linear", None, [x], [{}])
    with pytest.raises(BadParameter, match="no parameter 'bogus'"):
        run("linear", None, [x], [{"weight": 1.0}], {"bogus": 1})
    with pytest.raises(ValueError, match="32-byte key"):
        get_method("dare_ties").merge(TensorJob("t", x, [x], [{"weight": 1.0}], {}, [b"short"]))
    with pytest.raises(BadParameter, match="sum to zero"):
        run("linear", None, [x, x], [{"weight": 1.0}, {"weight": -1.0}])


def test_bind_applies_defaults_and_the_global_fallback() -> None:
    m = get_method("breadcrumbs")
    x = tensor("x", (3,))
    job = TensorJob("t", x, [x, x], [{"weight": "0.25"}, {}], {"weight": "0.75", "lambda": "2"})
    bound = m.bind(job)
    assert bound.column("weight") == [0.25, 0.75]
    assert bound.column("gamma") == [0.01, 0.01]
    assert bound.options == {
        "normalize": False,
        "rescale": False,
        "lambda": 2.0,
        "int8_mask": False,
    }


def test_methods_import_only_lower_layers() -> None:
    allowed = (
        "crdt_merge.errors",
        "crdt_merge.lazy",
        "crdt_merge.numeric",
        "crdt_merge.hashing",
        "crdt_merge.codec",
        "crdt_merge.methods",
    )
    root = Path(crdt_merge.methods.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] == "crdt_merge":
                    assert name.startswith(allowed), (path.name, name)
                assert name.split(".")[0] not in ("random", "transformers", "fastapi"), name


def test_no_forbidden_kernels_on_merge_paths() -> None:
    """No fused, reordering or RNG calls in method code (DESIGN section 4)."""
    root = Path(crdt_merge.methods.__file__).parent
    forbidden = [
        r"addcmul",
        r"\blerp\(",
        r"\balpha=",
        r"\.sum\(",
        r"torch\.dot",
        r"matmul",
        r"torch\.norm",
        r"vector_norm",
        r"torch\.rand",
        r"manual_seed",
        r"bernoulli",
        r"torch\.(sin|cos|acos)\(",
        r"math\.(sin|cos|acos)\(",
        r"\bmean\(",
        r"cumsum",
        r"torch\.linalg",
    ]
    for path in sorted(root.glob("*.py")):
        tree = _strip_docstrings(ast.parse(path.read_text()))
        assert not any(isinstance(n, ast.MatMult) for n in ast.walk(tree)), path.name
        body = ast.unparse(tree)
        for pattern in forbidden:
            assert re.search(pattern, body) is None, (path.name, pattern)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def test_zero_donors_return_the_base() -> None:
    base = tensor("b", (5,))
    out = get_method("ties").merge(TensorJob("t", base, [], [], {}))
    assert torch.equal(out, base) and out is not base


def test_validate_recipe_checks_the_recipe_alone() -> None:
    get_method("ties").validate_recipe({"weight": "0.5", "density": ["0.2", "0.8"]})
    get_method("slerp").validate_recipe({"t": "0.5"})
    with pytest.raises(BadParameter, match="'t' is required"):
        get_method("slerp").validate_recipe({})
    with pytest.raises(BadParameter, match="no parameter 'epsilon'"):
        get_method("ties").validate_recipe({"epsilon": "0.1"})
    with pytest.raises(BadParameter, match="'density' is '3'"):
        get_method("dare_ties").validate_recipe({"density": "3"})
