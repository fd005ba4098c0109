"""The transfer's cost per layer at 7B width (issue 17; results in docs/cross-family.md).

A whole 7B-shaped pair does not fit a 24 GB machine (the donor base and the anchor alone are
27 GB in float32), so this measures what the cost is made of and scales it: a
Llama-2-7B-shaped anchor (hidden 4,096, MLP 11,008, 32 heads) and a Mistral-7B-shaped donor
(hidden 4,096, MLP 14,336, 32 query and 8 key/value heads) with ``--layers`` decoder layers
each (default 2), random weights (the cost does not depend on the values), the donor's
fine-tune its base plus noise, one tokenizer (SmolLM2's) for both, and the news text of
tests/bench/merge_quality.py as calibration. The transfer runs with ``chunk_layers=1``, so
the statistics in memory are one layer's; the script reports CPU time (the process's,
all threads: on a shared machine wall time says more about the other jobs) per window and
layer, the peak resident memory, the memory of the models, and the scaled cost of a 32-layer
pair with the same number of windows.

At full width one layer's statistics and solve take about 11 GB on top of the models (the
run needs about 18 GB in all); ``--shrink 2`` divides every width by 2, measures, and
scales the result back (products by 4, solves by 8, memory by 4). Run from the repository
root (a few minutes)::

    .venv/bin/python tests/bench/real_models.py smollm2-135m
    .venv/bin/python tests/bench/transfer_scale.py --shrink 2 --windows 3 --out /tmp/transfer-scale.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def rss_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shrink", type=int, default=1,
                        help="divide every width by this (2: a quarter of the memory; the "
                             "report scales products by shrink^2 and solves by shrink^3)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/transfer-scale.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoTokenizer

    from crdt_merge import transfer as tr
    from tests.bench.merge_quality import texts
    from tests.bench.real_models import real_model

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(str(real_model("smollm2-135m")))
    k = args.shrink
    common = dict(hidden_size=4096 // k, num_attention_heads=32 // k,
                  num_hidden_layers=args.layers, vocab_size=len(tok), tie_word_embeddings=True,
                  max_position_embeddings=4096, head_dim=128)
    anchor_cfg = transformers.LlamaConfig(intermediate_size=11008 // k,
                                          num_key_value_heads=32 // k, **common)
    donor_cfg = transformers.MistralConfig(intermediate_size=14336 // k,
                                           num_key_value_heads=8 // k, sliding_window=None,
                                           **common)
    torch.manual_seed(0)
    before = rss_gib()
    anchor = transformers.LlamaForCausalLM(anchor_cfg).eval()
    donor_base = transformers.MistralForCausalLM(donor_cfg).eval()
    donor = transformers.MistralForCausalLM(donor_cfg).eval()
    with torch.no_grad():
        donor.load_state_dict(donor_base.state_dict())
        for name, p in donor.named_parameters():
            if "proj" in name:
                p.add_(1e-3 * torch.randn_like(p))
    models_gib = rss_gib() - before
    text = "\n\n".join(texts()["news"][0])
    params = tr.TransferParams(window_chars=1200, max_windows=args.windows, chunk_layers=1)
    stamps: list[float] = []
    start = time.process_time()
    result = tr.transfer(donor_base, donor, anchor, tok, tok, text, params,
                         progress=lambda i, n: stamps.append(time.process_time()))
    seconds = time.process_time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # one layer a chunk: within a chunk the gaps are windows; between chunks (and after the
    # last) a gap is the layer's solve plus the next window
    w = result.windows
    gaps = [b - a for a, b in zip([start, *stamps], [*stamps, start + seconds], strict=True)]
    inner = sorted(g for k, g in enumerate(gaps) if k % w != 0 and k < len(stamps))
    window = inner[len(inner) // 2]
    solves = [gaps[k] - (window if k < len(stamps) else 0.0) for k in range(w, len(gaps), w)]
    solve = sum(solves) / len(solves)
    # a forward pass per layer (both models, one window), to split a window's time into the
    # passes and the statistics: chunk k runs k + 1 layers of each model
    ids = tok(tr.windows_of(text, 1200)[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        t0 = time.process_time()
        for _ in range(3):
            for model in (donor_base, anchor):
                tr._run(model, args.layers - 1, input_ids=ids)
        forward_layer = (time.process_time() - t0) / 3 / args.layers
    stats_window_layer = max(0.0, window - forward_layer * (args.layers + 1) / 2)
    # back to full width: products (statistics, passes) grow with width^2, solves with ^3
    stats_window_layer *= k * k
    forward_layer *= k * k
    solve *= k ** 3
    per_window_layer = stats_window_layer + forward_layer  # unchunked: one pass per window
    record = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpus": len(__import__("os").sched_getaffinity(0)), "threads": args.threads,
        "torch": torch.__version__, "layers": args.layers, "windows": result.windows,
        "shrink": k, "note": "CPU seconds (all threads), scaled to full 7B width",
        "seconds_per_window_and_layer_chunked_measured": round(window, 2),
        "positions": result.positions, "seconds": round(seconds, 1),
        "forward_seconds_per_window_and_layer": round(forward_layer, 2),
        "statistics_seconds_per_window_and_layer": round(stats_window_layer, 2),
        "solve_seconds_per_layer": round(solve, 1),
        "models_gib": round(models_gib, 2), "peak_rss_gib": round(peak, 2),
        "statistics_and_solve_gib": round(peak - models_gib, 2),
        "statistics_and_solve_gib_full_width": round((peak - models_gib) * k * k, 1),
        "matrices": len(result.deltas),
        # a 32-layer pair on the 26 windows of the SmolLM2 -> gemma-3 run (5,156 positions):
        # all layers at once (one pass per window), and one layer a chunk (the passes of
        # chunk k run k + 1 layers)
        "scaled_32_layers_26_windows_cpu_hours": round(
            32 * (per_window_layer * 26 + solve) / 3600, 2),
        "scaled_32_layers_26_windows_chunked_cpu_hours": round(
            (32 * (stats_window_layer * 26 + solve)
             + forward_layer * 26 * sum(range(1, 33))) / 3600, 2),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
