"""The forms through the CLI: a GGUF file contributed and used as the anchor, a .bin folder
contributed, and `resolve --format gguf` writing a deterministic GGUF beside the folder
with its hash in merge_manifest.json."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import torch
from safetensors.numpy import load_file

from crdt_merge.cli.main import main
from crdt_merge.formats.gguf import write_gguf


def cli(capsys, *args: str) -> tuple[int, dict]:
    code = main(["--json", *args])
    captured = capsys.readouterr()
    out = captured.out if captured.out.strip() else captured.err
    return code, json.loads(out) if out.strip() else {}


def test_gguf_and_bin_in_gguf_out(tiny_models, tmp_path: Path, capsys) -> None:
    base = tiny_models.get("llama")
    ft = tiny_models.get("llama", seed=1)
    write_gguf(base, tmp_path / "base.gguf", "f32", tokenizer=False)
    # the fine-tune as a PyTorch checkpoint folder
    bin_dir = tmp_path / "ft-bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_bytes((ft / "config.json").read_bytes())
    torch.save({k: torch.from_numpy(v) for k, v in load_file(str(ft / "model.safetensors")).items()},
               bin_dir / "pytorch_model.bin")
    a = str(tmp_path / "a")
    assert cli(capsys, "init", a, "--site", "alpha", "--profile", "test")[0] == 0
    code, out = cli(capsys, "contribute", a, str(bin_dir), "--base", str(tmp_path / "base.gguf"),
                    "--weight", "1")
    assert code == 0, out
    code, out = cli(capsys, "recipe", a, "--method", "task_arithmetic",
                    "--anchor", str(tmp_path / "base.gguf"))
    assert code == 0, out
    # the tiny models have no tokenizer: refused by name, unless asked for on purpose
    code, out = cli(capsys, "resolve", a, "--out", str(tmp_path / "refused"), "--format", "gguf")
    assert code != 0 and "no tokenizer" in json.dumps(out) and "--gguf-no-tokenizer" in json.dumps(out)
    assert not Path(f"{tmp_path / 'refused'}.gguf").exists()
    outs = []
    for k in range(2):
        folder = tmp_path / f"merged{k}"
        code, out = cli(capsys, "resolve", a, "--out", str(folder), "--format", "gguf",
                        "--gguf-type", "q8_0", "--gguf-no-tokenizer")
        assert code == 0, out
        gguf = Path(f"{folder}.gguf")
        assert gguf.is_file() and out["gguf"]["file"] == gguf.name
        receipt = json.loads((folder / "merge_manifest.json").read_text())
        assert receipt["gguf"]["blake3"] == blake3.blake3(gguf.read_bytes()).hexdigest()
        assert receipt["checkpoint_id"] == out["checkpoint_id"]
        outs.append((out["checkpoint_id"], gguf.read_bytes()))
        code, check = cli(capsys, "verify-folder", str(folder))
        assert code == 0, check  # the GGUF beside the folder leaves its id intact
    assert outs[0] == outs[1]
    # task arithmetic with weight 1 over the GGUF base gives the fine-tune's tensors
    merged = load_file(str(tmp_path / "merged0" / "model.safetensors"))
    want = load_file(str(ft / "model.safetensors"))
    for name, t in want.items():
        assert merged[name].tobytes() == t.tobytes(), name


def test_contribute_an_adapter_through_the_cli(tiny_models, tmp_path: Path, capsys) -> None:
    from tests.formats.peft_helpers import make_adapter

    base = tiny_models.get("llama")
    good = make_adapter(base, tmp_path / "lora", 1, r=2, lora_alpha=4, target_modules=["q_proj"])
    dora = make_adapter(base, tmp_path / "dora", 1, r=2, lora_alpha=4, target_modules=["q_proj"],
                        use_dora=True)
    a = str(tmp_path / "a")
    assert cli(capsys, "init", a, "--site", "alpha", "--profile", "test")[0] == 0
    code, out = cli(capsys, "contribute", a, str(good))
    assert code != 0 and "--base" in json.dumps(out)
    code, out = cli(capsys, "contribute", a, str(dora), "--base", str(base))
    assert code != 0 and "DoRA" in json.dumps(out)
    code, out = cli(capsys, "contribute", a, str(good), "--base", str(base), "--weight", "1")
    assert code == 0, out
    code, status = cli(capsys, "status", a)
    assert code == 0 and '"adapter"' in json.dumps(status)
    code, out = cli(capsys, "recipe", a, "--method", "task_arithmetic", "--anchor", str(base))
    assert code == 0, out
    code, out = cli(capsys, "resolve", a, "--out", str(tmp_path / "m"))
    assert code == 0, out
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    plain = load_file(str(base / "model.safetensors"))
    assert not (merged["model.layers.0.self_attn.q_proj.weight"]
                == plain["model.layers.0.self_attn.q_proj.weight"]).all()
    assert (merged["model.layers.0.self_attn.k_proj.weight"]
            == plain["model.layers.0.self_attn.k_proj.weight"]).all()


def test_gguf_from_a_pinned_plan_is_the_same_on_two_replicas(tiny_models, tmp_path: Path,
                                                              capsys) -> None:
    """`resolve --plan MERGE_MANIFEST --format gguf` on two replicas, after the state moved
    on: both write the recorded plan's GGUF (with its SentencePiece tokenizer), byte for
    byte, and record the same hash in their merge_manifest.json."""
    import shutil

    from crdt_merge.replica import Replica
    from crdt_merge.store.importer import import_model
    from crdt_merge.sync import LocalPeer, sync
    from tests.formats.test_gguf_tokenizer import _train

    base = tmp_path / "base"
    shutil.copytree(tiny_models.get("llama", vocab_size=320), base)
    (base / "tokenizer.model").write_bytes(_train())
    a = Replica.create(tmp_path / "a", site="alpha", profile="test")
    b = Replica.join(tmp_path / "b", site="beta", genesis=a.genesis_bytes())
    a.admit("beta", b.public_key)
    base_id = import_model(a.store, str(base), a.piece_size).manifest_id
    for seed in (1, 2):
        ft = import_model(a.store, str(tiny_models.get("llama", seed=seed, vocab_size=320)),
                          a.piece_size)
        a.contribute(ft.manifest_id, base=base_id, params={"weight": "1"}, label=f"ft{seed}")
        if seed == 1:
            a.set_recipe("task_arithmetic", {"lambda": "0.5"}, anchor=base_id)
            a.close()
            code, first = cli(capsys, "resolve", str(tmp_path / "a"), "--out",
                              str(tmp_path / "first"), "--format", "gguf")
            assert code == 0, first
            assert first["gguf"]["tokenizer"] == "llama"
            a = Replica.open(tmp_path / "a")
    sync(b, LocalPeer(a))  # beta holds everything; the current plan has both fine-tunes
    a.close()
    b.close()
    pinned = str(tmp_path / "first" / "merge_manifest.json")
    records = []
    for site in ("a", "b"):
        out = tmp_path / f"pinned-{site}"
        code, got = cli(capsys, "resolve", str(tmp_path / site), "--plan", pinned, "--out",
                        str(out), "--format", "gguf")
        assert code == 0, got
        receipt = json.loads((out / "merge_manifest.json").read_text())
        assert receipt["plan_id"] == first["plan_id"] and receipt["gguf"] == got["gguf"]
        assert receipt["gguf"]["blake3"] == blake3.blake3(Path(f"{out}.gguf").read_bytes()).hexdigest()
        records.append(receipt["gguf"])
    want = json.loads(Path(pinned).read_text())["gguf"]
    for record in records:
        assert {k: v for k, v in record.items() if k != "file"} == \
               {k: v for k, v in want.items() if k != "file"}
    assert Path(f"{tmp_path / 'pinned-a'}.gguf").read_bytes() == \
        Path(f"{tmp_path / 'pinned-b'}.gguf").read_bytes() == Path(f"{tmp_path / 'first'}.gguf").read_bytes()
    code, now = cli(capsys, "resolve", str(tmp_path / "b"), "--out", str(tmp_path / "now"),
                    "--format", "gguf")
    assert code == 0 and now["plan_id"] != first["plan_id"]
    assert now["gguf"]["blake3"] != want["blake3"]  # the state moved on; the pin did not
