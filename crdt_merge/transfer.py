"""Cross-family transfer from calibration activations (specs/cross-family.md section 7).

A site fine-tuned a *donor* model (``donor_base`` -> ``donor``) of one family and wants its
fine-tune in an *anchor* of another family. Weights alone share no coordinates between two
independently trained models; activations on the same text do. This module runs the donor
base and the anchor on a calibration text, pairs the positions where both tokenizers end a
word, and per matrix of the anchor solves, in closed form, for the update that best
reproduces (in the anchor's coordinates) the change the donor's fine-tune makes to the
donor's matching matrix output at those positions:

- direct effect of the fine-tune on donor matrix ``W_D`` (input ``X_D``):
  ``E_D = X_D (W'_D - W_D)^T``;
- output alignment ``S`` (donor output space -> anchor output space), ridge regression of
  the anchor's outputs ``Y_A = X_A W_A^T`` on the donor's ``Y_D = X_D W_D^T``;
- anchor update ``dW_A^T = argmin ||X_A dW^T - E_D S||^2 + lam ||dW||^2``.

Only sufficient statistics are accumulated (``X_A^T X_A``, ``X_A^T E_D``, ``Y_D^T Y_D``,
``Y_D^T Y_A``), so memory does not grow with the text. The result is an ordinary delta of
the anchor's family: it is computed once, here, with BLAS (not bit-exact across CPUs), and
then stored and resolved like any delta, byte for byte the same on every replica.

torch and transformers are imported on use: this module is only for the ``transfer``
command and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crdt_merge.errors import BadParameter, ModelImportError

ENGINE = "transfer/1"

#: canonical role -> module path inside one decoder layer (Llama, Qwen2, Mistral, Gemma 2/3)
ROLE_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_o": "self_attn.o_proj",
    "mlp_gate": "mlp.gate_proj",
    "mlp_up": "mlp.up_proj",
    "mlp_down": "mlp.down_proj",
}
ROLES = tuple(ROLE_MODULES)
#: roles that write into the residual stream: every donor layer of the depth bucket adds
WRITERS = ("attn_o", "mlp_down")
#: roles that read the same input share one Gram matrix
INPUT_OF = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_o": "o_in",
            "mlp_gate": "mlp_in", "mlp_up": "mlp_in", "mlp_down": "down_in"}


@dataclass(frozen=True)
class TransferParams:
    """Everything that decides the result besides the three models and the text."""

    roles: tuple[str, ...] = ROLES
    ridge: float = 1e-4  # relative: lam = ridge * trace(G) / dim
    align_ridge: float = 1e-4
    window_chars: int = 1200
    max_windows: int = 0  # 0: the whole text
    top_k: int = 0  # 0: keep the full update; else its top_k singular directions
    tau: float = 0.0  # 0: no trust region; else ||dW||_F <= tau ||W_A||_F per matrix
    mode: str = "direct"  # "direct": every matrix its own effect; "local": writers fit the sublayer change
    control: str = "none"  # "random": donor rows paired with shuffled anchor rows (a control)
    seed: int = 0  # for the random control only
    #: fit the anchor's layers this many at a time (0: all at once). The result is the same;
    #: the text is run once per chunk, and only one chunk's statistics are held in memory
    #: (about 5 GB per layer at 7B width, in float64).
    chunk_layers: int = 0

    def check(self) -> None:
        bad = [r for r in self.roles if r not in ROLE_MODULES]
        if bad or not self.roles:
            raise BadParameter(f"transfer roles must be among {', '.join(ROLES)}; got {bad}")
        for name in ("ridge", "align_ridge", "tau"):
            value = getattr(self, name)
            if not (isinstance(value, float) and math.isfinite(value) and value >= 0):
                raise BadParameter(f"transfer {name} must be a finite number >= 0")
        if self.ridge == 0 or self.align_ridge == 0:
            raise BadParameter("ridge and align_ridge must be > 0 (the systems can be singular)")
        if (self.top_k < 0 or self.window_chars < 16 or self.max_windows < 0
                or self.chunk_layers < 0):
            raise BadParameter("top_k >= 0, window_chars >= 16, max_windows >= 0, "
                               "chunk_layers >= 0")
        if self.mode not in ("local", "direct"):
            raise BadParameter("mode must be 'local' or 'direct'")
        if self.control not in ("none", "random"):
            raise BadParameter("control must be 'none' or 'random'")

    def record(self) -> dict[str, Any]:
        return {"roles": list(self.roles), "ridge": repr(self.ridge),
                "align_ridge": repr(self.align_ridge), "window_chars": self.window_chars,
                "max_windows": self.max_windows, "top_k": self.top_k, "tau": repr(self.tau),
                "mode": self.mode, "control": self.control, "seed": self.seed,
                "chunk_layers": self.chunk_layers}


@dataclass
class TransferResult:
    """The anchor's update per native tensor name, and what was measured on the way."""

    deltas: dict[str, Any]  # native name -> float32 tensor (anchor's shape)
    depth_map: dict[int, list[int]]  # anchor layer -> donor layers whose effect it receives
    positions: int  # matched calibration positions used
    windows: int
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # per native name


# -- calibration positions ---------------------------------------------------------------


def windows_of(text: str, chars: int) -> list[str]:
    """Cut ``text`` into pieces of about ``chars`` characters, at whitespace."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + chars)
        if end < len(text):
            space = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            if space > start + chars // 2:
                end = space
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    return out


def word_ends(text: str) -> list[int]:
    """Character offsets just past the last character of each word (letters and digits)."""
    return [i + 1 for i, ch in enumerate(text)
            if ch.isalnum() and (i + 1 == len(text) or not text[i + 1].isalnum())]


def token_ends(offsets: Sequence[tuple[int, int]]) -> dict[int, int]:
    """End offset -> index of the token ending there (special tokens, with empty spans,
    are skipped; the last token ending at an offset wins)."""
    out: dict[int, int] = {}
    for index, (start, end) in enumerate(offsets):
        if end > start:
            out[end] = index
    return out


def matched_positions(text: str, donor_offsets: Sequence[tuple[int, int]],
                      anchor_offsets: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token indices (donor, anchor) of the word ends where both tokenizations end a token.

    At such a position both models have read exactly the same characters, so their hidden
    states describe the same prefix of the text."""
    d, a = token_ends(donor_offsets), token_ends(anchor_offsets)
    ends = [e for e in word_ends(text) if e in d and e in a]
    return [d[e] for e in ends], [a[e] for e in ends]


# -- models ----------------------------------------------------------------------------


def decoder_layers(model: Any) -> Any:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelImportError(
            f"{type(model).__name__}: transfer needs a decoder with model.layers[i].self_attn "
            f"and .mlp ({', '.join(ROLE_MODULES.values())}); this architecture has none")
    return layers


def _module(layer: Any, path: str) -> Any:
    node = layer
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            raise ModelImportError(f"decoder layer has no module {path}: the transfer supports "
                                   "families with separate q/k/v/o and gate/up/down projections")
    return node


def depth_map(donor_layers: int, anchor_layers: int) -> tuple[dict[int, int], dict[int, list[int]]]:
    """(representative donor layer per anchor layer, donor layers per anchor layer).

    Relative depth is matched: donor layer ``m`` belongs to anchor layer
    ``round(m (La - 1) / (Ld - 1))``; anchor layer ``l`` is represented by donor layer
    ``round(l (Ld - 1) / (La - 1))``."""
    def scale(i: int, src: int, dst: int) -> int:
        return 0 if src <= 1 else int(math.floor(i * (dst - 1) / (src - 1) + 0.5))

    rep = {layer: scale(layer, anchor_layers, donor_layers) for layer in range(anchor_layers)}
    bucket: dict[int, list[int]] = {layer: [] for layer in range(anchor_layers)}
    for m in range(donor_layers):
        bucket[scale(m, donor_layers, anchor_layers)].append(m)
    return rep, bucket


class _Capture:
    """Forward hooks that keep each Linear's input and output rows at chosen positions."""

    def __init__(self, layers: Any, wanted: dict[int, Iterable[str]]) -> None:
        self.rows: list[int] = []
        self.inputs: dict[tuple[int, str], Any] = {}
        self.outputs: dict[tuple[int, str], Any] = {}
        self.handles = []
        for index, roles in wanted.items():
            for role in roles:
                mod = _module(layers[index], ROLE_MODULES[role])
                self.handles.append(mod.register_forward_hook(self._hook(index, role)))

    def _hook(self, index: int, role: str) -> Callable[..., None]:
        def hook(_mod: Any, args: tuple[Any, ...], out: Any) -> None:
            x = args[0][0, self.rows]
            self.inputs[(index, role)] = x.float()
            self.outputs[(index, role)] = out[0, self.rows].float()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _weights(model: Any) -> dict[str, Any]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _native_names(model: Any, layers: Any) -> dict[tuple[int, str], str]:
    """(layer, role) -> the parameter name of the projection's weight in ``model``."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for index in range(len(layers)):
        for role, path in ROLE_MODULES.items():
            out[(index, role)] = names[id(_module(layers[index], path))] + ".weight"
    return out


#: the norm whose output each sublayer reads (first name found in the decoder layer)
ATTN_NORMS = ("input_layernorm",)
MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm")


def _norm(layer: Any, names: Sequence[str]) -> Any:
    for name in names:
        mod = getattr(layer, name, None)
        if mod is not None:
            return mod
    raise ModelImportError(f"decoder layer has none of the norms {', '.join(names)}")


class _Patch:
    """Capture (``record``) or overwrite (``replay``) the inputs of every layer's two
    sublayer norms, so a fine-tuned model's sublayers can be run on its base's inputs."""

    def __init__(self, layers: Any, replay: dict[tuple[int, str], Any] | None) -> None:
        self.seen: dict[tuple[int, str], Any] = {}
        self.replay = replay
        self.handles = []
        for index, layer in enumerate(layers):
            for part, names in (("attn", ATTN_NORMS), ("mlp", MLP_NORMS)):
                mod = _norm(layer, names)
                self.handles.append(mod.register_forward_pre_hook(self._hook((index, part))))

    def _hook(self, key: tuple[int, str]) -> Callable[..., Any]:
        def hook(_mod: Any, args: tuple[Any, ...]) -> Any:
            if self.replay is None:
                self.seen[key] = args[0]
                return None
            return (self.replay[key],) + tuple(args[1:])
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def transfer(donor_base: Any, donor: Any, anchor: Any, donor_tok: Any, anchor_tok: Any,
             text: str, params: TransferParams,
             progress: Callable[[int, int], None] | None = None) -> TransferResult:
    """Compute the anchor's update from loaded transformers models and fast tokenizers.

    ``donor_base`` and ``anchor`` are run on ``text``. With ``mode="local"`` the donor's
    fine-tune is run too, each of its sublayers on the base's input at that sublayer, and
    the anchor's writers (attention output, MLP down projection) are fitted to reproduce
    the change of the donor's sublayer outputs. With ``mode="direct"`` every chosen matrix
    carries its own direct effect ``X_D (W'_D - W_D)^T`` (read from the weights).

    The anchor's layers are fitted ``params.chunk_layers`` at a time (each chunk runs the
    text again, each forward pass stopping after the last layer the chunk reads); every
    anchor matrix depends only on its own layer's statistics, so the result is the same."""
    params.check()
    for tok in (donor_tok, anchor_tok):
        if not getattr(tok, "is_fast", False):
            raise BadParameter("transfer needs fast tokenizers (character offsets)")
    d_layers, a_layers = decoder_layers(donor_base), decoder_layers(anchor)
    f_layers = decoder_layers(donor)
    if len(f_layers) != len(d_layers):
        raise ModelImportError("the donor and its base have different depths")
    local = params.mode == "local"
    roles = [r for r in params.roles if r in WRITERS] if local else list(params.roles)
    if not roles:
        raise BadParameter("mode 'local' fits the writers (attn_o, mlp_down); none is chosen")
    rep, bucket = depth_map(len(d_layers), len(a_layers))
    pieces = windows_of(text, params.window_chars)
    if params.max_windows:
        pieces = pieces[: params.max_windows]
    models = (donor_base, donor, anchor, donor_tok, anchor_tok)
    chunk = params.chunk_layers or len(a_layers)
    deltas: dict[str, Any] = {}
    stats: dict[str, dict[str, float]] = {}
    positions = 0
    total = len(a_layers)

    def chunk_progress(done: int, width: int) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda i, n: progress(done * n + i * width, n * total)

    for first in range(0, total, chunk):
        layers = range(first, min(first + chunk, total))
        positions = _fit(models, pieces, params, roles, rep, bucket, layers, deltas, stats,
                         chunk_progress(first, len(layers)))
    return TransferResult(deltas, bucket, positions, len(pieces), stats)


class _Stop(Exception):
    """Raised by a hook after the last decoder layer a chunk needs: the rest of the
    forward pass (later layers, the final norm, the vocabulary projection) is skipped."""


def _stop_after(layers: Any, index: int) -> Any:
    def hook(*_: Any) -> None:
        raise _Stop
    return layers[index].register_forward_hook(hook)


def _run(model: Any, stop_at: int, **inputs: Any) -> None:
    handle = _stop_after(decoder_layers(model), stop_at)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()


def _fit(models: tuple[Any, ...], pieces: Sequence[str], params: TransferParams,
         roles: Sequence[str], rep: dict[int, int], bucket: dict[int, list[int]],
         layers: range, deltas: dict[str, Any], stats: dict[str, dict[str, float]],
         progress: Callable[[int, int], None] | None) -> int:
    """Accumulate the statistics of the anchor ``layers`` over every window, solve them
    into ``deltas`` and ``stats``; returns the number of matched positions."""
    import torch

    donor_base, donor, anchor, donor_tok, anchor_tok = models
    d_layers, a_layers, f_layers = (decoder_layers(donor_base), decoder_layers(anchor),
                                    decoder_layers(donor))
    local = params.mode == "local"
    d_names = _native_names(donor_base, d_layers)
    a_names = _native_names(anchor, a_layers)
    d_base_w, d_ft_w, a_w = _weights(donor_base), _weights(donor), _weights(anchor)
    # which (layer, role) activations each model must give
    sources = {(layer, role): bucket[layer] if role in WRITERS else [rep[layer]]
               for layer in layers for role in roles}
    aligner = {role: ("mlp_down" if role in ("mlp_gate", "mlp_up") else role) for role in roles}
    donor_wanted: dict[int, set[str]] = {}
    for (layer, role), ms in sources.items():
        for m in ms + [rep[layer]]:
            donor_wanted.setdefault(m, set()).add(role)
        donor_wanted.setdefault(rep[layer], set()).add(aligner[role])
    anchor_wanted = {layer: set(roles) | {aligner[r] for r in roles} for layer in layers}
    task = {}
    for (m, role) in sorted({(m, r) for (_, r), ms in sources.items() for m in ms}):
        name = d_names[(m, role)]
        if d_ft_w[name].shape != d_base_w[name].shape:
            raise ModelImportError(f"{name}: the donor's shape differs from its base's")
        if not local:
            task[(m, role)] = (d_ft_w[name].double() - d_base_w[name].double()).float()
    d_last, a_last = max(donor_wanted), max(layers)

    gram_a: dict[tuple[int, str], Any] = {}
    cross: dict[tuple[int, str], Any] = {}
    gram_d: dict[tuple[int, str], Any] = {}
    align: dict[tuple[int, str], Any] = {}

    def add(store: dict, key: tuple[Any, ...], value: Any) -> None:
        """Per-window products are float32 (BLAS speed); the sums over windows float64."""
        if key in store:
            store[key] += value.double()
        else:
            store[key] = value.double()

    gen = torch.Generator().manual_seed(params.seed)
    d_cap, a_cap = _Capture(d_layers, donor_wanted), _Capture(a_layers, anchor_wanted)
    f_cap = _Capture(f_layers, {m: set(WRITERS) for m in donor_wanted}) if local else None
    record = _Patch(d_layers, None) if local else None
    positions = 0
    try:
        with torch.inference_mode():
            for n, piece in enumerate(pieces):
                d_enc = donor_tok(piece, return_offsets_mapping=True, return_tensors="pt")
                a_enc = anchor_tok(piece, return_offsets_mapping=True, return_tensors="pt")
                d_rows, a_rows = matched_positions(piece, d_enc["offset_mapping"][0].tolist(),
                                                   a_enc["offset_mapping"][0].tolist())
                if not d_rows:
                    continue
                if params.control == "random":
                    perm = torch.randperm(len(d_rows), generator=gen).tolist()
                    d_rows = [d_rows[i] for i in perm]
                d_cap.rows, a_cap.rows = d_rows, a_rows
                if f_cap is not None:
                    f_cap.rows = d_rows
                d_args = {"input_ids": d_enc["input_ids"],
                          "attention_mask": d_enc["attention_mask"]}
                _run(donor_base, d_last, **d_args)
                _run(anchor, a_last, input_ids=a_enc["input_ids"],
                     attention_mask=a_enc["attention_mask"])
                if local:
                    replay = _Patch(f_layers, record.seen)
                    try:
                        _run(donor, d_last, **d_args)
                    finally:
                        replay.close()
                positions += len(d_rows)
                grams_done: set[tuple[Any, ...]] = set()
                for (layer, role), ms in sources.items():
                    key = (layer, role)
                    x_a = a_cap.inputs[key]
                    gkey = (layer, INPUT_OF[role])
                    if gkey not in grams_done:
                        add(gram_a, gkey, x_a.T @ x_a)
                        grams_done.add(gkey)
                    effect = None
                    for m in ms:
                        if local:
                            e = f_cap.outputs[(m, role)] - d_cap.outputs[(m, role)]
                        else:
                            e = d_cap.inputs[(m, role)] @ task[(m, role)].T
                        effect = e if effect is None else effect + e
                    if effect is not None:
                        add(cross, key, x_a.T @ effect)
                    # output alignment: a matrix's own outputs, except gate/up, whose
                    # outputs outnumber their inputs: those use the MLP's activations
                    by_input = aligner[role] != role
                    y_d = (d_cap.inputs if by_input else d_cap.outputs)[(rep[layer],
                                                                        aligner[role])]
                    y_a = (a_cap.inputs if by_input else a_cap.outputs)[(layer, aligner[role])]
                    akey = (layer, aligner[role], by_input)  # gate and up share theirs
                    if akey not in grams_done:
                        add(gram_d, akey, y_d.T @ y_d)
                        add(align, akey, y_d.T @ y_a)
                        grams_done.add(akey)
                if progress is not None:
                    progress(n + 1, len(pieces))
    finally:
        d_cap.close()
        a_cap.close()
        if local:
            f_cap.close()
            record.close()
    if positions == 0:
        raise BadParameter("the calibration text gave no position where both tokenizers end "
                           "a word; give more (or plainer) text")

    solved: dict[tuple[Any, ...], Any] = {}
    for (layer, role) in sources:
        key = (layer, role)
        if key not in cross:
            continue
        name = a_names[key]
        w_a = a_w[name].double()
        akey = (layer, aligner[role], aligner[role] != role)
        if akey not in solved:
            solved[akey] = _ridge_solve(gram_d[akey], align[akey], params.align_ridge)
        s = solved[akey]
        update = _ridge_solve(gram_a[(layer, INPUT_OF[role])], cross[key] @ s, params.ridge).T
        raw = float(update.norm())
        if params.top_k:
            u, sv, vh = torch.linalg.svd(update, full_matrices=False)
            k = min(params.top_k, sv.numel())
            update = (u[:, :k] * sv[:k]) @ vh[:k]
        limit = params.tau * float(w_a.norm())
        norm = float(update.norm())
        if params.tau and norm > limit:
            update = update * (limit / norm)
        deltas[name] = update.to(torch.float32).contiguous()
        stats[name] = {"raw_norm": raw, "norm": float(update.norm()),
                       "anchor_norm": float(w_a.norm())}
    return positions


def _ridge_solve(gram: Any, rhs: Any, ridge: float) -> Any:
    """``(G + lam I)^-1 rhs`` with ``lam = ridge * trace(G) / dim`` (Cholesky)."""
    import torch

    dim = gram.shape[0]
    lam = ridge * float(torch.trace(gram)) / dim
    if lam <= 0:
        lam = ridge
    system = gram + lam * torch.eye(dim, dtype=gram.dtype)
    factor = torch.linalg.cholesky(system)
    return torch.cholesky_solve(rhs, factor)


# -- folders ---------------------------------------------------------------------------


def load(folder: str | Path) -> tuple[Any, Any]:
    """A transformers causal LM (float32, eval mode) and its fast tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def write_delta(result: TransferResult, anchor: Any, out: str | Path,
                provenance: dict[str, Any]) -> Path:
    """A delta folder of the anchor's family: every weight of the anchor's checkpoint, zero
    where the transfer did not change it (content addressing stores the zeros once), plus
    the anchor's config and a ``transfer.json`` with the provenance."""
    import json

    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = anchor.state_dict()
    tensors = {}
    for name, value in state.items():
        delta = result.deltas.get(name)
        tensors[name] = (delta if delta is not None
                         else torch.zeros(value.shape, dtype=torch.float32)).contiguous()
    if getattr(anchor.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    anchor.config.to_json_file(str(out / "config.json"))
    (out / "transfer.json").write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
    return out
