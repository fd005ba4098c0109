"""The canonical tensor namespace every family maps into (specs/families.md).

A canonical name has one of three forms, with ``param`` either ``weight`` or ``bias``::

    {role}.{param}                          model-level: embed.weight, lm_head.bias
    {stack}.{role}.{param}                  stack-level: decoder.final_norm.weight
    {stack}.layers.{layer}.{role}.{param}   per layer:   decoder.layers.3.attn_q.weight

``stack`` is ``encoder`` or ``decoder`` (a decoder-only LM has one ``decoder`` stack, an
encoder such as BERT one ``encoder`` stack, T5 both), ``layer`` a decimal integer without
leading zeros. Matrices are (out, in) as in ``torch.nn.Linear``; embeddings are
(rows, hidden) with row ``p`` of ``pos_embed`` the position ``p``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

STACKS = ("encoder", "decoder")
PARAMS = ("weight", "bias")

# role -> the compatibility attributes that decide whether two models' tensors of that role
# may be merged. Every role of every family carries exactly these keys.
_NORM = ("norm",)
_SUBLAYER_NORM = ("norm", "norm_placement", "parallel_residual")
_QK = ("position", "rotary_fraction", "attn_scale", "attn_softcap", "qk_norm")
_MLP = ("activation", "gated")
ROLE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    # model level
    "embed": ("embed_scale",),
    "pos_embed": ("position",),
    "pos_embed_offset": ("position",),
    "type_embed": (),
    "embed_norm": _NORM,
    "embed_proj_in": (),
    "embed_proj_out": (),
    "lm_head": ("logit_scale", "logit_softcap"),
    "mlm_dense": ("activation",),
    "mlm_norm": _NORM,
    "pooler": (),
    # stack level
    "final_norm": _NORM,
    # per layer: self-attention
    "attn_norm": _SUBLAYER_NORM,
    "attn_q": _QK,
    "attn_k": _QK,
    "attn_v": ("attn_scale",),
    "attn_o": ("parallel_residual", "residual_scale"),
    "attn_q_norm": _NORM,
    "attn_k_norm": _NORM,
    "attn_rel_bias": ("position",),
    "attn_out_norm": _NORM,
    # per layer: cross-attention (decoder of an encoder-decoder)
    "cross_norm": _SUBLAYER_NORM,
    "cross_q": ("attn_scale",),
    "cross_k": ("attn_scale",),
    "cross_v": ("attn_scale",),
    "cross_o": ("residual_scale",),
    # per layer: feed-forward
    "mlp_norm": _SUBLAYER_NORM,
    "mlp_gate": _MLP,
    "mlp_up": _MLP,
    "mlp_down": (*_MLP, "parallel_residual", "residual_scale"),
    "mlp_out_norm": _NORM,
}
MODEL_ROLES = frozenset(
    {"embed", "pos_embed", "pos_embed_offset", "type_embed", "embed_norm", "embed_proj_in",
     "embed_proj_out", "lm_head", "mlm_dense", "mlm_norm", "pooler"}
)
STACK_ROLES = frozenset({"final_norm"})
LAYER_ROLES = frozenset(ROLE_ATTRIBUTES) - MODEL_ROLES - STACK_ROLES

# Defaults of the attributes a family's data file may leave out; the rest it must give.
CLASS_DEFAULTS: dict[str, str | bool] = {
    "norm_placement": "pre",
    "parallel_residual": False,
    "rotary_fraction": "1",
    "attn_scale": "inv_sqrt_head_dim",
    "attn_softcap": "none",
    "qk_norm": False,
    "embed_scale": "1",
    "residual_scale": "1",
    "logit_scale": "1",
    "logit_softcap": "none",
}
REQUIRED_CLASSES = ("activation", "gated", "norm", "position")
CLASS_ATTRIBUTES = frozenset(CLASS_DEFAULTS) | frozenset(REQUIRED_CLASSES)

# Activation names that are one function under several spellings.
ACTIVATION_ALIASES = {
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python": "gelu",
}

_LAYER_RE = re.compile(r"^(encoder|decoder)\.layers\.(0|[1-9][0-9]*)\.([a-z_]+)\.(weight|bias)$")
_STACK_RE = re.compile(r"^(encoder|decoder)\.([a-z_]+)\.(weight|bias)$")
_MODEL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


@dataclass(frozen=True, order=True)
class CanonicalKey:
    """A parsed canonical name: ``stack`` and ``layer`` are None where the form lacks them."""

    stack: str | None
    layer: int | None
    role: str
    param: str

    def __str__(self) -> str:
        if self.layer is not None:
            return f"{self.stack}.layers.{self.layer}.{self.role}.{self.param}"
        if self.stack is not None:
            return f"{self.stack}.{self.role}.{self.param}"
        return f"{self.role}.{self.param}"


def parse_name(name: str) -> CanonicalKey:
    """Parse a canonical name; ValueError when it is not one."""
    if m := _LAYER_RE.match(name):
        key = CanonicalKey(m[1], int(m[2]), m[3], m[4])
        if key.role in LAYER_ROLES:
            return key
    elif m := _STACK_RE.match(name):
        key = CanonicalKey(m[1], None, m[2], m[3])
        if key.role in STACK_ROLES:
            return key
    elif m := _MODEL_RE.match(name):
        key = CanonicalKey(None, None, m[1], m[2])
        if key.role in MODEL_ROLES:
            return key
    raise ValueError(f"{name!r} is not a canonical tensor name (see specs/families.md)")


def role_of(name: str) -> str:
    """The role of a canonical name: ``decoder.layers.0.attn_q.bias`` -> ``attn_q``."""
    return parse_name(name).role


def decimal(value: Any) -> str:
    """A number as a canonical decimal string: integers without a point, floats shortest."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number here")
    if isinstance(value, int):
        return str(value)
    as_float = float(value)
    if as_float.is_integer():
        return str(int(as_float))
    return repr(as_float)


ClassValue = str | bool


@dataclass
class CanonicalModel:
    """One model's tensors under canonical names, and what it takes to go back.

    Attributes:
        family: the family name (``llama``, ``t5``...).
        tensors: canonical name -> tensor.
        classes: role -> compatibility class (attribute -> value), for every role present.
        unmapped: native tensors the family does not map, carried back verbatim.
        ties: canonical names that are absent because they are tied to another one
            (``{"lm_head.weight": "embed.weight"}``).
        aliases: native name -> canonical name, for native copies of a tied tensor that the
            checkpoint holds twice (T5's ``encoder.embed_tokens.weight``).
        native_names: canonical name -> the native tensor it came from (several canonical
            names share one native name when that tensor is fused).
        prefix: the native prefix of the body (``model.``, ``transformer.``, or empty).
        layers: stack -> number of layers, from the config.
        config: the model's config.json.
    """

    family: str
    tensors: dict[str, Tensor]
    classes: dict[str, dict[str, ClassValue]]
    unmapped: dict[str, Tensor] = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    native_names: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    layers: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Tensor:
        """The tensor of ``name``, following a tie (``lm_head.weight`` of a tied model)."""
        if name in self.tensors:
            return self.tensors[name]
        if name in self.ties:
            return self.tensors[self.ties[name]]
        raise KeyError(name)

    def class_of(self, name: str) -> dict[str, ClassValue]:
        """The compatibility class of a canonical name's role."""
        return self.classes[role_of(name)]
