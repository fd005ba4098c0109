"""DARE/DELLA masks are keyed by the contribution's op id (specs/methods.md section 4): the
key formula is pinned by a vector, a resolve draws exactly the masks an independent
computation of that formula gives, and two donors with equal deltas get different masks."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import numpy as np
import torch
from safetensors.torch import load_file

from crdt_merge.replica import Replica
from crdt_merge.resolve import resolve
from crdt_merge.resolve.runner import stream_key
from tests.resolve.conftest import SHAPES, write_model
from tests.resolve.test_resolve import anchor, contribute

NAME = "model.layers.0.mlp.up_proj.weight"


def test_the_stream_key_vector() -> None:
    assert stream_key("my-seed", NAME, "ab" * 32).hex() == \
        "f10298d51c468d69820701c887ffd63ddd5e12555e4ada75de7d00f8a5750312"


def key(seed: str, name: str, op_id: str) -> bytes:  # the spec's formula, written again
    return blake3.blake3(b"crdt-merge/rng/v1\x00" + seed.encode() + b"\x00" + name.encode()
                         + b"\x00" + bytes.fromhex(op_id)).digest()


def uniforms(k: bytes, n: int) -> np.ndarray:
    raw = blake3.blake3(b"crdt-merge/methods/uniform32/v1\x00" + k).digest(length=4 * n)
    return np.frombuffer(raw, dtype="<u4").astype(np.float64) / 2.0**32


def dyadic(seed: int, scale: float) -> dict[str, torch.Tensor]:
    """Small multiples of 1/8: every sum below is exact in float32."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randint(-8, 9, s, generator=gen) * scale).to(torch.float32)
            for n, s in SHAPES.items()}


def test_a_resolve_draws_the_masks_of_the_spec(tmp_path: Path) -> None:
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    base_t = dyadic(1, 0.125)
    delta = {0: dyadic(2, 0.25), 1: dyadic(3, 0.5)}
    base = write_model(tmp_path / "base", base_t)
    ops = [contribute(r, write_model(tmp_path / f"ft{i}", {n: base_t[n] + delta[i][n]
                                                            for n in SHAPES}),
                      base=base, weight="1", density="0.5") for i in (0, 1)]
    r.set_recipe("dare_linear", {"rescale": False}, anchor=anchor(r, base))
    result = resolve(r, tmp_path / "out", workers=1)
    out = load_file(str(result.out / "model.safetensors"))
    plan_id = json.loads((result.out / "merge_manifest.json").read_text())["plan_id"]
    by_op = dict(zip((o.id for o in ops), (0, 1), strict=True))
    masks_differ = False
    for name in SHAPES:
        expect = base_t[name].to(torch.float64).numpy().ravel().copy()
        masks = []
        for op_id in sorted(by_op):  # canonical order: ascending op id
            d = delta[by_op[op_id]][name].to(torch.float64).numpy().ravel()
            keep = uniforms(key(plan_id, name, op_id), d.size) < 0.5
            masks.append(keep)
            expect += np.where(keep, d, 0.0)
        masks_differ |= bool((masks[0] != masks[1]).any())
        np.testing.assert_array_equal(out[name].numpy().ravel(), expect.astype(np.float32),
                                      err_msg=name)
    assert masks_differ
    r.close()


def test_two_donors_with_equal_deltas_get_different_masks(tmp_path: Path) -> None:
    """With one delta given twice, equal masks would keep or drop each entry for both."""
    r = Replica.create(tmp_path / "r", site="alpha", profile="test")
    base_t = dyadic(1, 0.125)
    base = write_model(tmp_path / "base", base_t)
    donor = {n: base_t[n] + 1.0 for n in SHAPES}  # delta 1 everywhere
    for i in (0, 1):
        contribute(r, write_model(tmp_path / f"ft{i}", donor), base=base, weight="1",
                   density="0.5")
    for method in ("dare_linear", "della_linear"):
        r.set_recipe(method, {"rescale": False}, anchor=anchor(r, base))
        out = load_file(str(resolve(r, tmp_path / method, workers=1).out / "model.safetensors"))
        for name in SHAPES:
            kept = (out[name] - base_t[name]).round()  # 0, 1 or 2 donors kept the entry
            assert (kept == 1).any(), (method, name)  # one kept it, the other not
            assert ((kept == 0) | (kept == 1) | (kept == 2)).all()
    r.close()
