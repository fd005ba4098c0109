"""The cross-family transfer (crdt_merge/transfer.py, specs/cross-family.md section 7).

The known-answer case is a rotated twin (tests/fixtures/twin.py): the same function as a
tiny Llama in other coordinates (rotated residual stream, permuted neurons and heads,
norm gains folded). A fine-tune made in the twin's coordinates, carried to the original by
the transfer, must be the same fine-tune expressed in the original's coordinates; the
expected update is computed here from the weights (not by the code under test)."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from crdt_merge import transfer as tr
from crdt_merge.errors import BadParameter
from tests.fixtures.tiny_models import build
from tests.fixtures.twin import Twin

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:'-\n"))


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (fast, with offsets)."""
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def pair_tokenizer() -> PreTrainedTokenizerFast:
    """Characters plus a few two-letter merges: its tokens end elsewhere than the char
    tokenizer's inside words, but both end every word."""
    merges = [("a", "b"), ("c", "d"), ("e", "f"), ("1", "2")]
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def calibration(words: int = 900, seed: int = 0) -> str:
    rnd = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return " ".join("".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 6)))
                    for _ in range(words))


def fine_tuned(base: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A synthetic fine-tune: every projection moved, every layer norm's gain changed."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "proj" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
            if "layernorm" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
    return ft


@pytest.fixture(scope="module")
def twin_case():
    base = build("llama", seed=0).eval()
    ft = fine_tuned(base)
    twin = Twin(base.config, seed=3)
    twin_base, twin_ft = copy.deepcopy(base), copy.deepcopy(ft)
    twin.apply(twin_base)
    twin.apply(twin_ft)
    return base, ft, twin_base, twin_ft


def expected_update(base, ft, name: str) -> torch.Tensor:
    """The fine-tune's change of a matrix, with the change of the norm gain it reads folded
    in (the twin has unit gains, so a gain change arrives as a matrix change)."""
    b = {n: p.detach() for n, p in base.named_parameters()}
    f = {n: p.detach() for n, p in ft.named_parameters()}
    if "o_proj" in name or "down_proj" in name:
        return (f[name] - b[name]).double()
    layer = name.split(".")[2]
    norm = "input_layernorm" if "self_attn" in name else "post_attention_layernorm"
    gb = b[f"model.layers.{layer}.{norm}.weight"].double()
    gf = f[f"model.layers.{layer}.{norm}.weight"].double()
    return f[name].double() * (gf / gb) - b[name].double()


def logits(model, text: str) -> torch.Tensor:
    ids = char_tokenizer()(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def applied(base, deltas: dict[str, torch.Tensor]):
    out = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name in deltas:
                p.add_(deltas[name])
    return out


def gap_left(base, ft, merged, text: str) -> float:
    """||logits(merged) - logits(ft)|| / ||logits(base) - logits(ft)||: 0 is the fine-tune
    itself, 1 is no transfer at all."""
    lf = logits(ft, text)
    return float((logits(merged, text) - lf).norm() / (logits(base, text) - lf).norm())


PARAMS = dict(window_chars=60, ridge=1e-8, align_ridge=1e-8)
PROBE = "qz7 mx 4k bb9 t0 wle3 8u"


def test_the_twin_computes_the_same_logits(twin_case):
    base, ft, twin_base, twin_ft = twin_case
    for original, twin in ((base, twin_base), (ft, twin_ft)):
        a, b = logits(original, PROBE), logits(twin, PROBE)
        assert float((a - b).abs().max()) < 1e-5 * float(a.abs().max())
    # and shares no coordinate with it
    w, t = base.model.layers[0].mlp.up_proj.weight, twin_base.model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(w, t, atol=1e-3)


def test_direct_transfer_recovers_the_twins_fine_tune(twin_case):
    base, ft, twin_base, twin_ft = twin_case
    tok = char_tokenizer()
    result = tr.transfer(twin_base, twin_ft, base, tok, tok, calibration(),
                         tr.TransferParams(**PARAMS))
    assert len(result.deltas) == 2 * 7
    for name, delta in result.deltas.items():
        want = expected_update(base, ft, name)
        assert float((delta.double() - want).norm() / want.norm()) < 1e-2, name
    assert gap_left(base, ft, applied(base, result.deltas), PROBE) < 1e-2


def test_a_random_alignment_recovers_nothing(twin_case):
    base, ft, twin_base, twin_ft = twin_case
    tok = char_tokenizer()
    result = tr.transfer(twin_base, twin_ft, base, tok, tok, calibration(400),
                         tr.TransferParams(**PARAMS, control="random"))
    assert gap_left(base, ft, applied(base, result.deltas), PROBE) > 0.9


def test_local_mode_fits_the_writers_toward_the_fine_tune(twin_case):
    base, ft, twin_base, twin_ft = twin_case
    tok = char_tokenizer()
    result = tr.transfer(twin_base, twin_ft, base, tok, tok, calibration(600),
                         tr.TransferParams(**PARAMS, mode="local"))
    assert sorted({n.split(".")[-2] for n in result.deltas}) == ["down_proj", "o_proj"]
    left = gap_left(base, ft, applied(base, result.deltas), PROBE)
    assert 0.02 < left < 0.8  # writers alone close part of the gap, not all of it


def test_top_k_and_trust_region_bound_each_update(twin_case):
    base, ft, twin_base, twin_ft = twin_case
    tok = char_tokenizer()
    result = tr.transfer(twin_base, twin_ft, base, tok, tok, calibration(300),
                         tr.TransferParams(**PARAMS, top_k=2, tau=0.01))
    weights = {n: p.detach() for n, p in base.named_parameters()}
    for name, delta in result.deltas.items():
        sv = torch.linalg.svdvals(delta.double())
        assert int((sv > 1e-6 * sv[0]).sum()) <= 2, name
        assert float(delta.double().norm()) <= 0.01 * float(weights[name].double().norm()) * (
            1 + 1e-6), name


def test_across_families_the_update_has_the_anchors_shapes():
    donor_base = build("llama", seed=0).eval()
    donor = fine_tuned(donor_base)
    anchor = build("gemma3", seed=5).eval()
    result = tr.transfer(donor_base, donor, anchor, char_tokenizer(), pair_tokenizer(),
                         calibration(300), tr.TransferParams(window_chars=60))
    weights = {n: p.detach() for n, p in anchor.named_parameters()}
    assert sorted(result.deltas) == sorted(
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in tr.ROLE_MODULES.values())
    for name, delta in result.deltas.items():
        assert delta.shape == weights[name].shape and bool(torch.isfinite(delta).all())
        assert float(delta.norm()) > 0


@pytest.mark.parametrize("extra", [{}, {"mode": "local"}, {"control": "random"}],
                         ids=["direct", "local", "random"])
def test_chunked_layers_give_the_same_update_and_skip_the_rest_of_the_pass(extra):
    donor_base = build("llama", seed=0, num_hidden_layers=5).eval()
    donor = fine_tuned(donor_base)
    anchor = build("gemma3", seed=5, num_hidden_layers=3,
                   layer_types=["full_attention"] * 3).eval()
    heads = []  # the vocabulary projection never runs: each pass stops after its last layer
    for model in (donor_base, donor, anchor):
        heads.append(model.lm_head.register_forward_hook(lambda *_: heads.append("ran")))
    args = (donor_base, donor, anchor, char_tokenizer(), pair_tokenizer(), calibration(200))
    params = dict(window_chars=60, **extra)
    whole = tr.transfer(*args, tr.TransferParams(**params))
    seen = []
    chunked = tr.transfer(*args, tr.TransferParams(**params, chunk_layers=2),
                          progress=lambda i, n: seen.append((i, n)))
    assert "ran" not in heads
    assert sorted(whole.deltas) == sorted(chunked.deltas) and whole.deltas
    for name, delta in whole.deltas.items():
        assert torch.equal(delta, chunked.deltas[name]), name
    assert whole.positions == chunked.positions > 0
    # progress runs once to the end, never backwards
    assert seen[-1][0] == seen[-1][1] and [i for i, _ in seen] == sorted(i for i, _ in seen)


def test_matched_positions_are_the_word_ends_both_tokenizations_end():
    text = "ab cd-ef 12x"
    # donor: one token per character; anchor: "ab", " ", "cd", "-", "ef", " ", "12", "x"
    donor = [(i, i + 1) for i in range(len(text))]
    anchor = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 9), (9, 11), (11, 12)]
    assert tr.word_ends(text) == [2, 5, 8, 12]
    assert tr.matched_positions(text, [(0, 0)] + donor, [(0, 0)] + anchor) == (
        [2, 5, 8, 12], [1, 3, 5, 8])
    # a word end inside the other tokenizer's token is not a match
    assert tr.matched_positions("abc d", [(0, 3), (3, 4), (4, 5)], [(0, 2), (2, 4), (4, 5)]) \
        == ([2], [2])


def test_the_depth_map_matches_relative_depth():
    rep, bucket = tr.depth_map(30, 18)
    assert rep[0] == 0 and rep[17] == 29 and rep[9] == 15  # 9 * 29 / 17 = 15.35
    assert sorted(m for ms in bucket.values() for m in ms) == list(range(30))
    assert bucket[0] == [0] and bucket[1] == [1, 2] and bucket[17] == [29]  # round(m 17 / 29)
    rep, bucket = tr.depth_map(2, 4)
    assert rep == {0: 0, 1: 0, 2: 1, 3: 1} and bucket == {0: [0], 1: [], 2: [], 3: [1]}


@pytest.mark.parametrize("bad", [dict(ridge=0.0), dict(tau=-1.0), dict(mode="global"),
                                 dict(control="shuffle"), dict(roles=("attn_x",)),
                                 dict(top_k=-1), dict(roles=())])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(BadParameter):
        tr.TransferParams(**bad).check()


def test_text_without_a_shared_word_end_is_refused(twin_case):
    base, _, twin_base, twin_ft = twin_case
    with pytest.raises(BadParameter, match="no position"):
        tr.transfer(twin_base, twin_ft, base, char_tokenizer(), char_tokenizer(), "   ...  ",
                    tr.TransferParams(window_chars=60))


# -- the command: an ordinary signed delta, with its provenance, resolved alike everywhere --


def _cli(capsys, *args: str) -> tuple[int, dict]:
    from crdt_merge.cli.main import main

    code = main(["--json", *args])
    captured = capsys.readouterr()
    out = captured.out if captured.out.strip() else captured.err
    return code, json.loads(out) if out.strip() else {}


def test_the_transfer_command_contributes_a_delta_every_replica_resolves_alike(tmp_path,
                                                                                capsys):
    import blake3

    donor_base = build("llama", seed=0).eval()
    donor = fine_tuned(donor_base)
    anchor = build("gemma3", seed=5).eval()
    folders = {}
    for name, model, tok in (("donor-base", donor_base, char_tokenizer()),
                             ("donor", donor, char_tokenizer()),
                             ("anchor", anchor, pair_tokenizer())):
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    text = calibration(300).encode()
    (tmp_path / "calib.txt").write_bytes(text)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert _cli(capsys, "init", a, "--site", "alpha", "--profile", "test")[0] == 0
    code, out = _cli(capsys, "transfer", a, "--donor-base", str(folders["donor-base"]),
                     "--donor", str(folders["donor"]), "--anchor", str(folders["anchor"]),
                     "--calibration", str(tmp_path / "calib.txt"), "--window-chars", "60")
    assert code == 0, out
    prov = out["provenance"]
    assert prov["calibration_blake3"] == blake3.blake3(text).hexdigest()
    assert prov["calibration_bytes"] == len(text) and prov["engine"] == tr.ENGINE
    assert prov["anchor"] == out["base"] and out["changed_tensors"] == 2 * 7
    assert len({prov["donor_base"], prov["donor"], prov["anchor"]}) == 3
    code, _ = _cli(capsys, "recipe", a, "--method", "task_arithmetic", "--param", "lambda=1",
                   "--anchor", str(folders["anchor"]))
    assert code == 0
    code, joined = _cli(capsys, "init", b, "--site", "beta", "--join", a)
    assert code == 0
    ra = _cli(capsys, "resolve", a, "--out", str(tmp_path / "oa"), "--workers", "1")[1]
    rb = _cli(capsys, "resolve", b, "--out", str(tmp_path / "ob"), "--workers", "2")[1]
    assert ra["checkpoint_id"] == rb["checkpoint_id"]
    # the stored delta resolves alike under other CPU kernels and thread counts too (the
    # activation step ran once, at the contributing site; resolve is the usual path)
    for i, (where, env, workers) in enumerate((
            (b, {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}, 1),
            (a, {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"}, 2))):
        proc = subprocess.run([sys.executable, "-m", "crdt_merge", "--json", "resolve", where,
                               "--out", str(tmp_path / f"kernel{i}"), "--workers", str(workers)],
                              capture_output=True, text=True, env=dict(os.environ, **env),
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["checkpoint_id"] == ra["checkpoint_id"], env
    # the output is the anchor plus the update, in the anchor's family
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "oa" / "model.safetensors"))
    weights = {n: p.detach() for n, p in anchor.named_parameters()}
    name = "model.layers.1.mlp.down_proj.weight"
    assert merged[name].shape == weights[name].shape
    assert not torch.equal(merged[name], weights[name])
    assert torch.equal(merged["model.layers.0.input_layernorm.weight"],
                       weights["model.layers.0.input_layernorm.weight"])
    # the op carries the provenance (replicas see where the delta came from)
    ops = {op_id: op for op_id, op in _ops(b).items() if op.kind == "contribute"}
    (op,) = ops.values()
    assert op.body["provenance"]["calibration_blake3"] == prov["calibration_blake3"]
    # ... and the plan and the model card say where the delta came from, on every replica
    code, planned = _cli(capsys, "plan", b)
    assert code == 0
    (shown,) = [d for d in planned["decisions"] if d["decision"] == "provenance"]
    assert shown["op_id"] == op.id
    assert f"calibration_blake3 {prov['calibration_blake3'][:16]}" in shown["detail"]
    assert f"donor {prov['donor'][:16]}" in shown["detail"]
    assert "engine \"transfer/1\"" in shown["detail"]
    card_a = (tmp_path / "oa" / "README.md").read_text()
    assert card_a == (tmp_path / "ob" / "README.md").read_text()
    assert f"- provenance: `{op.id[:16]}` {shown['detail']}" in card_a


def test_provenance_is_one_bounded_line_whatever_its_author_puts_in_it():
    from crdt_merge.resolve.merge_plan import provenance_text

    hostile = {"engine": "x\n## Injected heading", "zz": "y" * 5000, "donor": "a" * 64,
               "aa": [1, 2]}
    text = provenance_text(hostile)
    assert "\n" not in text and len(text) <= 600 and text.endswith("...")
    # known keys first in the spec's order, then the rest sorted; ids shortened
    assert text.index("engine") < text.index("donor ") < text.index("aa ") < text.index("zz ")
    assert "donor aaaaaaaaaaaaaaaa," in text and '"x\\n## Injected heading"' in text


def _ops(path: str) -> dict:
    from crdt_merge.replica import Replica

    with Replica.open(path) as r:
        return dict(r.ops())


def test_the_transfer_command_refuses_a_bad_calibration_file(tmp_path, capsys):
    a = str(tmp_path / "a")
    assert _cli(capsys, "init", a, "--site", "alpha", "--profile", "test")[0] == 0
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    code, err = _cli(capsys, "transfer", a, "--donor-base", str(tmp_path), "--donor",
                     str(tmp_path), "--anchor", str(tmp_path), "--calibration",
                     str(tmp_path / "bad.txt"))
    assert code == 2 and err["error"] == "bad_parameter" and "utf-8" in err["detail"]
