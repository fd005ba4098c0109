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
    write_gguf(base, tmp_path / "base.gguf", "f32")
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
    outs = []
    for k in range(2):
        folder = tmp_path / f"merged{k}"
        code, out = cli(capsys, "resolve", a, "--out", str(folder), "--format", "gguf",
                        "--gguf-type", "q8_0")
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
