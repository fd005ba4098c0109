"""Write the golden vectors of specs/cross-family.md section 3 (``python make_vectors.py [DIR]``).

An independent implementation of the spec's text in numpy (its own BLAS and LAPACK, here
OpenBLAS): nothing from ``crdt_merge`` and no torch, so tests/cross_family/test_vectors.py
checks crdt_merge against a second reading of the spec. numpy has no ``sytrf``, so the
inverse iteration here solves with LU (``numpy.linalg.solve``); any backward-stable solver
gives the same vectors to within the tolerance below.

Three kinds of case, by what the spec guarantees (section 6):

- ``spectral``: steps 2 to 6 from given spectra (no BLAS or LAPACK): bit-exact everywhere.
- ``exact``: whole merges of matrices whose Gram matrices are exact and diagonal with
  distinct entries (signed permutations of small dyadic diagonals), with more than
  ``INVERSE_MAX`` kept indices so that the vectors come from ``eigh``: every LAPACK returns
  the diagonal and unit vectors exactly, so the output is bit-exact everywhere.
- ``tolerance``: Gaussian and planted matrices, and diagonal ones with few kept indices
  (inverse iteration: its solves round differently in every LAPACK); kept indices must be
  equal, gains and output within ``TOLERANCE`` (relative to the largest gain and to the
  update's largest entry), because another BLAS/LAPACK changes the last bits of the Gram
  matrices, eigenvalues and vectors (by about ``eps (sigma_0/sigma_i)^2`` and
  ``eps ||G|| / gap``; the cases are chosen well conditioned, with a relative margin of at
  least 1e-6 around every top-k and noise-floor decision, so those bits cannot flip one).

Floats are written with ``float.hex`` (exact); matrices row-major. Running this again must
reproduce the file: exactly for the bit-exact kinds, within ``TOLERANCE`` for the others.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent
NOISE_FLOOR = 2.0**-40
SHIFT = 2.0**-50
GRAM_BLOCK = 512
INVERSE_STEPS = 3
INVERSE_MAX = 8
TOLERANCE = 1e-9


# -- the spec, section 3, in numpy ----------------------------------------------------------


def fixed_sum(x: np.ndarray) -> float:
    """Pad to a power of two with zeros, then add the second half onto the first."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    n = flat.size
    if n == 0:
        return 0.0
    size = 1 << (n - 1).bit_length()
    flat = np.concatenate([flat, np.zeros(size - n)])
    while flat.size > 1:
        half = flat.size // 2
        flat = flat[:half] + flat[half:]
    return float(flat[0])


def fixed_dot(a: np.ndarray, b: np.ndarray) -> float:
    return fixed_sum(np.asarray(a) * np.asarray(b))


def fixed_norm(a: np.ndarray) -> float:
    return float(np.sqrt(fixed_dot(a, a)))


def tall(x: np.ndarray) -> np.ndarray:
    return x if x.shape[0] >= x.shape[1] else x.T


def gram(x: np.ndarray) -> np.ndarray:
    y = tall(x)
    r = y.shape[1]
    g = np.zeros((r, r))
    for i in range(0, r, GRAM_BLOCK):
        for j in range(0, i + 1, GRAM_BLOCK):
            g[i:i + GRAM_BLOCK, j:j + GRAM_BLOCK] = y[:, i:i + GRAM_BLOCK].T @ y[:, j:j + GRAM_BLOCK]
    assert np.isfinite(g).all()
    return g


def eig(g: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(g, UPLO="L") if g.size else np.zeros(0)


def sv(lam: np.ndarray) -> np.ndarray:
    lam = lam[::-1]
    return np.where(lam > 0, np.sqrt(np.maximum(lam, 0.0)), 0.0)


def spectral_delta(sigma: np.ndarray, omega: np.ndarray) -> tuple[float, np.ndarray]:
    r = min(sigma.size, omega.size)
    delta = np.zeros(sigma.size)
    den = fixed_dot(omega[:r], omega[:r])
    if r == 0 or den == 0.0:
        return 0.0, delta
    s = fixed_dot(sigma[:r], omega[:r]) / den
    rho = omega[:r] * s
    d = rho - sigma[:r]
    floor = NOISE_FLOOR * (float(sigma[0]) * float(sigma[0]))
    noise = (np.abs(d) * (rho + sigma[:r]) <= floor) | (sigma[:r] * sigma[:r] <= floor)
    delta[:r] = np.where(noise, 0.0, d)
    return s, delta


def plan_update(sigma, omegas, weights, tau, k, beta) -> dict:
    total = 0.0
    for w in weights:
        total = total + w
    scales, deltas = [], []
    dbar = np.zeros(sigma.size)
    for omega, w in zip(omegas, weights, strict=True):
        s, d = spectral_delta(sigma, omega)
        scales.append(s)
        deltas.append(d)
        dbar = dbar + d * w
    plan = {"scales": scales, "deltas": deltas, "kept": [], "gains": [], "trust": 0.0}
    if total == 0.0:
        return plan
    dbar = dbar / total
    size = np.abs(dbar)
    ranked = sorted((i for i in range(dbar.size) if size[i] != 0.0), key=lambda i: (-size[i], i))
    kept = sorted(ranked[:k])
    if not kept:
        return plan
    c = min(1.0, (tau * fixed_norm(sigma)) / fixed_norm(dbar[kept]))
    f = (1.0 - beta) * c
    plan.update(kept=kept, gains=[f * float(dbar[i]) for i in kept], trust=c, dbar=dbar)
    return plan


def start_vector(r: int) -> np.ndarray:
    t = np.arange(r, dtype=np.int64)
    return ((t * 2654435761 + 1013904223) & 0xFFFFFFFF).astype(np.float64) / 2.0**32 - 0.5


def inverse_iteration(g: np.ndarray, lam: np.ndarray, columns: list[int]):
    shift = SHIFT * float(lam[-1])
    found = []
    for a in columns:
        m = np.tril(g) + np.tril(g, -1).T  # numpy's solver reads the whole matrix
        m[np.diag_indices_from(m)] = np.diag(g) - (float(lam[a]) + shift)
        x = start_vector(g.shape[0])
        for _ in range(INVERSE_STEPS):
            try:
                x = np.linalg.solve(m, x)
            except np.linalg.LinAlgError:
                return None
            for e in found:
                x = x - e * fixed_dot(e, x)
            nx = fixed_norm(x)
            if not (np.isfinite(nx) and nx > 0.0):
                return None
            x = x / nx
        found.append(x)
    return found


def merge(a: np.ndarray, donors: list[np.ndarray], weights: list[float], tau: float, k: int,
          beta: float) -> dict:
    g = gram(a)
    lam = eig(g)
    sigma = sv(lam)
    plan = plan_update(sigma, [sv(eig(gram(w))) for w in donors], weights, tau, k, beta)
    plan.update(out=a, vectors="")
    if not plan["kept"] or all(x == 0.0 for x in plan["gains"]):
        plan.update(kept=[], gains=[])
        return plan
    r = g.shape[0]
    columns = [r - 1 - i for i in plan["kept"]]
    found = inverse_iteration(g, lam, columns) if len(columns) <= INVERSE_MAX else None
    plan["vectors"] = "inverse" if found is not None else "eigh"
    if found is None:
        vectors = np.linalg.eigh(g, UPLO="L")[1]
        found = [vectors[:, c].copy() for c in columns]
    y = tall(a)
    d = np.zeros(a.shape)
    for e, gain in zip(found, plan["gains"], strict=True):
        z = y @ e
        nz = fixed_norm(z)
        if nz == 0.0:
            continue
        t = z / nz
        u, v = (t, e) if y is a else (e, t)
        d = d + np.outer(u * gain, v)
    plan["out"] = np.where(d != 0, a + d, a)
    plan["update_max"] = float(np.abs(d).max())
    return plan


# -- the cases --------------------------------------------------------------------------------


def hexes(x) -> list[str]:
    return [float(v).hex() for v in np.asarray(x, dtype=np.float64).reshape(-1)]


def matrix(x: np.ndarray) -> dict:
    return {"shape": list(x.shape), "hex": hexes(x)}


def signed_permuted(rng: np.random.Generator, m: int, n: int, diagonal: list[float]) -> np.ndarray:
    """``P diag Q`` with signed permutations ``P`` (m x m), ``Q`` (n x n): exact Gram."""
    core = np.zeros((m, n))
    for i, v in enumerate(diagonal):
        core[i, i] = v
    rows = rng.permutation(m)
    cols = rng.permutation(n)
    signs_r = rng.choice([-1.0, 1.0], m)
    signs_c = rng.choice([-1.0, 1.0], n)
    return (core[rows][:, cols] * signs_r[:, None]) * signs_c[None, :]


def fixed_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with every entry a ``fixed_dot``: the same bits on any CPU and BLAS."""
    out = np.zeros((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = fixed_dot(a[i, :], b[:, j])
    return out


def orthonormal_columns(x: np.ndarray) -> np.ndarray:
    """Modified Gram-Schmidt in fixed order (correctly rounded elementwise steps and
    ``fixed_dot`` only), so the result does not depend on LAPACK's QR kernels."""
    q = np.array(x, dtype=np.float64)
    for j in range(q.shape[1]):
        for i in range(j):
            q[:, j] = q[:, j] - fixed_dot(q[:, i], q[:, j]) * q[:, i]
        q[:, j] = q[:, j] / fixed_norm(q[:, j])
    return q


def planted(rng: np.random.Generator, m: int, n: int, spectrum: np.ndarray) -> np.ndarray:
    """``U diag(spectrum) V^T`` with random orthonormal ``U``, ``V``. Built from the
    generator's own fixed-order routines, never BLAS or LAPACK: these are stored *inputs*,
    and an input must be the same bits on every machine that regenerates the file."""
    r = spectrum.size
    u = orthonormal_columns(rng.standard_normal((m, r)))
    v = orthonormal_columns(rng.standard_normal((n, r)))
    return fixed_matmul(u * spectrum, v.T)


def margin(plan: dict, k: int) -> float:
    """The smallest relative gap around the top-k cut and the noise decisions (for the
    tolerance cases: last-bit changes must not flip a decision)."""
    size = np.sort(np.abs(plan.get("dbar", np.zeros(1))))[::-1]
    nonzero = size[size > 0]
    if k < nonzero.size:
        return float((nonzero[k - 1] - nonzero[k]) / nonzero[k - 1])
    return 1.0


def merge_case(name: str, a, donors, weights, tau, k, beta, exact: bool) -> dict:
    plan = merge(a, donors, weights, tau, k, beta)
    if exact:
        assert plan["vectors"] in ("eigh", ""), name
    else:
        assert margin(plan, k) > 1e-6, name
    return {"name": name, "anchor": matrix(a), "donors": [matrix(w) for w in donors],
            "weights": hexes(weights), "tau": float(tau).hex(), "k": k,
            "beta": float(beta).hex(),
            "expect": {"kept": plan["kept"], "gains": hexes(plan["gains"]),
                       "trust": float(plan["trust"]).hex(), "scales": hexes(plan["scales"]),
                       "vectors": plan["vectors"], "out": hexes(plan["out"])}}


def spectral_cases() -> list[dict]:
    rng = np.random.default_rng(2026)
    sigma = np.sort(rng.uniform(0.1, 3.0, 12))[::-1]
    cases = [
        ("two donors, trust clips", sigma, [np.sort(rng.uniform(0.1, 4.0, 15))[::-1],
                                            np.sort(rng.uniform(0.0, 2.0, 9))[::-1]],
         [1.0, 0.5], 0.05, 3, 0.6),
        ("trust does not clip", sigma, [sigma * 1.25 + np.linspace(0.0, 0.01, 12)],
         [2.0], 10.0, 4, 0.25),
        ("ties go to the lower index", np.array([4.0, 3.0, 2.0, 1.0]),
         [np.array([4.0, 2.5, 2.5, 1.0])], [1.0], 1.0, 1, 0.0),  # s = 1, d = (0, -.5, .5, 0)
        ("a zero donor and a zero weight", sigma, [np.zeros(5), sigma[::-1].copy(), sigma * 3],
         [1.0, 1.0, 0.0], 0.2, 5, 0.5),
        ("all weights zero", sigma, [sigma * 2], [0.0], 0.2, 3, 0.5),
        ("noise floor and unresolved directions", np.array([4.0, 2.0, 0.125, 2.0**-30]),
         [np.array([4.0, 2.0 + 2.0**-44, 0.125, 2.0**-16])], [1.0], 0.3, 4, 0.0),
        ("k above the non-zero count", np.array([3.0, 2.0, 1.0]),
         [np.array([3.5, 2.0, 1.5, 1.0])], [1.0], 0.5, 10, 0.1),
        ("anchor of zeros", np.zeros(4), [np.array([2.0, 1.0])], [1.0], 0.5, 2, 0.0),
    ]
    out = []
    for name, s, omegas, weights, tau, k, beta in cases:
        plan = plan_update(s, omegas, weights, tau, k, beta)
        out.append({"name": name, "sigma": hexes(s), "omegas": [hexes(o) for o in omegas],
                    "weights": hexes(weights), "tau": float(tau).hex(), "k": k,
                    "beta": float(beta).hex(),
                    "expect": {"scales": hexes(plan["scales"]),
                               "deltas": [hexes(d) for d in plan["deltas"]],
                               "kept": plan["kept"], "gains": hexes(plan["gains"]),
                               "trust": float(plan["trust"]).hex()}})
    return out


def exact_cases() -> list[dict]:
    rng = np.random.default_rng(7)
    anchor_diag = [12.0, 10.0, 9.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0]
    donor_diag = [16.0, 11.0, 9.0, 8.0, 6.0, 4.0, 3.5, 2.0, 1.25, 1.0, 0.75, 0.5, 0.25]
    a_tall = signed_permuted(rng, 14, 12, anchor_diag)
    a_wide = signed_permuted(rng, 12, 15, anchor_diag)
    w_big = signed_permuted(rng, 16, 13, donor_diag)
    w_small = signed_permuted(rng, 9, 11, [8.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5])
    return [
        merge_case("tall anchor, one wider donor, eigh vectors", a_tall, [w_big], [1.0],
                   0.3, 10, 0.2, exact=True),
        merge_case("wide anchor, two donors", a_wide, [w_big, w_small], [1.0, 2.0],
                   0.5, 12, 0.0, exact=True),
        merge_case("trust region clips", a_tall, [w_small], [1.0], 0.01, 9, 0.5, exact=True),
        merge_case("the anchor itself", a_tall, [a_tall.copy()], [1.0], 0.3, 10, 0.0,
                   exact=True),
    ]


def tolerance_cases() -> list[dict]:
    rng = np.random.default_rng(11)
    anchor_diag = [12.0, 10.0, 9.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0]
    a_diag = signed_permuted(rng, 13, 12, anchor_diag)
    w_diag = signed_permuted(rng, 15, 14, [16.0, 11.0, 9.0, 8.0, 6.0, 4.0, 3.5, 2.0, 1.25,
                                           1.0, 0.75, 0.5, 0.25, 0.125])
    g1 = rng.standard_normal((10, 7))
    g2 = rng.standard_normal((6, 11))
    d1 = rng.standard_normal((13, 9)) * 2.5
    d2 = rng.standard_normal((5, 8))
    g3 = rng.standard_normal((14, 10))
    p1 = planted(rng, 9, 12, np.geomspace(1.0, 1e-3, 9))
    dp = planted(rng, 11, 14, np.geomspace(2.0, 1e-2, 11))
    return [
        merge_case("diagonal anchor, inverse iteration", a_diag, [w_diag], [1.0], 0.3, 3, 0.2,
                   exact=False),
        merge_case("gaussian tall, one donor", g1, [d1], [1.0], 0.2, 3, 0.6, exact=False),
        merge_case("gaussian wide, two donors", g2, [d1, d2], [1.0, 0.5], 0.05, 2, 0.3,
                   exact=False),
        merge_case("gaussian tall, seven kept", g1, [d1, d2], [0.5, 1.5], 1.0, 7, 0.0,
                   exact=False),
        merge_case("gaussian tall, eigh vectors", g3, [d1], [1.0], 1.0, 9, 0.1, exact=False),
        merge_case("planted condition 1e3, wide", p1, [dp], [1.0], 0.2, 4, 0.4, exact=False),
    ]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    vectors = {
        "about": "specs/cross-family.md section 3; floats are float.hex strings, matrices "
                 "row-major; written by specs/vectors/cross_family/make_vectors.py (numpy)",
        "constants": {"noise_floor": NOISE_FLOOR.hex(), "shift": SHIFT.hex(),
                      "gram_block": GRAM_BLOCK, "inverse_steps": INVERSE_STEPS,
                      "inverse_max": INVERSE_MAX},
        "tolerance": TOLERANCE,
        "start_vector": hexes(start_vector(16)),
        "spectral": spectral_cases(),
        "exact": exact_cases(),
        "tolerance_cases": tolerance_cases(),
    }
    text = json.dumps(vectors, indent=1, ensure_ascii=True) + "\n"
    (out / "cross_family.json").write_text(text)


if __name__ == "__main__":
    main()
