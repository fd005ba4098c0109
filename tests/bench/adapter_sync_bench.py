"""Bytes on the wire when an adapter contribution syncs between two servers (issue 15).

Two ``crdt-merge serve`` processes on 127.0.0.1 (free ports): A serves alpha's replica, B
serves beta's and pulls from A (``--peer``; its timer set to an hour, so rounds run only
on ``POST /v1/sync``). B first pulls the project and the base model; then alpha
contributes a PEFT LoRA adapter of that base, and one more round on B moves it. The
numbers are B's own count of that round's HTTP bytes (requests and responses, headers
included: ``wire`` of its anti-entropy result).

    .venv/bin/python tests/bench/adapter_sync_bench.py            # SmolLM2-135M, profile v1
    .venv/bin/python tests/bench/adapter_sync_bench.py --tiny     # the CI test's tiny model

The real model comes from tests/bench/real_models.py (see its docstring). The adapter is
r=8 on q_proj and v_proj, made with peft (tests/formats/peft_helpers.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _round(url: str) -> dict[str, Any]:
    answer = httpx.post(url + "/v1/sync", headers={"Accept": "application/json"}, timeout=3600)
    answer.raise_for_status()
    (result,) = answer.json()["peers"].values()
    if not result.get("ok"):
        raise RuntimeError(f"the pull failed: {result}")
    return result


def measure(base: Path, adapter: Path, work: Path, profile: str) -> dict[str, Any]:
    """Run the two servers as the module docstring says; return the sizes and the wire
    bytes of both rounds."""
    from crdt_merge.replica import Replica
    from crdt_merge.store.importer import import_adapter, import_model
    from tests.server.http_helpers import ServerProcess

    alpha = Replica.create(work / "alpha", site="alpha", profile=profile)
    beta = Replica.join(work / "beta", site="beta", genesis=alpha.genesis_bytes())
    alpha.admit("beta", beta.public_key)
    b = import_model(alpha.store, str(base), alpha.piece_size)
    alpha.set_recipe("task_arithmetic", {"lambda": "1"}, anchor=b.manifest_id)
    beta.close()
    servers: list[Any] = []
    try:
        servers.append(ServerProcess(alpha.path).wait_ready())
        servers.append(ServerProcess(beta.path, "--peer", servers[0].url, "--sync-interval",
                                     "3600").wait_ready())
        started = time.perf_counter()
        first = _round(servers[1].url)
        first_s = time.perf_counter() - started
        a = import_adapter(alpha.store, str(adapter), alpha.piece_size, b.manifest)
        alpha.contribute(a.manifest_id, form="adapter", base=b.manifest_id,
                         params={"weight": "1"})
        started = time.perf_counter()
        second = _round(servers[1].url)
        second_s = time.perf_counter() - started
        state = httpx.get(servers[1].url + "/v1/state", timeout=60,
                          headers={"Accept": "application/json"}).json()
    finally:
        for s in reversed(servers):
            s.stop()
    root = alpha.state_root()
    alpha.close()
    return {
        "profile": profile,
        "model_tensor_bytes": sum(t.nbytes for t in b.manifest.tensors.values()),
        "adapter_file_bytes": sum(p.stat().st_size for p in adapter.glob("adapter_model.*")),
        "base_round": {**first["wire"], "seconds": round(first_s, 3)},
        "adapter_round": {**second["wire"], "seconds": round(second_s, 3),
                          "ops_received": second.get("ops_received")},
        "same_state": state.get("state_root") == root,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny llama of the CI test")
    args = parser.parse_args(argv)
    from tests.formats.peft_helpers import make_adapter

    with tempfile.TemporaryDirectory(prefix="adapter-sync-") as tmp:
        work = Path(tmp)
        if args.tiny:
            from tests.fixtures.tiny_models import TinyModels
            base = TinyModels(work / "models").get(
                "llama", hidden_size=64, head_dim=16, num_hidden_layers=4, intermediate_size=256)
            profile = "test"
        else:
            from tests.bench.real_models import real_model
            base, profile = real_model("smollm2-135m"), "v1"
        adapter = make_adapter(base, work / "adapter", 4, r=8, lora_alpha=16,
                               target_modules=["q_proj", "v_proj"])
        result = measure(base, adapter, work, profile)
    wire = result["adapter_round"]["sent"] + result["adapter_round"]["received"]
    result["adapter_round_wire_over_adapter"] = round(wire / result["adapter_file_bytes"], 3)
    result["adapter_round_wire_over_model"] = round(wire / result["model_tensor_bytes"], 6)
    from tests.bench.machine import describe
    result["machine"] = describe(["httpx", "uvicorn", "peft"])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
