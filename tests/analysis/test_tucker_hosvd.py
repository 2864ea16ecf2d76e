"""analysis.tucker: HOSVD exact at full rank (plain and whitened, also when a mode's rank is below its
channels), the kept-energy grid is the real error of every rank pair, the equal-energy chain; large kernels:
the streamed randomized HOSVD is within 1% of the exact one's error, in float32, without a copy of the
kernel (tracemalloc), and exact at full rank through the Gram matrices."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from graphslim.analysis.factorize import kept_energy, whitening
from graphslim.analysis.randomized import use_randomized
from graphslim.analysis.tucker import (compose_tucker, energy_chain, first_rank, hosvd, mode_energy, streamed_hosvd,
                                       tucker_error, tucker_factors)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (3, 3, 64, 4), (5, 3, 2, 30), (1, 3, 4, 4)])
def test_exact_at_full_rank(shape):
    w = np.random.default_rng(0).normal(size=shape)
    h = hosvd(w)
    kh, kw, c, n = shape
    assert h.full == (min(c, kh * kw * n), min(n, kh * kw * c))
    a, core, b = tucker_factors(h, *h.full)
    assert a.shape == (c, h.full[0]) and core.shape == (kh, kw, *h.full) and b.shape == (h.full[1], n)
    np.testing.assert_allclose(compose_tucker(a, core, b), w, atol=1e-10)
    x = np.random.default_rng(1).normal(size=(200, c)) @ np.random.default_rng(2).normal(size=(c, c))
    g, ginv = whitening(x.T @ x / 200)
    a, core, b = tucker_factors(hosvd(w, g), *h.full, ginv)
    np.testing.assert_allclose(compose_tucker(a, core, b), w, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), 1.0)


def test_kept_grid_is_the_error_of_every_pair():
    w = np.random.default_rng(3).normal(size=(3, 3, 6, 8))
    h = hosvd(w)
    grid = h.kept_grid()
    assert grid.shape == (7, 9) and grid[6, 8] == pytest.approx(1.0)
    for r1, r2 in [(1, 1), (2, 5), (6, 3), (4, 8)]:
        approx = compose_tucker(*tucker_factors(h, r1, r2))
        assert rel(approx, w) == pytest.approx(np.sqrt(1 - grid[r1, r2]), rel=1e-9)
    assert np.all(np.diff(grid, axis=0) >= -1e-15) and np.all(np.diff(grid, axis=1) >= -1e-15)


def test_energy_chain_keeps_the_same_fraction_in_both_modes():
    w = np.random.default_rng(4).normal(size=(3, 3, 6, 10)) * np.geomspace(1, 0.05, 10)
    h = hosvd(w)
    e_in, e_out = kept_energy(h.s_in), kept_energy(h.s_out)
    chain = energy_chain(e_in, e_out)
    assert chain[0] == (1, 1)
    assert chain[-1] == h.full and len(set(chain)) == len(chain)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(chain, chain[1:]))
    for tau in (0.3, 0.7, 0.9, 0.99):
        pair = (int(first_rank(e_in, tau)), int(first_rank(e_out, tau)))
        assert pair in chain and e_in[pair[0]] >= tau and e_out[pair[1]] >= tau
        assert pair[0] == 1 or e_in[pair[0] - 1] < tau


# ------------------------------------------------------------------------ large kernels: streamed HOSVD
def low_rank_plus_noise(c=768, n=768, r=32, noise=0.02, seed=0) -> np.ndarray:
    """A 3×3×c×n float32 kernel (5.3M entries: over the 4M of the streamed policy) of Tucker ranks (r, r)
    with a decaying core, plus Gaussian noise of ``noise`` × its RMS."""
    rng = np.random.default_rng(seed)
    a = np.linalg.qr(rng.standard_normal((c, r)))[0]
    b = np.linalg.qr(rng.standard_normal((n, r)))[0]
    core = rng.standard_normal((3, 3, r, r)) * np.exp(-np.arange(r) / 8)[:, None]
    w = np.einsum("ci,hwij,nj->hwcn", a, core, b, optimize=True)
    w += noise * np.linalg.norm(w) / np.sqrt(w.size) * rng.standard_normal(w.shape)
    return w.astype(np.float32)


@pytest.fixture(scope="module")
def large():
    w = low_rank_plus_noise()
    assert use_randomized(w.shape)
    return w, hosvd(w.astype(np.float64))  # the exact float64 HOSVD, for reference


@pytest.mark.parametrize("ranks", [(12, 12), (24, 16), (32, 32)])
def test_randomized_matches_exact_hosvd_error_in_float32_and_little_memory(large, ranks):
    w, exact = large
    tracemalloc.start()
    try:
        h = streamed_hosvd(w, ranks=ranks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert h.svd == f"randomized (ranks {ranks[0]}, {ranks[1]})" and h.sketch == ranks and h.full == (768, 768)
    assert h.core.dtype == np.float32  # the projection ran in the kernel's precision
    a, core, b = tucker_factors(h, *ranks)
    err, best = tucker_error(w, a, core, b), float(np.sqrt(1 - exact.kept_grid()[ranks]))
    assert best - 1e-6 <= err <= 1.01 * best + 1e-6  # within 1% of the exact HOSVD's error
    assert abs(np.sqrt(1 - h.kept_grid()[ranks]) - err) < 1e-4  # its kept grid is the emitted error
    assert peak < 0.25 * w.nbytes  # no copy of the kernel (a float64 one would be 2 × its bytes)


def test_streamed_energy_sketch_and_exact_full_rank(large):
    w, exact = large
    h = streamed_hosvd(w, energy=0.9)
    e_in, e_out = mode_energy(h)
    r1, r2 = first_rank(e_in, 0.9), first_rank(e_out, 0.9)
    assert h.svd.startswith("randomized") and r1 <= h.sketch[0] and r2 <= h.sketch[1]
    assert (r1, r2) == (first_rank(kept_energy(exact.s_in), 0.9), first_rank(kept_energy(exact.s_out), 0.9))
    full = streamed_hosvd(w)  # no rank, no energy: every pair (max_error=, macs=), exact through the Gram
    assert full.svd == "exact (Gram)" and full.sketch == full.full == (768, 768)
    a, core, b = tucker_factors(full, *full.full)
    assert tucker_error(w, a, core, b) < 1e-5
    np.testing.assert_allclose(full.kept_grid()[[8, 32, 768], [8, 32, 768]],
                               exact.kept_grid()[[8, 32, 768], [8, 32, 768]], atol=1e-5)
