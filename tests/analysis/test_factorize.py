"""Factorization math: exact at full rank, Eckart–Young errors, rank choice, whitening, refit, options,
latency measurement."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import tensorflow as tf

from graphslim.analysis.calibration import Regression
from graphslim.analysis.factorize import (FactorizeOptions, allocate_ranks, channel_svd, choose_rank,
                                          compose_separable, derived_name, kept_energy, lowrank_factors,
                                          measure_latency, refit, relative_error, separable_error,
                                          separable_factors,
                                          whitening)
from graphslim.ir.graph import Graph, SignatureArg, Tensor

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(3, 3, 4, 16), (3, 3, 5, 4), (5, 1, 2, 3), (1, 3, 3, 7)])
def test_separable_exact_at_full_rank(shape):
    w = RNG.normal(size=shape)
    full = min(shape[0] * shape[1], shape[3])
    dw, pw = separable_factors(w, full)
    assert dw.shape == (*shape[:3], full) and pw.shape == (shape[2] * full, shape[3])
    np.testing.assert_allclose(compose_separable(dw, pw), w, atol=1e-10)
    # √S split: depthwise column and pointwise row of each (c, j) have the same norm
    np.testing.assert_allclose(np.linalg.norm(dw.reshape(-1, shape[2], full), axis=0),
                               np.linalg.norm(pw.reshape(shape[2], full, -1), axis=2), rtol=1e-8)


def test_separable_error_is_eckart_young_and_falls_with_rank():
    w = RNG.normal(size=(3, 3, 6, 12))
    _, s, _ = channel_svd(w)
    kept = kept_energy(s)
    errs = []
    for m in range(1, 10):
        dw, pw = separable_factors(w, m)
        errs.append(relative_error(w, compose_separable(dw, pw)))
        assert errs[-1] == pytest.approx(np.sqrt(max(1 - kept[m], 0)), rel=1e-9, abs=1e-7)
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_lowrank_exact_at_full_rank_and_error_falls():
    w = RNG.normal(size=(10, 7))
    errs = [relative_error(w, np.matmul(*lowrank_factors(w, r))) for r in range(1, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-12


def test_kept_energy_and_choose_rank():
    s = np.array([[3.0, 2.0, 1.0], [1.0, 1.0, 0.0]])  # two channels, uniform rank
    kept = kept_energy(s)
    np.testing.assert_allclose(kept, np.array([0, 10, 15, 16]) / 16)
    assert choose_rank(kept, rank=7) == 3 and choose_rank(kept, rank=2) == 2
    assert choose_rank(kept, energy=0.6) == 1 and choose_rank(kept, energy=0.7) == 2
    assert choose_rank(kept, energy=1.0) == 3
    assert choose_rank(kept, max_error=0.5) == 2  # √(1 − 15/16) = 0.25 ≤ 0.5 < √(1 − 10/16)
    assert choose_rank(kept_energy(np.zeros(4)), energy=0.9) == 1


def test_whitening_roots_and_dead_inputs():
    a = RNG.normal(size=(6, 6))
    sigma = a @ a.T
    g, ginv = whitening(sigma, damping=0)
    np.testing.assert_allclose(g @ g, sigma, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(g @ ginv, np.eye(6), atol=1e-8)
    g, ginv = whitening(np.zeros((2, 3, 3)))
    np.testing.assert_allclose(g, np.broadcast_to(np.eye(3), (2, 3, 3)))


def test_whitened_factors_minimize_output_error():
    """On inputs with a skewed covariance, the weighted factorization has lower output error (and
    higher weight error) than the plain one at the same rank; both are exact at full rank."""
    w = RNG.normal(size=(8, 6))
    x = RNG.normal(size=(2000, 8)) * np.geomspace(5, 0.01, 8)
    sigma = x.T @ x / len(x)
    wh = whitening(sigma, damping=1e-6)

    def out_err(u, v):
        return np.linalg.norm(x @ (w - u @ v)) / np.linalg.norm(x @ w)

    plain, weighted = lowrank_factors(w, 2), lowrank_factors(w, 2, wh)
    assert out_err(*weighted) < 0.5 * out_err(*plain)
    assert relative_error(w, np.matmul(*weighted)) > relative_error(w, np.matmul(*plain))
    assert out_err(*lowrank_factors(w, 6, wh)) < 1e-8
    # separable: per-channel patch second moments
    k = RNG.normal(size=(3, 3, 2, 5))
    p = RNG.normal(size=(3000, 9, 2)) * np.geomspace(4, 0.01, 9)[None, :, None]
    sig = np.einsum("nkc,nlc->ckl", p, p) / len(p)
    flat = p.reshape(len(p), -1)

    def sep_err(dw, pw):
        delta = (k - compose_separable(dw, pw)).reshape(18, 5)
        return np.linalg.norm(flat @ delta) / np.linalg.norm(flat @ k.reshape(18, 5))

    assert sep_err(*separable_factors(k, 2, whitening(sig, 1e-6))) < 0.5 * sep_err(*separable_factors(k, 2))
    assert sep_err(*separable_factors(k, 5, whitening(sig, 1e-6))) < 1e-8


def test_refit_lowers_error_and_fits_intercept():
    x = RNG.normal(size=(500, 6)) + 3.0
    w = RNG.normal(size=(6, 4))
    u, v = lowrank_factors(w, 2)
    acc = Regression(lambda r: np.concatenate([r @ u, np.ones((len(r), 1))], 1), lambda r: r @ w)
    acc.update(x)
    v2, shift, err0, err = refit(acc, v, intercept=True, ridge=1e-9)
    assert err < err0 and shift.shape == (4,)
    # the optimum: least squares of x @ w on [x @ u, 1]
    f = np.concatenate([x @ u, np.ones((500, 1))], 1)
    best = np.linalg.lstsq(f, x @ w, rcond=None)[0]
    np.testing.assert_allclose(np.concatenate([v2, shift[None]]), best, rtol=1e-5, atol=1e-6)


def test_options_validation():
    assert FactorizeOptions(energy=0.9).cost == "macs" and FactorizeOptions().energy is None
    for bad in ({"rank": 2, "energy": 0.5}, {"max_error": 0.1, "energy": 0.5}, {"macs": 0.5, "rank": 2},
                {"rank": 0}, {"energy": 0.0}, {"max_error": 1.0}, {"macs": 0.0},
                {"rank": 1, "calib_batch": 0}):
        with pytest.raises(ValueError):
            FactorizeOptions(**bad)


def test_derived_names():
    assert derived_name("block1_conv2/kernel", "depthwise") == "block1_conv2/depthwise_kernel"
    assert derived_name("w", "pointwise") == "w_pointwise"


def test_measure_latency_times_each_graph():
    graphs = {}
    for n in (8, 64):
        g = Graph()
        g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (1, n)})
        g.inputs.append(SignatureArg("x", Tensor("x", 0)))
        k = g.add_weight("k", RNG.normal(size=(n, n)).astype(np.float32))
        g.add_node("y", "MatMul", ["x", k], attrs={"T": tf.float32})
        g.outputs.append(SignatureArg("y", Tensor("y", 0)))
        g.infer_shapes()
        graphs[n] = g
    t = measure_latency(graphs, runs=3, min_seconds=0.002)
    assert set(t) == {8, 64} and all(0 < v < 0.1 for v in t.values())


def test_allocate_ranks_is_optimal_for_the_macs_it_reaches():
    """The greedy hull walk is Lagrangian-optimal: no combination of options with at most the MACs it
    reaches loses less (checked by brute force on small random instances)."""
    import itertools

    rng = np.random.default_rng(7)
    for trial in range(30):
        layers = {}
        for key in range(3):
            orig = float(rng.integers(50, 100))
            opts = []
            for r in range(1, 5):
                opts.append((r, float(rng.integers(5, 110)), float(rng.random())))
            layers[key] = (orig, opts)
        total = sum(o for o, _ in layers.values())
        target = total * rng.uniform(0.2, 1.0)
        ranks, reached = allocate_ranks(layers, target)

        def cost_loss(choice):
            c = l = 0.0
            for key, pick in zip(layers, choice):
                orig, opts = layers[key]
                if pick is None:
                    c += orig
                else:
                    _, cc, ll = next(o for o in opts if o[0] == pick)
                    c, l = c + cc, l + ll
            return c, l

        choices = [[None] + [o[0] for o in layers[k][1] if o[1] < layers[k][0]] for k in layers]
        mine_c, mine_l = cost_loss([ranks[k] for k in layers])
        assert mine_c == pytest.approx(reached)
        feasible = [cost_loss(ch) for ch in itertools.product(*choices)]
        if min(c for c, _ in feasible) <= target:
            assert reached <= target + 1e-9
        best = min(l for c, l in feasible if c <= mine_c + 1e-9)
        assert mine_l <= best + 1e-9, (trial, mine_l, best)


def test_allocate_ranks_keeps_everything_within_budget():
    layers = {"a": (100.0, [(1, 30.0, 0.5), (2, 60.0, 0.1)]), "b": (10.0, [(1, 5.0, 0.9)])}
    assert allocate_ranks(layers, 110) == ({"a": None, "b": None}, 110.0)
    ranks, reached = allocate_ranks(layers, 75)
    assert ranks == {"a": 2, "b": None} and reached == 70.0


def test_separable_streams_channels_without_a_float64_copy_of_the_kernel():
    """A 3×3×512×1024 float32 kernel: the per-channel SVD and the factors are computed chunk by chunk; the
    traced peak is the factors plus half the kernel's bytes (a float64 copy alone is twice them,
    the former code peaked at 4.5×); the error is still the exact Eckart–Young one, zero at full rank."""
    w = np.random.default_rng(0).standard_normal((3, 3, 512, 1024)).astype(np.float32)
    for m in (2, 9):
        tracemalloc.start()
        try:
            svd = channel_svd(w)
            dw, pw = separable_factors(w, m, svd=svd)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < dw.nbytes + pw.nbytes + 0.5 * w.nbytes
        kept = kept_energy(svd[1])
        assert separable_error(w, dw, pw) == pytest.approx(np.sqrt(max(1 - kept[m], 0.0)), abs=1e-7)
    assert separable_error(w, dw, pw) < 1e-6
