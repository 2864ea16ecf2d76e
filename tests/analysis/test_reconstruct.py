"""Least-squares reconstruction (graphslim/analysis/reconstruct.py): the refit equals the ridge solution
computed directly from im2col rows, lowers the measured output error (which matches a direct run),
works for Conv2D (any kernel size, strides) and MatMul (transposed kernels), adds a bias where there
is none, fits layer after layer from the input, and measures without refitting large layers."""

import numpy as np
import pytest
import tensorflow as tf

import graphslim.analysis.reconstruct as rec
from graphslim.analysis.calibration import ConvGeometry, extract_patches
from graphslim.analysis.channels import apply_keeps, group_for
from graphslim.analysis.reconstruct import fit_layers, kept_positions, ridge_solve, sink_layers
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.runtime import run

F = tf.float32


class Net:
    def __init__(self, shape, seed=0):
        self.g = Graph()
        self.rng = np.random.RandomState(seed)
        self.g.add_node("x", "Placeholder", attrs={"dtype": F, "shape": tuple(shape)})
        self.g.inputs.append(SignatureArg("x", Tensor("x", 0)))
        self.x = Tensor("x", 0)
        self.shape = shape

    def w(self, name, shape, scale=1.0):
        return self.g.add_weight(name, (scale * self.rng.randn(*shape)).astype("f")).output(0)

    def op(self, name, op, *inputs, **attrs):
        attrs.setdefault("T", F)
        return self.g.add_node(name, op, inputs=list(inputs), attrs=attrs).output(0)

    def conv(self, name, x, k, cin, cout, bias=True, stride=1, padding="SAME"):
        y = self.op(f"{name}/Conv2D", "Conv2D", x, self.w(f"{name}/kernel", (k, k, cin, cout)),
                    strides=[1, stride, stride, 1], padding=padding)
        return self.op(f"{name}/BiasAdd", "BiasAdd", y, self.w(f"{name}/bias", (cout,), 0.3)) if bias else y

    def done(self, *outs):
        for i, t in enumerate(outs):
            self.g.outputs.append(SignatureArg(f"y{i}", t))
        self.g.infer_shapes()
        return self.g

    def data(self, n=24, seed=1):
        shape = tuple(n if d is None else d for d in self.shape)
        return {"x": np.random.RandomState(seed).randn(*shape).astype("f")}


def _prune(g, changes_spec):
    """apply_keeps on a copy; returns (original, pruned, changes, kept positions, sink layers)."""
    original = g
    h = g.copy()
    changes = [(group_for(h, t, a), keep) for t, a, keep in changes_spec]
    kept = kept_positions(changes)
    layers = sink_layers(h, changes)
    apply_keeps(h, changes)
    return original, h, changes, kept, layers


def test_kept_positions_and_sink_layers():
    n = Net((None, 6, 6, 2))
    y = n.op("r1", "Relu", n.conv("c1", n.x, 3, 2, 5))
    g = n.done(n.conv("c2", y, 3, 5, 3))
    grp = group_for(g, "c1/Conv2D:0", 3)
    kept = kept_positions([(grp, [4, 1, 2])])
    assert kept[("c1/kernel", 3)].tolist() == [4, 1, 2]
    assert kept[("c2/kernel", 2)].tolist() == [4, 1, 2]
    assert kept[("c1/bias", 0)].tolist() == [4, 1, 2]
    assert sink_layers(g, [(grp, [0, 1])]) == ["c2/Conv2D"]
    assert sink_layers(g, [(grp, range(5))]) == []  # nothing removed: nothing to refit


@pytest.mark.parametrize("k,stride,padding", [(3, 1, "SAME"), (1, 1, "VALID"), (3, 2, "SAME"), (2, 1, "VALID")])
def test_conv_refit_is_the_ridge_solution_and_lowers_the_error(k, stride, padding):
    n = Net((None, 7, 7, 3))
    y = n.op("r1", "Relu", n.conv("c1", n.x, 3, 3, 6))
    g = n.done(n.op("r2", "Relu", n.conv("c2", y, k, 6, 4, stride=stride, padding=padding)))
    data = n.data()
    original, h, changes, kept, layers = _prune(g, [("c1/Conv2D:0", 3, [0, 2, 5])])
    assert layers == ["c2/Conv2D"]
    # direct: im2col of the pruned input at every position, targets = original pre-bias output + bias
    xp = run(h, data, fetch=["r1:0"])["r1:0"]
    target = run(original, data, fetch=["c2/BiasAdd:0"])["c2/BiasAdd:0"].astype(np.float64)
    geo = ConvGeometry.of(h, h.node("c2/Conv2D"))
    p = extract_patches(xp, geo)
    feats = np.concatenate([p.reshape(p.shape[0], -1).astype(np.float64), np.ones((p.shape[0], 1))], 1)
    t = target.reshape(-1, 4)
    w0 = h.weight("c2/kernel").value.reshape(-1, 4).astype(np.float64)
    b0 = np.concatenate([w0, h.weight("c2/bias").value[None].astype(np.float64)])
    want = ridge_solve(feats.T @ feats, feats.T @ t, b0, 1e-3)
    err_before = np.linalg.norm(t - feats @ b0) / np.linalg.norm(t)
    err_after = np.linalg.norm(t - feats @ want) / np.linalg.norm(t)

    fits = fit_layers(h, original, layers, data, kept, refit=True, ridge=1e-3, positions=None)
    f = fits["c2/Conv2D"]
    assert f.error_before == pytest.approx(err_before, rel=1e-4)
    assert f.error_after == pytest.approx(err_after, rel=1e-3, abs=1e-6) and f.error_after < f.error_before
    np.testing.assert_allclose(h.weight("c2/kernel").value.reshape(-1, 4), want[:-1], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(h.weight("c2/bias").value, want[-1], rtol=1e-3, atol=1e-4)
    assert h.weight("c2/kernel").shape == (k, k, 3, 4)
    # the error measured on the graph's actual output matches
    got = run(h, data, fetch=["c2/BiasAdd:0"])["c2/BiasAdd:0"].reshape(-1, 4)
    assert np.linalg.norm(got - t) / np.linalg.norm(t) == pytest.approx(f.error_after, rel=1e-3)
    h.verify()


def test_measuring_without_refit_leaves_the_weights():
    n = Net((None, 5, 5, 2))
    y = n.op("r1", "Relu", n.conv("c1", n.x, 3, 2, 5))
    g = n.done(n.conv("c2", y, 3, 5, 3))
    original, h, changes, kept, layers = _prune(g, [("c1/Conv2D:0", 3, [1, 3])])
    before = {k: w.value for k, w in h.weights.items()}
    fits = fit_layers(h, original, layers, n.data(), kept, refit=False, positions=7)
    assert fits["c2/Conv2D"].error_before > 0 and fits["c2/Conv2D"].error_after is None
    assert all(h.weights[k].value is v for k, v in before.items())


@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_refit_with_pruned_outputs_too(transpose_b):
    """d1 → relu → d2 → relu → d3; both hidden groups pruned: d2 reads fewer inputs and writes fewer
    outputs (targets restricted to its kept outputs); d3 is fitted after d2 (its inputs are d2's new ones)."""
    n = Net((None, 8))

    def dense(name, x, cin, cout):
        shape = (cout, cin) if transpose_b else (cin, cout)
        y = n.op(f"{name}/MatMul", "MatMul", x, n.w(f"{name}/kernel", shape), transpose_b=transpose_b)
        return n.op(f"{name}/BiasAdd", "BiasAdd", y, n.w(f"{name}/bias", (cout,), 0.3))

    y = n.op("r1", "Relu", dense("d1", n.x, 8, 10))
    y = n.op("r2", "Relu", dense("d2", y, 10, 7))
    g = n.done(dense("d3", y, 7, 3))
    data = n.data(200)
    original, h, changes, kept, layers = _prune(g, [("d1/MatMul:0", 1, [0, 2, 3, 5, 7, 9]),
                                                    ("d2/MatMul:0", 1, [6, 1, 2, 4])])
    assert layers == ["d2/MatMul", "d3/MatMul"]
    no_refit = fit_layers(h.copy(), original, layers, data, kept, refit=False)
    fits = fit_layers(h, original, layers, data, kept, refit=True)
    for name in layers:
        assert fits[name].error_after < fits[name].error_before, name
    # d3 was measured after d2's refit (its inputs changed), and the final outputs are closer
    assert fits["d3/MatMul"].error_before != pytest.approx(no_refit["d3/MatMul"].error_before, rel=1e-3)
    assert fits["d3/MatMul"].error_after < no_refit["d3/MatMul"].error_before
    assert h.weight("d2/kernel").shape == ((4, 6) if transpose_b else (6, 4))
    out = run(h, data)["y0"]
    ref = run(original, data)["y0"]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) == pytest.approx(fits["d3/MatMul"].error_after, rel=1e-3)


def test_a_layer_without_bias_gets_one():
    n = Net((None, 6, 6, 2))
    y = n.op("r1", "Relu", n.conv("c1", n.x, 3, 2, 6))  # post-ReLU: removed channels had a nonzero mean
    g = n.done(n.op("r2", "Relu", n.conv("c2", y, 3, 6, 4, bias=False)))
    original, h, changes, kept, layers = _prune(g, [("c1/Conv2D:0", 3, [0, 1, 2])])
    fits = fit_layers(h, original, layers, n.data(), kept, refit=True, positions=None)
    f = fits["c2/Conv2D"]
    assert f.error_after < f.error_before and "added bias c2/bias" in f.note
    assert h.weight("c2/bias").shape == (4,) and h.weights["c2/bias"].trainable
    ba = h.consumers("c2/Conv2D:0")[0][0]
    assert ba.op == "BiasAdd" and h.consumers(ba.output(0))[0][0].name == "r2"
    h.verify()


def test_large_layers_are_measured_not_refit(monkeypatch):
    monkeypatch.setattr(rec, "MAX_FEATURES", 10)
    n = Net((None, 5, 5, 2))
    y = n.op("r1", "Relu", n.conv("c1", n.x, 3, 2, 5))
    g = n.done(n.conv("c2", y, 3, 5, 3))
    original, h, changes, kept, layers = _prune(g, [("c1/Conv2D:0", 3, [1, 3])])
    before = h.weight("c2/kernel").value
    f = fit_layers(h, original, layers, n.data(), kept, refit=True)["c2/Conv2D"]
    assert f.error_before > 0 and f.error_after is None and "not refit" in f.note
    assert h.weight("c2/kernel").value is before


def test_bounded_rows_with_position_sampling():
    n = Net((None, 9, 9, 2))
    y = n.op("r1", "Relu", n.conv("c1", n.x, 3, 2, 5))
    g = n.done(n.conv("c2", y, 3, 5, 3))
    original, h, changes, kept, layers = _prune(g, [("c1/Conv2D:0", 3, [0, 1, 4])])
    f = fit_layers(h, original, layers, n.data(40), kept, refit=True, positions=5, batch_size=16)["c2/Conv2D"]
    assert f.rows == 40 * 5


def test_softmax_refit_recovers_a_softmax_layer():
    rng = np.random.RandomState(0)
    f = np.concatenate([rng.randn(300, 6), np.ones((300, 1))], axis=1)
    b_true = rng.randn(7, 4)
    p = np.exp(rec._log_softmax(f @ b_true))
    b = rec.softmax_refit(f, p, np.zeros((7, 4)), np.zeros((7, 4)), ridge=0.0, iterations=500)
    assert rec.softmax_kl(f, p, b) < 1e-7
    # softmax is shift invariant per row: the recovered logits equal the true ones up to a constant
    z, zt = f @ b, f @ b_true
    np.testing.assert_allclose(z - z.mean(1, keepdims=True), zt - zt.mean(1, keepdims=True), atol=1e-3)


def test_softmax_head_is_fitted_to_the_probabilities():
    """d1 → relu → d2 → softmax; d1's units pruned: d2 (the head) is refit on the KL to the original's
    probabilities, which lowers the KL below the least-squares refit's."""
    n = Net((None, 8))
    y = n.op("r1", "Relu", n.op("d1/BiasAdd", "BiasAdd", n.op("d1/MatMul", "MatMul", n.x, n.w("d1/kernel", (8, 12))),
                                n.w("d1/bias", (12,), 0.3)))
    logits = n.op("d2/BiasAdd", "BiasAdd", n.op("d2/MatMul", "MatMul", y, n.w("d2/kernel", (12, 5), 2.0)),
                  n.w("d2/bias", (5,), 0.3))
    g = n.done(n.op("softmax", "Softmax", logits))
    data = n.data(400)
    original, h, changes, kept, layers = _prune(g, [("d1/MatMul:0", 1, [0, 2, 3, 7, 9])])
    h_ls = h.copy()
    fits = fit_layers(h, original, layers, data, kept, refit=True)
    f = fits["d2/MatMul"]
    assert "softmax head" in f.note and f.error_after < f.error_before
    ref = run(original, data)["y0"]

    def kl(q):
        q = np.maximum(q.astype(np.float64), 1e-30)
        r = np.maximum(ref.astype(np.float64), 1e-30)
        return float(np.mean(np.sum(r * (np.log(r) - np.log(q)), axis=1)))

    # the least-squares refit alone (the head as a plain layer)
    fits_ls = fit_layers(h_ls, original, layers, data, kept, refit=True, softmax_heads=False)
    assert "softmax" not in fits_ls["d2/MatMul"].note
    assert kl(run(h, data)["y0"]) < 0.8 * kl(run(h_ls, data)["y0"])
