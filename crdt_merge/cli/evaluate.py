"""``crdt-merge eval``: bits per byte and perplexity of a causal LM on a text.

Bits per byte is the model's total negative log-likelihood of the text, in bits, divided by
the text's length in UTF-8 bytes. It does not depend on the tokenizer, so models with
different vocabularies (SmolLM2's 49,152 tokens, Gemma 3's 262,144) compare on it;
perplexity is per token of the model's own tokenizer and compares only within one.

Scoring: the text is tokenized once without special tokens; windows of ``window`` tokens
advance by ``stride``, each starting with the tokenizer's BOS token when it has one, and
each token is scored exactly once, in the first window that reaches it, with at least
``window - stride`` tokens of context (except near the start). The log-likelihoods are
float32 log-softmax values summed in float64. This is a gate for a merge, not a benchmark
suite: run it on the anchor and on the merge, on the same text, and compare.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crdt_merge.errors import BadParameter, ModelImportError

DEFAULT_WINDOW = 1024
DEFAULT_STRIDE = 512


@dataclass(frozen=True)
class Evaluation:
    """The result of scoring one text.

    Attributes:
        bits_per_byte: total NLL in bits / UTF-8 bytes of the text.
        perplexity: ``exp(total NLL in nats / tokens scored)``, per token of this tokenizer.
        nll_nats: total negative log-likelihood.
        tokens, bytes: what was scored.
        window, stride: the scoring windows.
    """

    bits_per_byte: float
    perplexity: float
    nll_nats: float
    tokens: int
    bytes: int
    window: int
    stride: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_text(path: str | Path, max_bytes: int | None = None) -> str:
    """A UTF-8 text file, cut to at most ``max_bytes`` bytes at a character boundary.

    Raises:
        BadParameter: the file is missing, empty or not UTF-8.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadParameter(f"--text {path}: {exc.strerror or exc}") from None
    if max_bytes is not None:
        data = data[:max_bytes]
    try:
        text = data.decode("utf-8", errors="strict" if max_bytes is None else "ignore")
    except UnicodeDecodeError:
        raise BadParameter(f"--text {path} is not UTF-8 text") from None
    if not text:
        raise BadParameter(f"--text {path} is empty")
    return text


def score(model: Any, token_ids: list[int], bos: int | None, *, window: int = DEFAULT_WINDOW,
          stride: int = DEFAULT_STRIDE) -> tuple[float, int]:
    """Total NLL (nats) of ``token_ids`` under ``model`` and the number of tokens scored.

    ``model`` is a transformers causal LM (``model(input_ids).logits``). Window ``w`` holds
    tokens ``[max(0, e - window + b), e)`` with ``e = min(n, (w + 1) * stride)`` (``b = 1``
    with a BOS token, which is put first, else ``0``) and scores the tokens past the
    previous window's end.
    """
    import torch

    if window < 2 or not 0 < stride <= window - (1 if bos is not None else 0):
        raise BadParameter(f"need window >= 2 and 0 < stride <= window (got {window}, {stride})")
    n = len(token_ids)
    lead = 1 if bos is not None else 0
    total = 0.0
    scored = 0
    done = 0
    ids = torch.tensor(token_ids, dtype=torch.long)
    while done < n:
        end = min(n, done + stride)
        begin = max(0, end - (window - lead))
        chunk = ids[begin:end]
        if bos is not None:
            chunk = torch.cat([torch.tensor([bos], dtype=torch.long), chunk])
        new = end - done  # the last `new` tokens of the chunk are scored
        first = chunk.numel() - new  # position of the first scored token in the chunk
        if first == 0:  # no BOS and nothing before: the very first token has no context
            first, new = 1, new - 1
        if new > 0:
            with torch.inference_mode():
                logits = model(chunk.unsqueeze(0)).logits[0, first - 1:-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = chunk[first:]
            picked = logp.gather(1, target.unsqueeze(1)).squeeze(1).double()
            total -= float(picked.sum())
            scored += new
        done = end
    return total, scored


def evaluate(model_dir: str | Path, text: str, *, window: int = DEFAULT_WINDOW,
             stride: int = DEFAULT_STRIDE) -> Evaluation:
    """Load a model folder with transformers (float32) and score ``text`` (see module doc).

    Raises:
        ModelImportError: transformers is missing or cannot load the folder.
        BadParameter: the text yields no token to score, or bad window sizes.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ModelImportError("eval needs transformers: pip install transformers") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelImportError(f"{model_dir}: transformers cannot load it ({exc})") from None
    model.eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total, scored = score(model, ids, tokenizer.bos_token_id, window=window, stride=stride)
    if scored == 0:
        raise BadParameter("the text is too short: no token was scored")
    size = len(text.encode("utf-8"))
    return Evaluation(total / math.log(2) / size, math.exp(total / scored), total, scored,
                      size, window, stride)
