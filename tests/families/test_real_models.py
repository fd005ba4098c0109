"""Gate G1 on real trained weights (SmolLM2-135M, gemma-3-270m, all-MiniLM-L6-v2).

Slow: run with ``pytest -m slow tests/families/test_real_models.py``. The first run converts
the GGUF models (minutes, cached: see tests/bench/real_models.py); a model whose package is
not installed is skipped with the install command.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from crdt_merge.families import check
from tests.bench.real_models import RealModelUnavailable, real_model
from tests.families.g1 import outputs, rebuild

pytestmark = pytest.mark.slow

CASES = [("smollm2-135m", "llama"), ("gemma-3-270m", "gemma3"), ("all-minilm-l6-v2", "bert")]


@pytest.fixture(autouse=True)
def _only_when_asked(request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("real-model test: run with -m slow")


@pytest.mark.parametrize(("name", "family"), CASES)
def test_g1_on_real_weights(name: str, family: str, tmp_path, record_property) -> None:
    try:
        folder = real_model(name)
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))
    config = json.loads((folder / "config.json").read_text())
    start = time.perf_counter()
    report = check(folder)
    seconds = time.perf_counter() - start
    trip = report["round_trip"]
    assert report["family"] == family
    assert trip["lossless"], trip
    assert (trip["max_abs_diff"], trip["missing"], trip["extra"]) == (0.0, [], [])

    rebuilt = tmp_path / "rebuilt"
    assert rebuild(folder, rebuilt)["lossless"]
    before = outputs(folder, config)
    after = outputs(rebuilt, config)
    assert torch.equal(before, after)
    summary = {
        "model": name, "family": report["family"], "tensors": report["tensors"],
        "layers": report["layers"], "unmapped": report["unmapped"], "ties": report["ties"],
        "max_abs_diff": trip["max_abs_diff"], "check_seconds": round(seconds, 2),
        "outputs": list(before.shape),
    }
    record_property("g1", json.dumps(summary))
    print("G1", json.dumps(summary))
