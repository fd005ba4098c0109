"""``crdt-merge families list|check`` as the CLI package will call them."""

from __future__ import annotations

import json

import pytest

from crdt_merge.families import cli
from crdt_merge.families.family import Family


def test_list() -> None:
    code, payload = cli.run_families_cli(["list"])
    assert code == 0
    names = [f["family"] for f in payload["families"]]
    assert names == sorted(names) and "t5" in names
    gpt2 = next(f for f in payload["families"] if f["family"] == "gpt2")
    assert gpt2["ops"] == {
        "h.{i}.attn.c_attn.bias": "rows", "h.{i}.attn.c_attn.weight": "conv1d",
        "h.{i}.attn.c_proj.weight": "conv1d", "h.{i}.mlp.c_fc.weight": "conv1d",
        "h.{i}.mlp.c_proj.weight": "conv1d",
    }
    assert "gpt2" in cli.render(payload)


def test_check_json(tiny_models, capsys) -> None:
    folder = tiny_models.get("gpt_neox")
    assert cli.main(["check", str(folder), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["family"] == "gpt_neox"
    assert payload["round_trip"]["lossless"] is True
    assert payload["round_trip"]["max_abs_diff"] == 0.0
    entry = next(m for m in payload["mapping"]
                 if m["native"] == "gpt_neox.layers.0.attention.query_key_value.weight")
    assert entry["canonical"] == ["decoder.layers.0.attn_k.weight", "decoder.layers.0.attn_q.weight",
                                  "decoder.layers.0.attn_v.weight"]
    assert entry["shape"] == [[32, 32]] * 3
    assert payload["classes"]["attn_norm"]["parallel_residual"] is True


def test_check_text(tiny_models, capsys) -> None:
    assert cli.main(["check", str(tiny_models.get("opt"))]) == 0
    out = capsys.readouterr().out
    assert "family: opt" in out and "round trip: lossless" in out


def test_not_lossless_exits_1(tiny_models, monkeypatch) -> None:
    original = Family.from_canonical

    def lossy(self, model, config=None):
        native = original(self, model, config)
        native.pop(sorted(native)[0])
        first = sorted(native)[0]
        native[first] = native[first] + 1
        return native

    monkeypatch.setattr(Family, "from_canonical", lossy)
    code, payload = cli.run_families_cli(["check", str(tiny_models.get("llama"))])
    assert code == 1
    trip = payload["round_trip"]
    assert trip["lossless"] is False and len(trip["missing"]) == 1 and len(trip["changed"]) == 1
    assert trip["max_abs_diff"] == pytest.approx(1.0)
    assert "NOT lossless" in cli.render(payload)


def test_unknown_family_exits_2(tmp_path) -> None:
    from tests.fixtures.tiny_models import make_tiny

    folder = make_tiny("gpt2", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt3"
    (folder / "config.json").write_text(json.dumps(config))
    code, payload = cli.run_families_cli(["check", str(folder)])
    assert code == 2
    assert payload["error"]["code"] == "unknown_family"
    assert "gpt3" in payload["error"]["detail"]
    code, payload = cli.run_families_cli(["check", str(tmp_path / "absent")])
    assert code == 2 and payload["error"]["code"] == "bad_model"
