"""Cross-family merges of real weights, scored in bits per byte (docs/cross-family.md).

SmolLM2-135M (llama) and gemma-3-270m (gemma3), each as the anchor with the other as the
donor, for every preset (and the asymmetric preset with the activation and q/k-norm
relaxations): which roles merged, how much each changed, whether transformers loads and
generates with the merge, and bits per byte on news and encyclopedia text against the
unmerged anchor. Run::

    .venv/bin/python tests/bench/real_models.py smollm2-135m gemma-3-270m   # once
    .venv/bin/pip install --no-deps gensim==4.4.0                             # the texts
    .venv/bin/python tests/bench/cross_family_eval.py --out docs/cross-family-results.json

The texts come from the gensim wheel's test data (../shared/DATA.md), read without
importing gensim: the last ABC news documents of ``lee_background.cor`` and the first
articles of the shortened English Wikipedia dump, markup stripped by :func:`wiki_text`.
No parameter of the merge was chosen by looking at these texts.
"""

from __future__ import annotations

import argparse
import bz2
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

RUNS = [
    ("asymmetric", {"preset": "asymmetric"}),
    ("conservative_uniform", {"preset": "conservative_uniform"}),
    ("aggressive_uniform", {"preset": "aggressive_uniform"}),
    ("asymmetric+relaxed", {"preset": "asymmetric", "relax_activation": True,
                            "relax_qk_norm": True}),
]
PROMPT = "The capital of France is"
#: tokens per scoring window; windows do not overlap (the same for anchor and merge)
WINDOW = 1024


def gensim_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise SystemExit("install the texts: .venv/bin/pip install --no-deps gensim==4.4.0")
    return Path(spec.origin).parent / "test" / "test_data"


def news_text(max_bytes: int) -> str:
    """The last documents of lee_background.cor, newest last, up to ``max_bytes``."""
    docs = (gensim_data() / "lee_background.cor").read_text(encoding="utf-8").splitlines()
    picked: list[str] = []
    size = 0
    for doc in reversed([d.strip() for d in docs if d.strip()]):
        if size + len(doc.encode()) + 1 > max_bytes:
            break
        picked.insert(0, doc)
        size += len(doc.encode()) + 1
    return "\n".join(picked) + "\n"


def wiki_text(max_bytes: int) -> str:
    """The opening paragraphs (at most a quarter of ``max_bytes`` each) of the first
    non-redirect articles of the shortened dump, as plain text."""
    path = next(gensim_data().glob("enwiki-*-shortened.bz2"))
    xml = bz2.decompress(path.read_bytes()).decode("utf-8")
    out: list[str] = []
    size = 0
    for title, body in re.findall(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, re.S):
        if body.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = strip_markup(body)
        if len(text) < 500:
            continue
        article = f"{title}\n\n{text}\n"
        own = 0
        for para in article.split("\n"):
            n = len(para.encode()) + 1
            if size + n > max_bytes:
                return "\n".join(out) + "\n"
            if own + n > max_bytes // 4:
                break
            out.append(para)
            size += n
            own += n
    return "\n".join(out) + "\n"


def strip_markup(body: str) -> str:
    import html

    t = html.unescape(html.unescape(body))
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref.*?</ref>", "", t, flags=re.S)
    for _ in range(3):
        t = re.sub(r"\{\{[^{}]*\}\}", "", t)
    t = re.sub(r"\{\|.*?\|\}", "", t, flags=re.S)
    t = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", t)
    t = re.sub(r"\[\[([^|\]]*\|)?([^\]]*)\]\]", r"\2", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", t, flags=re.M)
    t = re.sub(r"^[*#:;]+\s*", "", t, flags=re.M)
    t = re.sub(r"\n{3,}", "\n\n", t)
    return t.strip()


def load_scored(folder: Path, texts: dict[str, str]) -> tuple[Any, Any, dict[str, Any]]:
    """The folder's tokenizer and float32 model, and per text its bits per byte, perplexity
    and token count (windows of ``WINDOW`` tokens with BOS, each token predicted once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crdt_merge.cli.evaluate import score

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out: dict[str, Any] = {}
    for name, text in texts.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        nll, n = score(model, ids, tok.bos_token_id, window=WINDOW, stride=WINDOW - 1)
        out[name] = {"bpb": nll / 0.6931471805599453 / len(text.encode()),
                     "ppl": float(torch.exp(torch.tensor(nll / n))), "tokens": n}
    return tok, model, out


def evaluate_folder(folder: Path, texts: dict[str, str]) -> dict[str, Any]:
    import torch

    tok, model, out = load_scored(folder, texts)
    enc = tok(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        gen = model.generate(**enc, max_new_tokens=16, do_sample=False)
    out["sample"] = tok.decode(gen[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def changes(anchor: Path, merged: Path) -> dict[str, float]:
    """Per role: the largest ||out - A||_F / ||A||_F over the anchor's tensors."""
    from safetensors import safe_open

    from crdt_merge.families import detect

    config = json.loads((anchor / "config.json").read_text())
    worst: dict[str, float] = {}
    with safe_open(str(anchor / "model.safetensors"), "pt") as fa, \
            safe_open(str(merged / "model.safetensors"), "pt") as fm:
        names = list(fa.keys())
        family = detect(config, names)
        matched = family.match_names(names).matched
        for name in names:
            if name not in matched:
                continue
            rule, layer = matched[name]
            role = rule.canonical_names(layer)[0].split(".")[-2]
            a = fa.get_tensor(name).double()
            m = fm.get_tensor(name).double()
            rel = float((m - a).norm() / a.norm()) if a.norm() > 0 else 0.0
            worst[role] = max(worst.get(role, 0.0), rel)
    return {k: v for k, v in sorted(worst.items()) if v > 0}


def run(out_file: Path, max_bytes: int, work: Path) -> dict[str, Any]:
    from crdt_merge.replica import Replica
    from crdt_merge.resolve import plan, resolve
    from crdt_merge.store.importer import import_model
    from tests.bench.real_models import real_model

    texts = {"news": news_text(max_bytes), "wiki": wiki_text(max_bytes)}
    (work / "texts").mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (work / "texts" / f"{name}.txt").write_text(text)
    models = {"smollm2-135m": real_model("smollm2-135m"), "gemma-3-270m": real_model("gemma-3-270m")}
    results: dict[str, Any] = {"texts": {k: len(v.encode()) for k, v in texts.items()},
                               "max_bytes": max_bytes, "directions": []}
    for anchor_name, donor_name in (("smollm2-135m", "gemma-3-270m"),
                                    ("gemma-3-270m", "smollm2-135m")):
        t0 = time.time()
        base_eval = evaluate_folder(models[anchor_name], texts)
        print(anchor_name, "unmerged", json.dumps(base_eval), f"{time.time() - t0:.0f}s",
              flush=True)
        direction: dict[str, Any] = {"anchor": anchor_name, "donor": donor_name,
                                     "unmerged": base_eval, "runs": []}
        replica_dir = work / f"replica-{anchor_name}"
        if replica_dir.exists():
            shutil.rmtree(replica_dir)
        replica = Replica.create(replica_dir, site="bench")
        donor = import_model(replica.store, str(models[donor_name]), replica.piece_size)
        replica.contribute(donor.manifest_id, params={}, label=donor_name)
        anchor_id = import_model(replica.store, str(models[anchor_name]),
                                 replica.piece_size).manifest_id
        for label, params in RUNS:
            replica.set_recipe("cross_family", params, anchor=anchor_id)
            the_plan = plan(replica)
            section = the_plan.cross_family or {}
            entry = section.get("donors", [{}])[0]
            t1 = time.time()
            merged = resolve(replica, work / "merged", workers=2)
            seconds = time.time() - t1
            scored = evaluate_folder(merged.out, texts)
            record = {"run": label, "params": params, "plan_id": merged.plan_id,
                      "checkpoint_id": merged.checkpoint_id, "depth": entry.get("depth"),
                      "merged_roles": entry.get("merged"), "kept_roles": entry.get("kept"),
                      "resolve_seconds": round(seconds, 1),
                      "max_relative_change": changes(models[anchor_name], merged.out),
                      **scored}
            print(anchor_name, label, json.dumps(record), flush=True)
            direction["runs"].append(record)
            out_file.write_text(json.dumps(results | {"partial": direction}, indent=1))
        results["directions"].append(direction)
        replica.close()
        shutil.rmtree(replica_dir)
        shutil.rmtree(work / "merged", ignore_errors=True)
    out_file.write_text(json.dumps(results, indent=1) + "\n")
    return results


def table(results: dict[str, Any]) -> str:
    """The markdown table of docs/cross-family.md from the results JSON."""
    lines = ["| anchor <- donor | run | merged roles | largest change | news bpb (vs anchor) "
             "| wiki bpb (vs anchor) | greedy continuation of \"" + PROMPT + "\" |",
             "|---|---|---|---|---|---|---|"]
    directions = list(results.get("directions", []))
    if "partial" in results and results["partial"] not in directions:
        directions.append(results["partial"])
    for d in directions:
        base = d["unmerged"]
        lines.append(f"| {d['anchor']} | unmerged anchor | - | - | {base['news']['bpb']:.4f} "
                     f"| {base['wiki']['bpb']:.4f} | {_quote(base['sample'])} |")
        for r in d["runs"]:
            change = ", ".join(f"{k} {v:.3f}" for k, v in r["max_relative_change"].items())
            cells = [f"{r[t]['bpb']:.4f} ({(r[t]['bpb'] / base[t]['bpb'] - 1) * 100:+.1f}%)"
                     for t in ("news", "wiki")]
            lines.append(f"| {d['anchor']} <- {d['donor']} | {r['run']} "
                         f"| {', '.join(r['merged_roles'])} | {change} | {cells[0]} | {cells[1]} "
                         f"| {_quote(r['sample'])} |")
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "`" + text.replace("\n", " ").replace("|", "/").replace("`", "'").strip() + "`"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("cross-family-results.json"))
    p.add_argument("--max-bytes", type=int, default=8_000, help="bytes of each text")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--table", type=Path, help="print the markdown table of a results file")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.work:
        run(args.out, args.max_bytes, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="cross-family-") as tmp:
            run(args.out, args.max_bytes, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
