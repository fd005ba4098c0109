"""Golden vectors: crdt_merge.families.align against the independent numpy implementation of
specs/cross-family.md section 3 in specs/vectors/cross_family/make_vectors.py.

Bit-exact where the spec says the bits do not depend on the BLAS and LAPACK build (the
spectral steps, and whole merges of matrices with exact diagonal Gram matrices and ``eigh``
vectors); within the generator's ``TOLERANCE`` elsewhere (the generator runs on OpenBLAS,
solves its inverse iteration with LU rather than ``sytrf``, and its Gram products and
eigensolvers round differently in the last bits)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from crdt_merge.families import align

FOLDER = Path(__file__).resolve().parents[2] / "specs" / "vectors" / "cross_family"
VECTORS = json.loads((FOLDER / "cross_family.json").read_text())
TOLERANCE = VECTORS["tolerance"]


def floats(values: list[str]) -> torch.Tensor:
    return torch.tensor([float.fromhex(v) for v in values], dtype=torch.float64)


def matrix(m: dict[str, Any]) -> torch.Tensor:
    return floats(m["hex"]).reshape(m["shape"])


def hexes(t: torch.Tensor | list[float] | tuple[float, ...]) -> list[str]:
    values = t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else list(t)
    return [float(v).hex() for v in values]


def test_the_generator_uses_numpy_and_not_the_code_under_test() -> None:
    tree = ast.parse((FOLDER / "make_vectors.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "json", "sys", "pathlib", "numpy"}


def test_the_constants_are_the_implementations() -> None:
    c = VECTORS["constants"]
    assert float.fromhex(c["noise_floor"]) == align.NOISE_FLOOR
    assert float.fromhex(c["shift"]) == align.SHIFT
    assert (c["gram_block"], c["inverse_steps"], c["inverse_max"]) == (
        align.GRAM_BLOCK, align.INVERSE_STEPS, align.INVERSE_MAX)
    assert hexes(align.start_vector(len(VECTORS["start_vector"]))) == VECTORS["start_vector"]


@pytest.mark.parametrize("case", VECTORS["spectral"], ids=lambda c: c["name"])
def test_spectral_steps_are_bit_exact(case: dict[str, Any]) -> None:
    sigma = floats(case["sigma"])
    omegas = [floats(o) for o in case["omegas"]]
    weights = [float.fromhex(w) for w in case["weights"]]
    expect = case["expect"]
    for omega, delta in zip(omegas, expect["deltas"], strict=True):
        assert hexes(align.spectral_delta(sigma, omega).delta) == delta
    update = align.plan_update(sigma, omegas, weights, tau=float.fromhex(case["tau"]),
                               k=case["k"], beta=float.fromhex(case["beta"]))
    assert hexes(update.scales) == expect["scales"]
    assert list(update.kept) == expect["kept"]
    assert hexes(update.gains) == expect["gains"]
    assert float(update.trust).hex() == expect["trust"]


def run(case: dict[str, Any]) -> align.MatrixMerge:
    return align.merge_matrix(matrix(case["anchor"]), [matrix(w) for w in case["donors"]],
                              [float.fromhex(w) for w in case["weights"]],
                              tau=float.fromhex(case["tau"]), k=case["k"],
                              beta=float.fromhex(case["beta"]))


@pytest.mark.parametrize("case", VECTORS["exact"], ids=lambda c: c["name"])
def test_merges_with_exact_gram_matrices_are_bit_exact(case: dict[str, Any]) -> None:
    result, expect = run(case), case["expect"]
    assert list(result.kept) == expect["kept"] and result.vectors == expect["vectors"]
    assert hexes(result.gains) == expect["gains"]
    assert hexes(result.scales) == expect["scales"]
    assert float(result.trust).hex() == expect["trust"]
    assert hexes(result.out) == expect["out"]


@pytest.mark.parametrize("case", VECTORS["tolerance_cases"], ids=lambda c: c["name"])
def test_other_merges_agree_within_the_tolerance(case: dict[str, Any]) -> None:
    result, expect = run(case), case["expect"]
    anchor = matrix(case["anchor"])
    assert list(result.kept) == expect["kept"] and result.vectors == expect["vectors"]
    gains = floats(expect["gains"])
    assert torch.allclose(torch.tensor(result.gains, dtype=torch.float64), gains, rtol=0,
                          atol=TOLERANCE * float(gains.abs().max()))
    out = floats(expect["out"]).reshape(anchor.shape)
    update = float((out - anchor).abs().max())
    assert float((result.out - out).abs().max()) <= TOLERANCE * update


def test_the_vector_file_is_what_the_generator_writes(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(FOLDER / "make_vectors.py"), str(tmp_path)], check=True,
                   env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    again = json.loads((tmp_path / "cross_family.json").read_text())
    tolerant = again.pop("tolerance_cases")
    stored = dict(VECTORS)
    expected = stored.pop("tolerance_cases")
    assert again == stored  # bit for bit, on any BLAS
    assert len(tolerant) == len(expected)
    for new, old in zip(tolerant, expected, strict=True):
        assert {k: v for k, v in new.items() if k != "expect"} == {
            k: v for k, v in old.items() if k != "expect"}
        assert new["expect"]["kept"] == old["expect"]["kept"]
        for key in ("gains", "out"):
            a, b = floats(new["expect"][key]), floats(old["expect"][key])
            assert torch.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE * float(b.abs().max()))
