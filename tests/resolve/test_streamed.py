"""Elementwise methods stream each tensor piece by piece from the store: the checkpoint is
byte for byte the one the whole-tensor path computes (which the float64 reference tests of
test_resolve.py check), for mixed input dtypes, delta contributions, tensors of many pieces
and a last piece cut short, and when a model's pieces are not cut at the profile's size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crdt_merge.replica import Replica
from crdt_merge.resolve import io, resolve, runner
from crdt_merge.store.importer import import_model
from tests.resolve.conftest import write_model

# test profile: 4096-byte pieces, so a chunk is 512 elements; these cross many pieces and
# end inside one
SHAPES = {"model.layers.0.mlp.up_proj.weight": (300, 41), "model.layers.1.mlp.up_proj.weight":
          (1031,), "model.norm.weight": (16,), "model.embed_tokens.weight": (97, 64)}


def _tensors(seed: int, dtype: torch.dtype, scale: float = 1.0,
             base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        out[name] = (t if base is None else base[name].to(torch.float64) + t).to(dtype)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _both_ways(replica: Replica, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               workers: int = 2) -> tuple[int, int]:
    """Resolve streamed, then with streaming off; assert equal ids and bytes. Returns how
    many jobs streamed and how many fell back to whole tensors."""
    calls = {"streamed": 0, "fallback": 0}
    real = runner.stream_merge

    def spy(*args, **kwargs):
        try:
            out = real(*args, **kwargs)
        except io.Unaligned:
            calls["fallback"] += 1
            raise
        calls["streamed"] += 1
        return out

    monkeypatch.setattr(runner, "stream_merge", spy)
    streamed = resolve(replica, tmp_path / "streamed", workers=workers)
    monkeypatch.setattr(runner, "streamable", lambda *a: False)
    whole = resolve(replica, tmp_path / "whole", workers=workers)
    assert streamed.checkpoint_id == whole.checkpoint_id
    assert _files(streamed.out) == _files(whole.out)
    return calls["streamed"], calls["fallback"]


def test_linear_of_mixed_dtypes_streams_the_bytes_of_the_whole(replicas, tmp_path: Path,
                                                              monkeypatch) -> None:
    a = replicas[0]
    base = _tensors(0, torch.float32)
    for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):
        folder = write_model(tmp_path / f"ft{i}", _tensors(10 + i, dtype, 0.05, base))
        donor = import_model(a.store, str(folder), a.piece_size)
        a.contribute(donor.manifest_id, params={"weight": ["0.5", "0.3", "-0.1"][i]})
    a.set_recipe("linear", {"normalize": True})
    streamed, fallback = _both_ways(a, tmp_path, monkeypatch)
    assert (streamed, fallback) == (len(SHAPES), 0)


def test_task_arithmetic_with_a_delta_streams_the_bytes_of_the_whole(replicas, tmp_path: Path,
                                                                     monkeypatch) -> None:
    a = replicas[0]
    base_t = _tensors(0, torch.bfloat16)
    anchor = import_model(a.store, str(write_model(tmp_path / "base", base_t)), a.piece_size)
    full = write_model(tmp_path / "full", _tensors(1, torch.bfloat16, 0.05, base_t))
    delta = write_model(tmp_path / "delta", _tensors(2, torch.float32, 0.05))
    a.contribute(import_model(a.store, str(full), a.piece_size).manifest_id,
                 params={"weight": "0.7"})
    a.contribute(import_model(a.store, str(delta), a.piece_size).manifest_id, form="delta",
                 base=anchor.manifest_id, params={"weight": "0.4"})
    a.set_recipe("task_arithmetic", {"lambda": "0.8"}, anchor=anchor.manifest_id)
    streamed, fallback = _both_ways(a, tmp_path, monkeypatch, workers=1)
    assert (streamed, fallback) == (len(SHAPES), 0)


def test_pieces_cut_at_another_size_fall_back_to_whole_tensors(replicas, tmp_path: Path,
                                                               monkeypatch) -> None:
    a = replicas[0]
    base = _tensors(0, torch.float32)
    for i, piece_size in enumerate((a.piece_size, 1000)):  # 1000: not the profile's size
        folder = write_model(tmp_path / f"ft{i}", _tensors(10 + i, torch.float32, 0.05, base))
        donor = import_model(a.store, str(folder), piece_size)
        a.contribute(donor.manifest_id, params={"weight": "0.5"})
    a.set_recipe("linear", {})
    streamed, fallback = _both_ways(a, tmp_path, monkeypatch)
    # tensors of one piece stream whatever the cut; the others fall back
    small = sum(1 for shape in SHAPES.values() if torch.Size(shape).numel() * 4 <= 1000)
    assert (streamed, fallback) == (small, len(SHAPES) - small)


def test_a_corrupt_piece_met_while_streaming_is_reported_and_quarantined(
        replicas, tmp_path: Path) -> None:
    from crdt_merge.errors import PieceCorrupt

    a = replicas[0]
    folder = write_model(tmp_path / "ft", _tensors(3, torch.float32))
    donor = import_model(a.store, str(folder), a.piece_size)
    a.contribute(donor.manifest_id, params={"weight": "1"})
    a.set_recipe("linear", {})
    record = donor.manifest.tensors["model.layers.0.mlp.up_proj.weight"]
    victim = record.pieces[5]  # deep inside the tensor: read only when the chunks reach it
    path = a.store.files.path(victim)
    data = bytearray(path.read_bytes())
    data[7] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(PieceCorrupt):
        resolve(a, tmp_path / "out", workers=1)
    assert not path.exists()
    assert not (tmp_path / "out").exists()
    assert victim in a.store.index.wanted()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_the_cli_resolves_an_elementwise_merge_without_importing_torch(
        replicas, tmp_path: Path, method: str) -> None:
    """Importing torch costs over a second; linear and task arithmetic never need it (the
    ``-X importtime`` report lists every module the resolve imported)."""
    import subprocess
    import sys

    a = replicas[0]
    base = _tensors(0, torch.bfloat16)
    anchor = import_model(a.store, str(write_model(tmp_path / "base", base)), a.piece_size)
    for i in range(2):
        folder = write_model(tmp_path / f"ft{i}", _tensors(10 + i, torch.bfloat16, 0.05, base))
        donor = import_model(a.store, str(folder), a.piece_size)
        a.contribute(donor.manifest_id, params={"weight": "0.5"})
    a.set_recipe(method, {}, anchor=anchor.manifest_id)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "crdt_merge", "--json", "resolve",
         str(tmp_path / "a"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "crdt_merge.resolve.runner" in imported  # the report is read right
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_piece_buffers_go_when_resolve_ends(replicas, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The calling thread streams jobs itself with one worker: its reused piece buffers
    must not outlive the resolve (a server resolving now and then would hold them)."""
    a = replicas[0]
    folder = write_model(tmp_path / "ft", _tensors(4, torch.float32))
    a.contribute(import_model(a.store, str(folder), a.piece_size).manifest_id,
                 params={"weight": "1"})
    a.set_recipe("linear", {})
    held = []
    real = runner.scratch

    def spy(count: int, nbytes: int):
        bufs = real(count, nbytes)
        held.append(io.scratch_held())
        return bufs

    monkeypatch.setattr(runner, "scratch", spy)
    resolve(a, tmp_path / "out", workers=1)
    assert held and max(held) >= 2  # buffers were used ...
    assert io.scratch_held() == 0  # ... and let go


def test_a_float8_tensor_is_refused_not_copied(replicas, tmp_path: Path) -> None:
    """Tensors that are not merged (integer buffers) are copied from the base; a float8
    tensor is neither merged nor copied silently: resolve names its dtype."""
    from crdt_merge.errors import ShapeMismatch

    a = replicas[0]
    ts = _tensors(5, torch.float32)
    ts["model.scales"] = torch.ones(8).to(torch.float8_e4m3fn)
    folder = write_model(tmp_path / "ft", ts)
    a.contribute(import_model(a.store, str(folder), a.piece_size).manifest_id,
                 params={"weight": "1"})
    a.set_recipe("linear", {})
    with pytest.raises(ShapeMismatch, match="F8_E4M3 is not supported"):
        resolve(a, tmp_path / "out", workers=1)
