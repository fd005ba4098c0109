"""Cross-family transfer on real weights (issue 17; results in docs/cross-family.md).

Two experiments, each scored in bits per byte on held-out news and Wikipedia text:

1. **Rotated twin** (a known answer): SmolLM2-135M fine-tuned on news (the fine-tune of
   tests/bench/merge_quality.py, same settings), and the *twin* of base and fine-tune
   (tests/fixtures/twin.py: residual stream rotated, MLP neurons and heads permuted, norm
   gains folded; the same function in other coordinates). The twin's task vector is
   carried to the unrotated SmolLM2 by ``crdt_merge.transfer``; recovery is the share of
   the fine-tune's own gain in held-out news bits per byte that the transferred model
   keeps. Controls in the same run: the same transfer with a random alignment (donor and
   anchor positions shuffled against each other), the weights-only ``cross_family`` route
   (preset ``asymmetric``), and the ceiling of any matrix-only transfer (the base plus the
   fine-tune's change of the seven projection roles only, in the base's own coordinates).
2. **Across families**: the same SmolLM2 news task vector carried into gemma-3-270m, with
   the same controls (weights-only route: ``cross_family`` with the fine-tune as the donor).

Every transferred delta goes through the real path: ``crdt-merge contribute --delta
--base ANCHOR`` and ``recipe --method task_arithmetic --param lambda=1 --anchor ANCHOR``,
``resolve``. Run from the repository root (hours on a loaded 2-core machine; every finished
step is kept under ``--out`` and skipped on a rerun)::

    .venv/bin/python tests/bench/real_models.py smollm2-135m gemma-3-270m
    .venv/bin/pip install --no-deps gensim==4.4.0
    .venv/bin/python tests/bench/transfer_eval.py --out /tmp/transfer-eval
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ROLE_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def cli(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "crdt_merge", "--json", *argv],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"crdt-merge {' '.join(argv)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def cached(path: Path, make: Any) -> Any:
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value, indent=1) + "\n")
    return value


def save(model: Any, tok_dir: Path, target: Path) -> Path:
    from transformers import AutoTokenizer

    work = target.with_name(target.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    model.save_pretrained(work, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(work)
    if target.exists():
        shutil.rmtree(target)
    work.rename(target)
    return target


def evaluate(folder: Path, held: dict[str, str]) -> dict[str, Any]:
    """Bits per byte (and perplexity) of each held-out text, as cross_family_eval scores."""
    from tests.bench.cross_family_eval import load_scored

    return load_scored(folder, held)[2]


def merged(work: Path, contribute: list[str], recipe: list[str]) -> Path:
    """One contribution and a recipe through the command line, resolved into
    ``work/merged`` (the path every replica resolves); kept across reruns."""
    out = work / "merged"
    if (out / "config.json").exists():
        return out
    replica = work / "replica"
    if replica.exists():
        shutil.rmtree(replica)
    cli("init", str(replica), "--site", "lab")
    cli("contribute", str(replica), *contribute)
    cli("recipe", str(replica), *recipe)
    result = cli("resolve", str(replica), "--out", str(out), "--workers", "2")
    (work / "checkpoint.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(replica)
    return out


def merged_with_delta(work: Path, anchor: Path, delta: Path) -> Path:
    """anchor + delta: task arithmetic, lambda 1."""
    return merged(work, [str(delta), "--delta", "--base", str(anchor), "--weight", "1"],
                  ["--method", "task_arithmetic", "--param", "lambda=1", "--anchor",
                   str(anchor)])


def weights_only(work: Path, anchor: Path, donor: Path) -> Path:
    """The weights-only route: cross_family, preset asymmetric."""
    return merged(work, [str(donor)], ["--method", "cross_family", "--param",
                                       "preset=asymmetric", "--anchor", str(anchor)])


def run_transfer(work: Path, donor_base: Path, donor: Path, anchor: Path, text: str,
                 params: Any) -> dict[str, Any]:
    from crdt_merge import transfer as tr

    delta = work / "delta"
    record = work / "transfer.json"
    if not record.exists():
        start = time.perf_counter()
        db, _ = tr.load(donor_base)
        df, _ = tr.load(donor)
        an, _ = tr.load(anchor)
        from transformers import AutoTokenizer

        dt = AutoTokenizer.from_pretrained(str(donor_base))
        at = AutoTokenizer.from_pretrained(str(anchor))
        result = tr.transfer(db, df, an, dt, at, text, params,
                             progress=lambda i, n: log(f"    window {i}/{n}") if i % 20 == 0
                             else None)
        seconds = time.perf_counter() - start
        tr.write_delta(result, an, delta, {"engine": tr.ENGINE, "params": params.record()})
        AutoTokenizer.from_pretrained(str(anchor)).save_pretrained(delta)
        norms = {k: v["norm"] / v["anchor_norm"] for k, v in result.stats.items()}
        record.write_text(json.dumps({
            "seconds": round(seconds, 1), "positions": result.positions,
            "windows": result.windows, "params": params.record(),
            "depth_map": {str(k): v for k, v in result.depth_map.items()},
            "largest_relative_change": max(norms.values()),
            "mean_relative_change": sum(norms.values()) / len(norms),
        }, indent=1) + "\n")
    return json.loads(record.read_text())


def matrices_only(base: Path, ft: Path, target: Path) -> Path:
    """The base plus the fine-tune's change of the seven projection roles only."""
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM

    b = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    f = dict(AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float32)
             .named_parameters())
    with torch.no_grad():
        for name, p in b.named_parameters():
            if any(f".{r}." in name for r in ROLE_NAMES):
                p.copy_(f[name])
    return save(b, base, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/transfer-eval"))
    parser.add_argument("--calibration-chars", type=int, default=30000,
                        help="characters of news *training* text run through the models")
    parser.add_argument("--steps", type=int, default=8,
                        help="fine-tuning steps (merge_quality's settings otherwise)")
    parser.add_argument("--eval-total", type=int, default=6000,
                        help="held-out characters scored per domain (about)")
    parser.add_argument("--phases", nargs="*", default=[
        "twin", "twin-random", "gemma", "gemma-random", "ceiling", "twin-weights",
        "gemma-weights", "twin-local", "gemma-local", "gemma-ft", "reverse", "reverse-random",
        "reverse-weights"], help="what to run, in this order")
    parser.add_argument("--gemma-steps", type=int, default=8,
                        help="fine-tuning steps of gemma-3-270m for the reverse direction")
    parser.add_argument("--gemma-lr", type=float, default=1e-5,
                        help="its learning rate (1e-4, SmolLM2's, made gemma-3 worse on "
                             "held-out news: 0.8015 -> 0.9369 bits per byte)")
    args = parser.parse_args(argv)

    import torch

    from crdt_merge import transfer as tr
    from tests.bench.merge_quality import fine_tune, scored_text, texts
    from tests.bench.real_models import real_model
    from tests.fixtures.twin import Twin

    torch.set_num_threads(2)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    smol = real_model("smollm2-135m")
    data = texts()
    held = {d: "\n\n".join(scored_text(data[d][1], 1500, args.eval_total))
            for d in ("news", "wiki")}
    calibration = "\n\n".join(data["news"][0])[: args.calibration_chars]
    ft_args = argparse.Namespace(steps=args.steps, batch=4, seq_len=128, lr=1e-4)
    log("fine-tuning SmolLM2-135M on news (the merge_quality settings)")
    train = fine_tune(smol, data["news"][0], out / "smollm2-news", ft_args)
    ft = out / "smollm2-news"
    results: dict[str, Any] = {"train": train, "scores": {}, "transfers": {}}
    scores = results["scores"]

    def score(name: str, folder: Path) -> dict[str, Any]:
        log(f"scoring {name}")
        scores[name] = cached(out / f"score-{name}.json", lambda: evaluate(folder, held))
        log(f"  {name}: " + ", ".join(f"{k} {v['bpb']:.4f}" for k, v in scores[name].items()))
        return scores[name]

    score("smollm2", smol)
    score("smollm2-news", ft)
    twin_dir = out / "twin"
    gemma = real_model("gemma-3-270m")

    def make_twin() -> None:
        twin_dir.mkdir(exist_ok=True)
        if not (twin_dir / "base" / "config.json").exists():
            base_m, _ = tr.load(smol)
            ft_m, _ = tr.load(ft)
            transform = Twin(base_m.config, seed=2026)
            probe = torch.tensor([[1, 504, 3300, 281, 9000, 12, 42, 7777]])
            with torch.no_grad():
                before = base_m(input_ids=probe).logits
            tb, tf = copy.deepcopy(base_m), copy.deepcopy(ft_m)
            transform.apply(tb)
            transform.apply(tf)
            with torch.no_grad():
                diff = float((tb(input_ids=probe).logits - before).abs().max())
            (twin_dir / "check.json").write_text(json.dumps(
                {"max_abs_logit_difference": diff,
                 "max_abs_logit": float(before.abs().max())}) + "\n")
            save(tf, smol, twin_dir / "ft")
            save(tb, smol, twin_dir / "base")
        results["twin_check"] = json.loads((twin_dir / "check.json").read_text())

    def transferred(name: str, donor_base: Path, donor: Path, anchor: Path, mode: str,
                    control: str) -> None:
        work = out / name.replace(" ", "_").replace(">", "")
        work.mkdir(exist_ok=True)
        log(f"transfer {name}")
        results["transfers"][name] = run_transfer(
            work, donor_base, donor, anchor, calibration,
            tr.TransferParams(mode=mode, control=control))
        score(name, merged_with_delta(work, anchor, work / "delta"))

    for phase in args.phases:
        if phase in ("twin", "twin-random", "twin-local", "twin-weights"):
            make_twin()
        if phase == "twin":
            transferred("twin->smollm2 direct", twin_dir / "base", twin_dir / "ft", smol,
                        "direct", "none")
        elif phase == "twin-random":
            transferred("twin->smollm2 direct random", twin_dir / "base", twin_dir / "ft", smol,
                        "direct", "random")
        elif phase == "twin-local":
            transferred("twin->smollm2 local", twin_dir / "base", twin_dir / "ft", smol,
                        "local", "none")
        elif phase == "ceiling":
            score("matrices-only ceiling", matrices_only(smol, ft, out / "matrices-only"))
        elif phase == "twin-weights":
            work = out / "twin-weights-only"
            work.mkdir(exist_ok=True)
            score("twin->smollm2 weights-only", weights_only(work, smol, twin_dir / "ft"))
        elif phase == "gemma":
            score("gemma", gemma)
            transferred("smollm2-news->gemma direct", smol, ft, gemma, "direct", "none")
        elif phase == "gemma-random":
            transferred("smollm2-news->gemma direct random", smol, ft, gemma, "direct",
                        "random")
        elif phase == "gemma-local":
            transferred("smollm2-news->gemma local", smol, ft, gemma, "local", "none")
        elif phase in ("gemma-ft", "reverse", "reverse-random", "reverse-weights"):
            # The reverse direction: gemma-3-270m fine-tuned on the same news documents,
            # with the same settings (its own gain is the reference), carried into SmolLM2.
            gft = out / "gemma-news"
            log("fine-tuning gemma-3-270m on news (the merge_quality settings)")
            results["train_gemma"] = fine_tune(
                gemma, data["news"][0], gft,
                argparse.Namespace(steps=args.gemma_steps, batch=4, seq_len=128,
                                   lr=args.gemma_lr))
            score("gemma", gemma)
            score("gemma-news", gft)
            if phase == "reverse":
                transferred("gemma-news->smollm2 direct", gemma, gft, smol, "direct", "none")
            elif phase == "reverse-random":
                transferred("gemma-news->smollm2 direct random", gemma, gft, smol, "direct",
                            "random")
            elif phase == "reverse-weights":
                work = out / "reverse-weights-only"
                work.mkdir(exist_ok=True)
                score("gemma-news->smollm2 weights-only", weights_only(work, smol, gft))
        elif phase == "gemma-weights":
            score("gemma", gemma)
            work = out / "gemma-weights-only"
            work.mkdir(exist_ok=True)
            score("smollm2-news->gemma weights-only", weights_only(work, gemma, ft))
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
