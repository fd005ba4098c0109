"""Peak memory of a cross-family resolve: it follows the largest tensor, not the model.

Synthetic models with Llama-2-7B's proportions (MLP = 2.6875 x hidden, head_dim 128,
vocabulary 32,000) as the anchor and Mistral-7B's (MLP = 3.5 x hidden, 4 query heads per
KV head, one layer more) as the donor, stored in bfloat16, are imported into a replica by
one process; a fresh process then resolves ``cross_family`` (preset asymmetric, every role
merged, one worker in-process) and reports its resident memory when it starts resolving
(``VmRSS``, torch already imported) and its peak (``VmHWM``). Two scans:

- layers at a fixed width: the model grows, the peak should not;
- width with one layer: the largest tensor grows, and the peak with it.

Run (docs/benchmarks.md, "Cross-family memory")::

    .venv/bin/python tests/bench/cross_family_memory.py --out cross-family-memory.json

``--hidden 4096 --layers 1,2,4`` runs the layer scan at the real 7B widths (hidden 4096,
intermediate 11008 for the anchor and 14336 for the donor, 8 KV heads for the donor);
``--parallel`` runs those resolves side by side (each in its own process: the peaks are
per process, only the seconds suffer). ``--matrix 11008x4096 14336x4096`` merges only the
largest 7B matrix pair in a fresh process: the per-job peak at 7B widths. ``--costs
4096x4096`` times, single-threaded, each LAPACK and BLAS call of the previous SVD route and
of the Gram route on one matrix of that shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HEAD_DIM = 128
VOCAB = 32000  # --vocab changes it (embeddings and lm_head follow the anchor anyway)


def shapes(kind: str, hidden: int, layers: int) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(config, tensor shapes) of a synthetic ``llama`` (anchor) or ``mistral`` (donor)."""
    heads = max(1, hidden // HEAD_DIM)
    if kind == "llama":
        inter, kv, arch = round(hidden * 2.6875), heads, "LlamaForCausalLM"
    else:
        inter, kv, arch = round(hidden * 3.5), max(1, heads // 4), "MistralForCausalLM"
        layers += 1
    config = {"model_type": kind, "architectures": [arch], "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": HEAD_DIM, "intermediate_size": inter,
              "vocab_size": VOCAB, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, hidden),
                                       "lm_head.weight": (VOCAB, hidden),
                                       "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * HEAD_DIM, hidden),
                p + "self_attn.k_proj.weight": (kv * HEAD_DIM, hidden),
                p + "self_attn.v_proj.weight": (kv * HEAD_DIM, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * HEAD_DIM),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter)}
    return config, out


def write_model(folder: Path, kind: str, hidden: int, layers: int, seed: int) -> int:
    """Write the synthetic model; return its size in bytes."""
    import torch
    from safetensors.torch import save_file

    config, specs = shapes(kind, hidden, layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    for i, (name, shape) in enumerate(sorted(specs.items())):
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    return sum(t.numel() * 2 for t in tensors.values())


def prepare(work: Path, hidden: int, layers: int) -> dict[str, Any]:
    from crdt_merge.replica import Replica
    from crdt_merge.store.importer import import_model

    size = write_model(work / "anchor", "llama", hidden, layers, 1)
    donor_size = write_model(work / "donor", "mistral", hidden, layers, 2)
    with Replica.create(work / "replica", site="bench") as r:
        donor = import_model(r.store, str(work / "donor"), r.piece_size)
        r.contribute(donor.manifest_id, params={}, label="donor")
        anchor = import_model(r.store, str(work / "anchor"), r.piece_size).manifest_id
        r.set_recipe("cross_family", {"preset": "asymmetric"}, anchor=anchor)
    _, anchor_shapes = shapes("llama", hidden, layers)
    matrices = [s for n, s in anchor_shapes.items() if "layers" in n and len(s) == 2]
    largest_merged = max(a * b for a, b in matrices) * 8
    largest = max(a * (b[0] if b else 1) for a, *b in anchor_shapes.values()) * 2
    for f in ("anchor", "donor"):
        shutil.rmtree(work / f)
    return {"hidden": hidden, "layers": layers, "anchor_bytes": size, "donor_bytes": donor_size,
            "largest_tensor_bytes_bf16": largest, "largest_merged_matrix_bytes_f64": largest_merged}


def _status_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB. Not ``ru_maxrss``: Linux
    carries that over from the parent through fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(replica_dir: str, out: str) -> None:
    """Resolve in this fresh process and print its peak memory (KiB -> MiB)."""
    from crdt_merge.replica import Replica
    from crdt_merge.resolve import resolve

    before = _status_kib("VmRSS")
    t, cpu = time.time(), time.process_time()
    with Replica.open(replica_dir) as r:
        result = resolve(r, out, workers=1)
    after = _status_kib("VmHWM")
    print(json.dumps({"rss_start_mib": round(before / 1024, 1),
                      "rss_peak_mib": round(after / 1024, 1),
                      "seconds": round(time.time() - t, 1),
                      "cpu_seconds": round(time.process_time() - cpu, 1),
                      "checkpoint_id": result.checkpoint_id}))


def one_matrix(anchor_shape: tuple[int, int], donor_shape: tuple[int, int]) -> None:
    """Merge one synthetic float64 matrix pair in this fresh process and print its memory:
    the per-job cost of the largest merged matrix, without the rest of a model."""
    import torch

    from crdt_merge.families.align import merge_matrix

    a = torch.randn(anchor_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.randn(donor_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = _status_kib("VmRSS")
    t, cpu, load = time.time(), time.process_time(), _load()
    result = merge_matrix(a, [w], [1.0], tau=0.2, k=3, beta=0.6)
    print(json.dumps({"anchor_shape": list(anchor_shape), "donor_shape": list(donor_shape),
                      "inputs_mib": round((a.numel() + w.numel()) * 8 / 2**20, 1),
                      "rss_start_mib": round(before / 1024, 1),
                      "rss_peak_mib": round(_status_kib("VmHWM") / 1024, 1),
                      "seconds": round(time.time() - t, 1),
                      "cpu_seconds": round(time.process_time() - cpu, 1),
                      "load_start": load, "load_end": _load(), "kept": list(result.kept)}),
          flush=True)


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def measure(hidden: int, layers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cf-mem-") as tmp:
        work = Path(tmp)
        t = time.time()
        row = prepare(work, hidden, layers)
        row["prepare_seconds"] = round(time.time() - t, 1)
        row["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        row["load_start"] = _load()
        row["mkl_cbwr"] = os.environ.get("MKL_CBWR", "COMPATIBLE")  # crdt_merge's default
        proc = subprocess.run([sys.executable, __file__, "--child", str(work / "replica"),
                               str(work / "out")], capture_output=True, text=True, check=True)
        row |= json.loads(proc.stdout.strip().splitlines()[-1])
        row["load_end"] = _load()
    row["peak_minus_start_mib"] = round(row["rss_peak_mib"] - row["rss_start_mib"], 1)
    print(json.dumps(row), flush=True)
    return row


def costs(shape: tuple[int, int]) -> None:
    """Time each LAPACK/BLAS call of both routes on one float64 matrix, one thread."""
    import torch

    from crdt_merge.families.align import eigenvalues, gram, kept_vectors

    torch.set_num_threads(1)
    a = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = min(shape)

    def timed(name: str, f: Any) -> Any:
        load = _load()
        t, cpu = time.perf_counter(), time.process_time()
        value = f()
        print(json.dumps({"shape": list(shape), "call": name,
                          "seconds": round(time.perf_counter() - t, 2),
                          "cpu_seconds": round(time.process_time() - cpu, 2), "load": load}),
              flush=True)
        return value

    timed("svd route: svdvals (gesdd, no vectors)", lambda: torch.linalg.svdvals(a))
    timed("svd route: svd economy (gesdd)", lambda: torch.linalg.svd(a, full_matrices=False))
    g = timed("gram route: gram (lower blocks)", lambda: gram(a))
    timed("full gram a^T a (one gemm, for comparison)", lambda: a.T @ a if shape[0] >= shape[1]
          else a @ a.T)
    lam = timed("gram route: eigvalsh (syevd, no vectors)", lambda: eigenvalues(g))
    timed("eigh (syevd with vectors)", lambda: torch.linalg.eigh(g))
    timed("gram route: 1 kept vector (inverse iteration)", lambda: kept_vectors(g, lam, [0]))
    timed("gram route: 3 kept vectors (inverse iteration)",
          lambda: kept_vectors(g, lam, [0, r // 2, r - 1]))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("--scan-width", type=int, default=512, help="hidden size of the layer scan")
    p.add_argument("--scan-layers", default="1,2,4,8", help="layer counts of the layer scan")
    p.add_argument("--widths", default="256,512,1024", help="hidden sizes of the width scan")
    p.add_argument("--hidden", type=int, help="runs at this hidden size (with --layers)")
    p.add_argument("--layers", default="1", help="layer counts of the --hidden runs")
    p.add_argument("--parallel", action="store_true", help="run the --hidden runs side by side")
    p.add_argument("--vocab", type=int, default=VOCAB, help="vocabulary of both models")
    p.add_argument("--matrix", nargs=2, metavar=("MxN", "MxN"),
                   help="merge one anchor/donor matrix pair of these shapes and report")
    p.add_argument("--costs", metavar="MxN", help="time each linear-algebra call on MxN")
    p.add_argument("--child", nargs=2, metavar=("REPLICA", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    globals()["VOCAB"] = args.vocab
    if args.child:
        child(*args.child)
        return 0
    if args.matrix:
        a, w = (tuple(int(x) for x in m.split("x")) for m in args.matrix)
        one_matrix(a, w)  # type: ignore[arg-type]
        return 0
    if args.costs:
        costs(tuple(int(x) for x in args.costs.split("x")))  # type: ignore[arg-type]
        return 0
    rows = []
    if args.hidden:
        counts = [int(x) for x in args.layers.split(",")]
        if args.parallel:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(counts)) as pool:
                rows = list(pool.map(lambda n: measure(args.hidden, n), counts))
        else:
            rows = [measure(args.hidden, n) for n in counts]
    else:
        for layers in (int(x) for x in args.scan_layers.split(",")):
            rows.append({"scan": "layers", **measure(args.scan_width, layers)})
        for hidden in (int(x) for x in args.widths.split(",")):
            rows.append({"scan": "width", **measure(hidden, 1)})
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
