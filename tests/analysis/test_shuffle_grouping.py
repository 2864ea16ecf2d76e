"""graphslim/analysis/shuffle.py (the file is named apart from tests/passes/test_shuffle.py: pytest needs
unique basenames here): the co-clustering finds a permuted block-diagonal grouping, is balanced, beats the
contiguous grouping; the data-aware block fit is exact where nothing is dropped and lowers the output
error; the refit on the same data reproduces it; the emission layout omits identity gathers."""

from __future__ import annotations

import numpy as np
import pytest

from graphslim.analysis.calibration import Regression
from graphslim.analysis.shuffle import (block_fit, block_mask, block_refit, cocluster, grouped_kernel,
                                        kept_fraction, layout, output_energy_kept)


def permuted_blocks(c, n, g, seed=0):
    rng = np.random.default_rng(seed)
    w = np.zeros((c, n))
    for b in range(g):
        w[b * (c // g):(b + 1) * (c // g), b * (n // g):(b + 1) * (n // g)] = rng.normal(size=(c // g, n // g))
    return w[rng.permutation(c)][:, rng.permutation(n)]


@pytest.mark.parametrize("c,n,g", [(16, 24, 4), (32, 32, 8), (12, 6, 3), (64, 128, 16)])
def test_permuted_block_diagonal_is_found(c, n, g):
    w = permuted_blocks(c, n, g, seed=c + g)
    in_l, out_l, kept = cocluster(np.square(w), g)
    assert kept == pytest.approx(1.0, abs=1e-12)
    assert np.array_equal(np.where(block_mask(in_l, out_l), w, 0.0), w)
    assert (np.bincount(in_l, minlength=g) == c // g).all() and (np.bincount(out_l, minlength=g) == n // g).all()


def test_beats_the_contiguous_grouping_and_is_balanced():
    rng = np.random.default_rng(1)
    for c, n, g in ((16, 16, 4), (32, 48, 8), (24, 16, 2)):
        a = np.square(rng.normal(size=(c, n)) * rng.gamma(0.5, size=(c, 1)) * rng.gamma(0.5, size=(1, n)))
        in_l, out_l, kept = cocluster(a, g)
        contiguous = kept_fraction(a, np.arange(c) // (c // g), np.arange(n) // (n // g))
        assert kept == pytest.approx(kept_fraction(a, in_l, out_l)) and kept > contiguous
        assert (np.bincount(in_l, minlength=g) == c // g).all() and (np.bincount(out_l, minlength=g) == n // g).all()
    assert cocluster(a, 1)[2] == 1.0
    with pytest.raises(ValueError, match="divide"):
        cocluster(a, 5)


def test_data_aware_fit_lowers_output_error_and_refit_matches_it():
    rng = np.random.default_rng(2)
    c, n, g = 12, 8, 4
    w = rng.normal(size=(c, n))
    mix = rng.normal(size=(c, c)) * np.geomspace(3, 0.1, c)[:, None]
    x = rng.normal(size=(4000, c)) @ mix
    sigma = x.T @ x / len(x)
    in_l, out_l, _ = cocluster(np.square(w) * np.diag(sigma)[:, None], g)
    masked, fit = block_fit(w, in_l, out_l), block_fit(w, in_l, out_l, sigma, damping=0.0)
    assert np.all(fit[~block_mask(in_l, out_l)] == 0)
    assert output_energy_kept(w, fit, sigma) > output_energy_kept(w, masked, sigma)
    assert np.allclose(block_fit(w, np.zeros(c, int), np.zeros(n, int), sigma), w)  # one group: nothing dropped
    acc = Regression(lambda rows: rows, lambda rows: rows @ w)
    acc.update(x)
    b, shift, err0, err = block_refit(acc, masked, None, in_l, out_l, intercept=False, ridge=1e-9)
    assert shift is None and err < err0
    assert np.allclose(b, fit, atol=1e-6)  # the refit on the same data is the data-aware fit


def test_layout_omits_identity_gathers_and_reorders_groups():
    in_l, out_l = np.array([1, 1, 0, 0]), np.array([1, 1, 0, 0, 1, 0])
    groups, gin, gout = layout(in_l, out_l)
    assert gin is None and [list(i) for i, _ in groups] == [[0, 1], [2, 3]]  # ordered by first input
    assert list(gout) == list(np.argsort(np.array([0, 1, 4, 2, 3, 5])))
    groups, gin, gout = layout(np.array([0, 1, 0, 1]), np.array([1, 1, 0, 0]))
    assert gout is None and list(gin) == [1, 3, 0, 2]  # ordered by first output: no output gather
    w = np.arange(16.0).reshape(4, 4)
    k = grouped_kernel(w, groups)  # [C/g, N]: group 0 (outputs 0, 1) reads inputs 1, 3
    assert k.shape == (2, 4) and np.array_equal(k[:, :2], w[np.ix_([1, 3], [0, 1])])
