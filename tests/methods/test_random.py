"""DARE and DELLA: masks from counter-based randomness, tested by their statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crdt_merge.errors import BadParameter
from crdt_merge.methods import TensorJob, get_method
from tests.methods.helpers import keys, run, same_bits, tensor


def nonzero_delta(tag: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    base = tensor(f"{tag}/b", shape)
    delta = tensor(f"{tag}/d", shape)
    delta = torch.where(delta.abs() < 1e-3, 0.5, delta)  # no zero deltas: kept == changed
    return base, base + delta


def dare(base, donor, density: str, key: bytes, rescale: bool = True) -> torch.Tensor:
    job = TensorJob(
        "t", base, [donor], [{"weight": "1", "density": density}], {"rescale": rescale}, [key]
    )
    return get_method("dare_linear").merge(job)


def test_keep_rate_is_density() -> None:
    base, donor = nonzero_delta("rate", (400, 250))
    n = base.numel()
    for density in (0.1, 0.5, 0.9):
        kept = (dare(base, donor, repr(density), keys(1, f"r{density}")[0]) != base).sum().item()
        sigma = (density * (1 - density) * n) ** 0.5
        assert abs(kept - density * n) < 5 * sigma, (density, kept)


def test_rescale_matches_the_l1_norm() -> None:
    base, donor = nonzero_delta("l1", (300, 40))
    delta = (donor - base).numpy()
    out = dare(base, donor, "0.3", keys(1, "l1")[0]).numpy() - base.numpy()
    kept = out != 0
    factor = np.abs(delta).sum() / np.abs(delta[kept]).sum()
    np.testing.assert_allclose(out[kept], delta[kept] * factor, rtol=1e-12)
    assert np.abs(out[~kept]).max() == 0
    plain = dare(base, donor, "0.3", keys(1, "l1")[0], rescale=False) - base
    assert torch.equal(plain != 0, torch.from_numpy(kept))  # same key: same mask
    np.testing.assert_array_equal(plain.numpy()[kept], delta[kept])


def test_expectation_is_density_times_delta_without_rescale() -> None:
    base, donor = nonzero_delta("mean", (64,))
    delta = (donor - base).numpy()
    runs = 400
    outs = np.stack(
        [(dare(base, donor, "0.25", k, rescale=False) - base).numpy() for k in keys(runs, "mean")]
    )
    se = np.abs(delta) * np.sqrt(0.25 * 0.75 / runs)
    assert (np.abs(outs.mean(0) - 0.25 * delta) / se).max() < 5


def test_mask_depends_on_the_key_and_the_index_only() -> None:
    base, a = nonzero_delta("ka", (50, 30))
    _, b = nonzero_delta("kb", (50, 30))
    k1, k2 = keys(2, "ki")
    mask_a = dare(base, a, "0.5", k1) != base
    mask_b = dare(base, b, "0.5", k1) != base  # another donor, same key: the same entries
    assert torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, dare(base, a, "0.5", k2) != base)
    flat = dare(base.reshape(-1), a.reshape(-1), "0.5", k1) != base.reshape(-1)
    assert torch.equal(flat, mask_a.reshape(-1))  # shape does not matter, the flat index does


def test_masks_travel_with_their_donor() -> None:
    base, a = nonzero_delta("ta", (40, 25))
    _, b = nonzero_delta("tb", (40, 25))
    ka, kb = keys(2, "travel")
    params = [{"weight": "0.6", "density": "0.5"}, {"weight": "0.9", "density": "0.4"}]
    for method in ("dare_linear", "dare_ties", "della", "della_linear"):
        m = get_method(method)
        ab = m.merge(TensorJob("t", base, [a, b], params, {}, [ka, kb]))
        ba = m.merge(TensorJob("t", base, [b, a], params[::-1], {}, [kb, ka]))
        assert same_bits(ab, ba), method  # two donors: the sums commute exactly


def test_density_edges() -> None:
    base, donor = nonzero_delta("edge", (20, 10))
    assert torch.equal(dare(base, donor, "0", keys(1)[0]), base)
    for method in ("della", "della_linear"):
        assert torch.equal(run(method, base, [donor], [{"weight": "1", "density": "0"}]), base)


def test_della_keep_probability_rises_with_rank() -> None:
    rows, cols = 300, 50
    base = torch.zeros(rows, cols, dtype=torch.float64)
    ramp = torch.arange(1, cols + 1, dtype=torch.float64)
    perm = torch.stack(
        [torch.from_numpy(np.random.default_rng(r).permutation(cols)) for r in range(rows)]
    )
    donor = ramp[perm]  # each row holds magnitudes 1..cols in a different order
    out = run(
        "della_linear",
        base,
        [donor],
        [{"weight": "1", "density": "0.5", "epsilon": "0.3"}],
        {"rescale": False},
    )
    kept = out != 0
    rate_by_magnitude = torch.zeros(cols)
    for m in range(cols):
        rate_by_magnitude[m] = kept[donor == m + 1].double().mean()
    expected = 0.2 + 0.6 * torch.arange(cols, dtype=torch.float64) / (cols - 1)
    sigma = (expected * (1 - expected) / rows).sqrt()
    assert ((rate_by_magnitude - expected).abs() < 5 * sigma).all()
    low, high = rate_by_magnitude[:10].mean(), rate_by_magnitude[-10:].mean()
    assert high - low > 0.4


def test_della_ranks_along_dim_one_of_a_3d_tensor() -> None:
    base = torch.zeros(60, 8, 40, dtype=torch.float64)
    ramp = torch.arange(1, 9, dtype=torch.float64).reshape(1, 8, 1)
    donor = base + ramp  # magnitude grows along dim 1 only
    out = run(
        "della_linear",
        base,
        [donor],
        [{"weight": "1", "density": "0.5", "epsilon": "0.4"}],
        {"rescale": False},
    )
    rates = (out != 0).double().mean(dim=(0, 2))
    expected = 0.1 + 0.8 * torch.arange(8, dtype=torch.float64) / 7
    assert ((rates - expected).abs() < 5 * (expected * (1 - expected) / 2400).sqrt()).all()


def test_della_single_column_rows_use_the_density() -> None:
    base = torch.zeros(4000, 1, dtype=torch.float64)
    out = run(
        "della_linear",
        base,
        [base + 1.0],
        [{"weight": "1", "density": "0.3", "epsilon": "0.2"}],
        {"rescale": False},
    )
    assert abs((out != 0).double().mean().item() - 0.3) < 5 * (0.21 / 4000) ** 0.5


def test_della_refuses_an_epsilon_that_leaves_0_1() -> None:
    base, donor = nonzero_delta("eps", (5, 5))
    with pytest.raises(BadParameter, match="epsilon 0.3 with density 0.2"):
        run("della", base, [donor], [{"weight": "1", "density": "0.2", "epsilon": "0.3"}])
