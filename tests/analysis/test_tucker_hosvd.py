"""analysis.tucker: HOSVD exact at full rank (plain and whitened, also when a mode's rank is below its
channels), the kept-energy grid is the real error of every rank pair, the equal-energy chain."""

from __future__ import annotations

import numpy as np
import pytest

from graphslim.analysis.factorize import kept_energy, whitening
from graphslim.analysis.tucker import compose_tucker, energy_chain, first_rank, hosvd, tucker_factors


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
