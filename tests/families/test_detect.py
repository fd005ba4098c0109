"""Detection, its refusals, the data files, the canonical names and the classes."""

from __future__ import annotations

import pytest

from crdt_merge.errors import CrdtMergeError, ModelImportError, error_for_code
from crdt_merge.families import (
    ROLE_ATTRIBUTES,
    CanonicalKey,
    UnknownFamily,
    check,
    detect,
    get_family,
    list_families,
    load_folder,
    parse_name,
)
from crdt_merge.families.registry import specs

LLAMA_NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight"]


def test_unknown_model_type_names_what_it_saw() -> None:
    config = {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"]}
    names = ["backbone.embeddings.weight", "backbone.layers.0.mixer.A_log"]
    with pytest.raises(UnknownFamily) as info:
        detect(config, names)
    err = info.value
    assert isinstance(err, ModelImportError) and isinstance(err, ValueError)
    assert err.code == "unknown_family"
    assert err.model_type == "mamba2"
    assert err.architectures == ["Mamba2ForCausalLM"]
    assert err.sample == sorted(names)
    for seen in ("mamba2", "Mamba2ForCausalLM", "backbone.layers.0.mixer.A_log", "llama"):
        assert seen in str(err)


def test_unknown_family_code_round_trips_once_imported() -> None:
    assert error_for_code("unknown_family") is UnknownFamily
    assert issubclass(UnknownFamily, CrdtMergeError)


def test_model_type_decides_and_architectures_must_agree() -> None:
    assert detect({"model_type": "llama"}, LLAMA_NAMES).name == "llama"
    assert detect({"architectures": ["MistralForCausalLM"]}, LLAMA_NAMES).name == "mistral"
    with pytest.raises(UnknownFamily, match="architectures say"):
        detect({"model_type": "llama", "architectures": ["Qwen2ForCausalLM"]}, LLAMA_NAMES)
    with pytest.raises(UnknownFamily, match="no model_type"):
        detect({"architectures": ["SomethingNew"]}, LLAMA_NAMES)
    with pytest.raises(UnknownFamily, match="no model_type"):
        detect({}, LLAMA_NAMES)


def test_a_known_model_type_with_foreign_tensors_is_refused() -> None:
    gpt2_names = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"]
    with pytest.raises(UnknownFamily, match="config.json says llama"):
        detect({"model_type": "llama"}, gpt2_names)
    # config alone (no names yet) is enough to pick a family
    assert detect({"model_type": "gpt2"}).name == "gpt2"


def test_unknown_family_from_a_folder(tmp_path) -> None:
    from tests.fixtures.tiny_models import make_tiny

    folder = make_tiny("llama", tmp_path / "m")
    text = (folder / "config.json").read_text().replace('"llama"', '"llama9"')
    (folder / "config.json").write_text(text)
    with pytest.raises(UnknownFamily, match="llama9"):
        check(folder)


def test_load_folder_refusals(tmp_path) -> None:
    with pytest.raises(ModelImportError, match="no config.json"):
        load_folder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelImportError, match="no \\*.safetensors"):
        load_folder(tmp_path)


def test_every_family_data_file_is_valid_and_distinct() -> None:
    families = list_families()
    assert [f.name for f in families] == sorted(specs())
    claimed = [t for f in families for t in f.spec.model_types]
    assert len(claimed) == len(set(claimed))
    for family in families:
        assert family.describe()["model_types"]
        assert get_family(family.name) is family
    with pytest.raises(UnknownFamily):
        get_family("nope")


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("embed.weight", CanonicalKey(None, None, "embed", "weight")),
        ("decoder.final_norm.bias", CanonicalKey("decoder", None, "final_norm", "bias")),
        ("encoder.layers.11.attn_q.weight", CanonicalKey("encoder", 11, "attn_q", "weight")),
    ],
)
def test_canonical_names_parse_and_print(name: str, key: CanonicalKey) -> None:
    assert parse_name(name) == key
    assert str(key) == name


@pytest.mark.parametrize(
    "bad", ["decoder.layers.01.attn_q.weight", "embed.gamma", "decoder.embed.weight",
            "layers.0.attn_q.weight", "decoder.layers.0.final_norm.weight", "decoder.layers.0.x.weight"],
)
def test_non_canonical_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_name(bad)


def test_classes_cover_exactly_the_role_attributes(tiny_models) -> None:
    report = check(tiny_models.get("t5"))
    for role, cls in report["classes"].items():
        assert tuple(cls) == ROLE_ATTRIBUTES[role]


def test_encoder_and_decoder_stacks_are_named_apart(tiny_models) -> None:
    report = check(tiny_models.get("t5"))
    canonical = {c for entry in report["mapping"] for c in entry["canonical"]}
    assert report["layers"] == {"encoder": 2, "decoder": 2}
    assert "encoder.layers.1.attn_q.weight" in canonical
    assert "decoder.layers.1.attn_q.weight" in canonical
    assert "decoder.layers.1.cross_q.weight" in canonical
    assert "encoder.layers.0.attn_rel_bias.weight" in canonical
    assert "encoder.layers.1.attn_rel_bias.weight" not in canonical
    assert {"encoder.final_norm.weight", "decoder.final_norm.weight"} <= canonical


def _attrs(family: str, config: dict) -> dict:
    return get_family(family).attributes(config)


def test_compatibility_classes_follow_the_config() -> None:
    gemma = _attrs("gemma", {"hidden_act": "gelu"})
    assert (gemma["norm"], gemma["embed_scale"], gemma["activation"]) == ("rmsnorm_1p", "sqrt_hidden", "gelu_tanh")
    assert _attrs("llama", {})["activation"] == "silu"
    assert _attrs("gemma2", {"head_dim": 8, "query_pre_attn_scalar": 16})["attn_scale"] == "inv_sqrt(16)"
    assert _attrs("gemma3", {"head_dim": 256, "query_pre_attn_scalar": 256})["attn_scale"] == "inv_sqrt_head_dim"
    assert _attrs("gemma2", {"attn_logit_softcapping": 50.0})["attn_softcap"] == "50"
    assert _attrs("opt", {"do_layer_norm_before": False})["norm_placement"] == "post"
    assert _attrs("opt", {})["norm_placement"] == "pre"
    neox = _attrs("gpt_neox", {"use_parallel_residual": False, "rotary_pct": 0.25})
    assert (neox["parallel_residual"], neox["rotary_fraction"]) == (False, "0.25")
    assert _attrs("phi", {"rope_parameters": {"partial_rotary_factor": 0.4}})["rotary_fraction"] == "0.4"
    granite = _attrs("granite", {"embedding_multiplier": 12.0, "logits_scaling": 8, "attention_multiplier": 0.015625})
    assert (granite["embed_scale"], granite["logit_scale"], granite["attn_scale"]) == ("12", "1/8", "0.015625")
    assert _attrs("granite", {})["logit_scale"] == "1"
    t5 = _attrs("t5", {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
    assert (t5["activation"], t5["gated"], t5["logit_scale"], t5["attn_scale"]) == ("gelu_tanh", True, "1", "1")
    assert _attrs("bert", {})["norm_placement"] == "post"
    with pytest.raises(ModelImportError, match="feed_forward_proj='gated-mish'"):
        _attrs("t5", {"feed_forward_proj": "gated-mish"})


def test_ties_are_recorded_only_for_models_with_a_head(tiny_models) -> None:
    assert check(tiny_models.variant("llama-tied"))["ties"] == {"lm_head.weight": "embed.weight"}
    assert check(tiny_models.variant("llama"))["ties"] == {}
    assert check(tiny_models.variant("bert-base"))["ties"] == {}
    bert = check(tiny_models.variant("bert"))
    assert bert["ties"] == {"lm_head.weight": "embed.weight"}
    assert bert["classes"]["lm_head"] == {"logit_scale": "1", "logit_softcap": "none"}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"body": {"x.w": "decoder.layers.0.attn_q.weight"}}, "must use \\{i\\} exactly"),
        ({"body": {"x.w": "decoder.layers.{i}.attn_q.weight"}}, "disagree on"),
        ({"body": {"x.w": {"op": "spin", "into": ["embed.weight"]}}}, "needs a string or an op"),
        ({"body": {"x.w": {"op": "rows", "sizes": [1], "into": ["embed.weight", "lm_head.weight"]}}},
         "one size per part"),
        ({"classes": {"activation": "silu", "gated": True, "norm": "rmsnorm"}}, "missing \\['position'\\]"),
        ({"classes": {"activation": "silu", "gated": True, "norm": "rmsnorm", "position": "rope",
                      "colour": "red"}}, "unknown \\['colour'\\]"),
        ({"lm_architectures": ["NotListed"]}, "lm_architectures must be among"),
        ({"requires": ["decoder.layers.{i}.attn_o.weight"]}, "requires"),
    ],
)
def test_malformed_family_data_is_refused(patch: dict, message: str) -> None:
    import json
    from importlib import resources

    from crdt_merge.families.registry import FamilyDataError, _resolve, _validate

    raw = json.loads(resources.files("crdt_merge.families").joinpath("data/llama.json").read_text())
    raw.update(patch)
    with pytest.raises(FamilyDataError, match=message):
        _validate(_resolve("llama", {"llama": raw}))
