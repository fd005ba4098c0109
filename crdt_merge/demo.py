"""``make demo``: three sites merge fine-tunes of one base and agree on one checkpoint id.

Runs the real CLI, command by command, as a person would, in ``demo-out/``, with three real
servers on loopback:

1. builds a tiny Llama-style base model and three fine-tunes of it (offline, seeded);
2. site alpha creates the project and serves it; beta and gamma join it over HTTP, serve
   their replicas too, and are admitted;
3. each site contributes its fine-tune, alpha agrees a task-arithmetic recipe;
4. the replicas sync over HTTP in a ring until all state roots are equal;
5. each replica resolves the merged checkpoint; ``verify`` asks the three servers for
   their checkpoint ids through the HTTP API and checks they agree;
6. the merged folder is loaded with transformers and run; the servers are stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

OUT = Path(os.environ.get("CRDT_MERGE_DEMO_DIR", "demo-out"))


def run(*args: str) -> dict:
    cmd = [sys.executable, "-m", "crdt_merge", "--json", *args]
    print("$ crdt-merge " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"demo: command failed with exit {proc.returncode}")
    return json.loads(proc.stdout)


def build_models(folder: Path) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes (base + seeded small updates)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)  # model construction only; the merge never uses a global RNG
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    paths = {"base": folder / "base"}
    base.save_pretrained(paths["base"])
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        gen = torch.Generator().manual_seed(100 + i)
        tuned = LlamaForCausalLM(config).to(torch.bfloat16)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen).to(v.dtype)
                 for k, v in base.state_dict().items()}
        tuned.load_state_dict(state)
        paths[name] = folder / f"finetune-{name}"
        tuned.save_pretrained(paths[name])
    return paths


def serve(replica: str, stack: ExitStack) -> str:
    """Start ``crdt-merge serve`` on a free loopback port; return its URL. The server is
    stopped (by its own pid) when ``stack`` closes."""
    proc = subprocess.Popen([sys.executable, "-m", "crdt_merge", "serve", replica,
                             "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    stack.callback(_stop, proc)
    line = proc.stdout.readline() if proc.stdout else ""
    if "http://" not in line:
        raise SystemExit(f"demo: the server for {replica} did not start: {line!r}")
    url = line.strip().rsplit(" ", 1)[-1]
    print(f"$ crdt-merge serve {replica} --port 0    # {url}", flush=True)
    return url


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    print(f"== building example models in {OUT}/models")
    models = build_models(OUT / "models")
    a, b, c = (str(OUT / f"replica-{n}") for n in ("alpha", "beta", "gamma"))
    with ExitStack() as stack:
        print("== alpha creates the project and serves it; beta and gamma join over HTTP")
        run("init", a, "--site", "alpha")
        url = {a: serve(a, stack)}
        for site, d in (("beta", b), ("gamma", c)):
            joined = run("init", d, "--site", site, "--join", url[a])
            url[d] = serve(d, stack)
            run("admit", a, site, joined["public_key"])
        run("sync", b, url[a])
        run("sync", c, url[a])

        print("== each site contributes its fine-tune; alpha agrees the recipe")
        for site, d in (("alpha", a), ("beta", b), ("gamma", c)):
            run("contribute", d, str(models[site]), "--base", str(models["base"]), "--weight", "1")
        run("recipe", a, "--method", "task_arithmetic", "--param", "lambda=0.5",
            "--anchor", str(models["base"]))

        print("== sync over HTTP in a ring until the state roots agree")
        for _ in range(2):
            for x, y in ((a, b), (b, c), (c, a)):
                run("sync", x, url[y])
        roots = {d: run("status", d)["state_root"] for d in (a, b, c)}
        print(json.dumps(roots, indent=2))
        if len(set(roots.values())) != 1:
            raise SystemExit("demo: state roots differ after the ring sync")

        print("== each replica resolves the merged checkpoint")
        ids = {}
        for d in (a, b, c):
            result = run("resolve", d, "--out", d + "-merged")
            ids[d] = result["checkpoint_id"]
            print(f"   {d}: checkpoint {result['checkpoint_id']}")
        print("== the three servers report their checkpoint ids through the HTTP API")
        verdict = run("verify", a, url[a], url[b], url[c])
        served = {w: v["checkpoint_id"] for w, v in verdict["replicas"].items()}
        print(json.dumps(served, indent=2))
        if len(set(ids.values()) | set(served.values())) != 1 or not verdict["ok"]:
            raise SystemExit("demo: checkpoint ids differ")

    print("== the merged folder is a normal Hugging Face model")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a + "-merged")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    print(f"   loaded with transformers; logits shape {tuple(logits.shape)}")
    print(f"\nall three replicas and their servers agree: checkpoint {next(iter(ids.values()))}")


if __name__ == "__main__":
    main()
