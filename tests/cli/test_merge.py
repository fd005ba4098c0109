"""``crdt-merge merge CONFIG OUT`` against ``mergekit-yaml`` on the same YAML, including
configs that carry parameters their method does not use (mergekit ignores them)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from crdt_merge.cli.main import main
from crdt_merge.cli.merge import TOKENIZER_FILES
from tests.fixtures.tiny_models import add_tokenizer, make_tiny
from tests.resolve.test_mergekit_yaml import MERGEKIT_YAML, needs_mergekit, tensors_of

TOLERANCE = 1e-6  # the parity tolerance of tests/methods/test_parity_mergekit.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-models")
    return {name: make_tiny("llama", root / name, seed=seed)
            for name, seed in (("base", 0), ("m1", 1), ("m2", 2))}


def configs(t: dict[str, Path]) -> dict[str, dict]:
    b, m1, m2 = str(t["base"]), str(t["m1"]), str(t["m2"])
    return {
        "ties": {"merge_method": "ties", "base_model": b, "dtype": "float32",
                 "models": [{"model": m1, "parameters": {"weight": 1.0, "density": 0.6}},
                            {"model": m2, "parameters": {"weight": 0.5, "density": 0.4}}],
                 "parameters": {"normalize": True}},
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": m1, "parameters": {"weight": 0.6}},
                              {"model": m2, "parameters": {"weight": 0.4}}]},
        # unused parameters: mergekit ignores them, so must we (and say so)
        "slerp_weight": {"merge_method": "slerp", "base_model": b, "dtype": "float32",
                         "models": [{"model": b}, {"model": m1, "parameters": {"weight": 0.7}}],
                         "parameters": {"t": 0.3}},
        "model_stock_weight": {"merge_method": "model_stock", "base_model": b, "dtype": "float32",
                               "models": [{"model": m1, "parameters": {"weight": 1.0}},
                                          {"model": m2, "parameters": {"weight": 0.5}}]},
        # karcher: the unlisted base is one more input, as in mergekit
        "karcher_weight": {"merge_method": "karcher", "base_model": b, "dtype": "float32",
                           "models": [{"model": m1, "parameters": {"weight": 1.0}},
                                      {"model": m2, "parameters": {"weight": 0.5}}]},
    }


def run(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(["--json", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else {}), out.err


@needs_mergekit
@pytest.mark.mergekit
@pytest.mark.parametrize("case", ["ties", "linear", "slerp_weight", "model_stock_weight",
                                  "karcher_weight"])
def test_merge_gives_mergekit_yamls_tensors(tiny, tmp_path, capsys, monkeypatch, case) -> None:
    monkeypatch.setenv("CRDT_MERGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / f"{case}.yml"
    config.write_text(yaml.safe_dump(configs(tiny)[case]))
    proc = subprocess.run([str(MERGEKIT_YAML), str(config), str(tmp_path / "mk"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, done, err = run(capsys, "merge", str(config), str(tmp_path / "ours"), "--workers", "1")
    assert code == 0, err
    ours, theirs = tensors_of(tmp_path / "ours"), tensors_of(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name in sorted(theirs):
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
        diff = (ours[name].double() - theirs[name].double()).abs().max().item()
        assert diff <= TOLERANCE, (case, name, diff)
    if case.endswith("_weight"):  # the unused weight is reported, once per model
        assert err.count("weight is not used by") == (1 if case == "slerp_weight" else 2)
        ignored = [d for d in done["decisions"] if d["decision"] == "params_ignored"]
        assert ignored and done["excluded"] == []
    # the checkpoint id is the one the replicated path resolves from the same ops, and the
    # one verify-folder recomputes from the files alone
    replica = done["replica"]
    code, again, _ = run(capsys, "resolve", replica, "--out", str(tmp_path / "replicated"))
    assert code == 0 and again["checkpoint_id"] == done["checkpoint_id"]
    code, folder, _ = run(capsys, "verify-folder", str(tmp_path / "ours"))
    assert code == 0 and json.dumps(folder).count(done["checkpoint_id"]) >= 1
    # a repeat is instant: nothing written, the same id
    code, repeat, _ = run(capsys, "merge", str(config), str(tmp_path / "ours"))
    assert code == 0 and repeat["reused"] and repeat["checkpoint_id"] == done["checkpoint_id"]


@needs_mergekit
@pytest.mark.mergekit
def test_the_written_mergekit_config_reproduces_the_merge(tiny, tmp_path, capsys,
                                                         monkeypatch) -> None:
    monkeypatch.setenv("CRDT_MERGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump(configs(tiny)["ties"]))
    assert run(capsys, "merge", str(config), str(tmp_path / "ours"))[0] == 0
    card = (tmp_path / "ours" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model_relation"] == "merge" and front["library_name"] == "transformers"
    # models given as local folders: named by their folder in the card, never by their
    # path, and not listed as base_model (the Hub takes repo ids only)
    assert "merge" in front["tags"] and "base_model" not in front
    assert "| m1 |" in card and "| m2 |" in card
    written = yaml.safe_load((tmp_path / "ours" / "mergekit_config.yml").read_text())
    assert written["merge_method"] == "ties"
    # point its names at the folders (as the file says) and run mergekit on it
    names = {"m1": str(tiny["m1"]), "m2": str(tiny["m2"])}
    for m in written["models"]:
        m["model"] = names[m["model"]]
    written["base_model"] = str(tiny["base"])
    again = tmp_path / "again.yml"
    again.write_text(yaml.safe_dump(written))
    proc = subprocess.run([str(MERGEKIT_YAML), str(again), str(tmp_path / "mk"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, theirs = tensors_of(tmp_path / "ours"), tensors_of(tmp_path / "mk")
    for name in sorted(theirs):
        assert (ours[name].double() - theirs[name].double()).abs().max().item() <= TOLERANCE


def test_merge_fails_on_an_exclusion_unless_told(tiny, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CRDT_MERGE_CACHE", str(tmp_path / "cache"))
    other = make_tiny("llama", tmp_path / "vocab", seed=3, vocab_size=160)
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(tiny["m1"]), "parameters": {"weight": 0.5}},
                      {"model": str(other), "parameters": {"weight": 0.5}}]}
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(cfg))
    code, _, err = run(capsys, "merge", str(config), str(tmp_path / "o"))
    assert code == 2 and "shape mismatch" in err and "--allow-exclusions" in err
    assert not (tmp_path / "o").exists()
    code, done, err = run(capsys, "merge", str(config), str(tmp_path / "o"), "--allow-exclusions")
    assert code == 0 and len(done["excluded"]) == 1 and "excluded" in err


def test_merge_options_of_mergekit(tiny, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CRDT_MERGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "linear.yml"
    config.write_text(yaml.safe_dump(configs(tiny)["linear"]))
    code = main(["merge", str(config), str(tmp_path / "o"), "--allow-crimes"])
    assert code == 2 and "cross_family" in capsys.readouterr().err
    code, done, err = run(capsys, "merge", str(config), str(tmp_path / "o"), "--cuda",
                          "--lazy-unpickle", "--no-copy-tokenizer", "--out-shard-size", "1K")
    assert code == 0 and "--cuda changes nothing" in err and "--lazy-unpickle" in err
    shards = sorted(p.name for p in (tmp_path / "o").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "o" / "model.safetensors.index.json").exists()
    assert not any((tmp_path / "o" / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))


TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def with_tokenizers(tmp_path_factory) -> dict[str, Path]:
    """Tiny models with real tokenizers: the base's differs from the donors' (so a copy
    taken from the wrong model shows)."""
    root = tmp_path_factory.mktemp("tokenizer-models")
    out = {name: make_tiny("llama", root / name, seed=seed)
           for name, seed in (("base", 0), ("m1", 1), ("m2", 2))}
    add_tokenizer(out["base"], "base")
    for name in ("m1", "m2"):
        add_tokenizer(out[name], "other")
    return out


def test_merge_copies_the_base_models_tokenizer_unless_told(with_tokenizers, tmp_path, capsys,
                                                            monkeypatch) -> None:
    import transformers

    monkeypatch.setenv("CRDT_MERGE_CACHE", str(tmp_path / "cache"))
    base = with_tokenizers["base"]
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump(configs(with_tokenizers)["ties"]))
    out = tmp_path / "out"
    code, _, err = run(capsys, "merge", str(config), str(out))
    assert code == 0, err
    for name in TOKENIZER:  # byte for byte the base model's
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    text = "the merge of quick foxes"
    ids = transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids == transformers.AutoTokenizer.from_pretrained(base)(text)["input_ids"]
    assert ids != transformers.AutoTokenizer.from_pretrained(with_tokenizers["m1"])(text)["input_ids"]

    bare = tmp_path / "bare"
    code, done, err = run(capsys, "merge", str(config), str(bare), "--no-copy-tokenizer")
    assert code == 0, err
    assert not any((bare / n).exists() for n in TOKENIZER)
    assert (bare / "config.json").exists() and (bare / "model.safetensors").exists()
    with pytest.raises((OSError, ValueError)):
        transformers.AutoTokenizer.from_pretrained(bare)
    # the tensors and the checkpoint id are the same either way
    assert tensors_of(bare).keys() == tensors_of(out).keys()
    assert all(torch.equal(tensors_of(bare)[k], tensors_of(out)[k]) for k in tensors_of(out))
    code, again, _ = run(capsys, "merge", str(config), str(bare))  # now with the tokenizer
    assert code == 0 and not again["reused"] and again["checkpoint_id"] == done["checkpoint_id"]
    assert all((bare / n).read_bytes() == (base / n).read_bytes() for n in TOKENIZER)


@needs_mergekit
@pytest.mark.mergekit
def test_merge_writes_the_tokenizer_files_mergekit_writes(with_tokenizers, tmp_path, capsys,
                                                          monkeypatch) -> None:
    """mergekit-yaml copies the base model's tokenizer files (tokenizer_config.json with
    tokenizer.json or tokenizer.model) unless --no-copy-tokenizer: the same files, the
    same bytes, here."""
    monkeypatch.setenv("CRDT_MERGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "ties.yml"
    config.write_text(yaml.safe_dump(configs(with_tokenizers)["ties"]))
    for flags in ([], ["--no-copy-tokenizer"]):
        tag = "no" if flags else "yes"
        mk, ours = tmp_path / f"mk-{tag}", tmp_path / f"ours-{tag}"
        proc = subprocess.run([str(MERGEKIT_YAML), str(config), str(mk), "--quiet", *flags],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert run(capsys, "merge", str(config), str(ours), *flags)[0] == 0
        theirs = {n for n in TOKENIZER_FILES if (mk / n).exists()}
        assert theirs == {n for n in TOKENIZER_FILES if (ours / n).exists()}
        # mergekit copies generation_config.json with the tokenizer (and not without)
        assert theirs == (set() if flags else {*TOKENIZER, "generation_config.json"})
        for name in theirs:
            assert (ours / name).read_bytes() == (mk / name).read_bytes(), name


@pytest.mark.parametrize("setting, named", [
    ({"tokenizer_source": "union"}, "tokenizer source 'union'"),
    ({"tokenizer_source": "m1"}, "tokenizer source 'm1'"),
    ({"tokenizer": {"source": "union"}}, "tokenizer source 'union'"),
    ({"tokenizer": {"source": "base", "pad_to_multiple_of": 64}}, "pad_to_multiple_of"),
    ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "base"}}}}, "tokens"),
    ({"chat_template": "chatml"}, "chat_template"),
])
def test_merge_refuses_tokenizer_settings_it_does_not_support(tiny, tmp_path, capsys, monkeypatch,
                                                              setting, named) -> None:
    monkeypatch.setenv("CRDT_MERGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({**configs(tiny)["ties"], **setting}))
    code = main(["merge", str(config), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "not supported" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_the_card_lists_hub_repo_ids_and_no_local_path(tiny, tmp_path, capsys,
                                                       monkeypatch) -> None:
    """A config naming models by Hugging Face repo id (found in the local hub cache, offline)
    gets those ids in the card's ``base_model`` (without a revision), and its
    mergekit_config.yml names them the same way; models given as local folders appear by
    folder name only. No absolute path of this machine is written anywhere in the output."""
    monkeypatch.setenv("CRDT_MERGE_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "hub"
    for repo, model in (("acme--tiny-m1", "m1"), ("acme--tiny-m2", "m2")):
        snap = hub / f"models--{repo}" / "snapshots" / ("ab" * 20)
        snap.parent.mkdir(parents=True)
        shutil.copytree(tiny[model], snap)
        (hub / f"models--{repo}" / "refs").mkdir()
        (hub / f"models--{repo}" / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"merge_method": "ties", "base_model": str(tiny["base"]), "dtype": "float32",
           "models": [{"model": "acme/tiny-m1", "parameters": {"weight": 1.0, "density": 0.6}},
                      {"model": "acme/tiny-m2@" + "ab" * 20,
                       "parameters": {"weight": 0.5, "density": 0.4}},
                      {"model": str(tiny["m2"]), "parameters": {"weight": 0.2, "density": 0.5}}]}
    config = tmp_path / "hub.yml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    code, _, err = run(capsys, "merge", str(config), str(out))
    assert code == 0, err
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["acme/tiny-m1", "acme/tiny-m2"]
    assert "| acme/tiny-m2@" + "ab" * 20 + " |" in card and "| m2 |" in card
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert sorted(m["model"] for m in written["models"]) == [  # canonical order: sort
        "acme/tiny-m1", "acme/tiny-m2@" + "ab" * 20, "m2"]
    for f in out.iterdir():
        if f.suffix != ".safetensors":
            text = f.read_bytes().decode("utf-8", "replace")
            assert str(tmp_path) not in text and str(Path.home()) + "/" not in text, f.name
    # the replicated path: `contribute` labels a repo id the same way by default
    replica = str(tmp_path / "r")
    assert main(["init", replica, "--site", "alpha"]) == 0
    capsys.readouterr()
    code, done, err = run(capsys, "contribute", replica, "acme/tiny-m1", "--weight", "1")
    assert code == 0, err
    code, status, _ = run(capsys, "status", replica)
    assert [c["label"] for c in status["contributions"]] == ["acme/tiny-m1"]
    code, done, err = run(capsys, "contribute", replica, str(tiny["m2"]), "--weight", "1")
    code, status, _ = run(capsys, "status", replica)
    assert sorted(c["label"] for c in status["contributions"]) == ["acme/tiny-m1", "m2"]


def test_merge_takes_mergekit_yamls_other_options(tiny, tmp_path, capsys, monkeypatch) -> None:
    """Every option of mergekit-yaml is known: honoured (--quiet, -j, --transformers-cache),
    accepted with a note (GPU, loader and writer options), or refused by name when it would
    change what is written; the replica's path is printed for status/resolve."""
    monkeypatch.setenv("CRDT_MERGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "linear.yml"
    config.write_text(yaml.safe_dump(configs(tiny)["linear"]))
    out = tmp_path / "o"
    code = main(["merge", str(config), str(out), "--quiet", "-j", "1", "--no-cuda",
                 "--low-cpu-memory", "--read-to-gpu", "--multi-gpu", "--gpu-rich",
                 "--async-write", "--write-threads", "2", "--clone-tensors",
                 "--trust-remote-code", "--device", "cpu", "-v", "--safe-serialization",
                 "--write-model-card", "--transformers-cache", str(tmp_path / "hub")])
    shown = capsys.readouterr()
    assert code == 0, shown.err
    for flag in ("--low-cpu-memory", "--gpu-rich", "--trust-remote-code", "--device", "-v"):
        assert f"warning: {flag} changes nothing" in shown.err, flag
    assert "--cuda changes" not in shown.err  # --no-cuda is mergekit's default: no note
    assert f"replica {tmp_path / 'cache'}" in shown.out and (out / "README.md").exists()
    for flags, named in ((["--no-write-model-card"], "--no-write-model-card"),
                         (["--no-safe-serialization"], "--no-safe-serialization"),
                         (["--random-seed", "7"], "--random-seed"),
                         (["--unsafe-truncate-embeddings"], "--unsafe-truncate-embeddings")):
        code = main(["merge", str(config), str(tmp_path / "refused"), *flags])
        err = capsys.readouterr().err
        assert code == 2 and f"{named} is not supported" in err, err
        assert not (tmp_path / "refused").exists()
