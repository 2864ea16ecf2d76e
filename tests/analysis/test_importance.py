"""Importance criteria (graphslim/analysis/importance.py): registry, each built-in criterion against a
direct numpy computation on small graphs, ThiNet / least-squares greedy orders against brute force,
and the channel-contribution Gram matrix against per-channel convolutions."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from graphslim.analysis.calibration import ConvGeometry
from graphslim.analysis.channels import group_for
from graphslim.analysis.importance import (CRITERIA, ChannelGram, get_criterion, importance, lsq_order,
                                           score_groups, thinet_order)
from graphslim.errors import PassError
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

    def w(self, name, value):
        return self.g.add_weight(name, np.asarray(value, np.float32)).output(0)

    def op(self, name, op, *inputs, **attrs):
        attrs.setdefault("T", F)
        return self.g.add_node(name, op, inputs=list(inputs), attrs=attrs).output(0)

    def conv(self, name, x, kernel, bias=None, padding="SAME"):
        y = self.op(f"{name}/Conv2D", "Conv2D", x, self.w(f"{name}/kernel", kernel), strides=[1, 1, 1, 1],
                    padding=padding)
        if bias is not None:
            y = self.op(f"{name}/BiasAdd", "BiasAdd", y, self.w(f"{name}/bias", bias))
        return y

    def done(self, *outs):
        for i, t in enumerate(outs):
            self.g.outputs.append(SignatureArg(f"y{i}", t))
        self.g.infer_shapes()
        return self.g

    def data(self, n=16, seed=1):
        shape = tuple(n if d is None else d for d in self.shape)
        return {"x": np.random.RandomState(seed).randn(*shape).astype("f")}


def _chain(seed=0, k1=None, b1=None, k2=None):
    """x[5,5,3] → c1 (3→4) → relu → c2 (4→2) → output."""
    n = Net((None, 5, 5, 3), seed)
    rng = n.rng
    k1 = rng.randn(3, 3, 3, 4) if k1 is None else k1
    b1 = rng.randn(4) * 0.1 if b1 is None else b1
    k2 = rng.randn(3, 3, 4, 2) if k2 is None else k2
    y = n.op("r1", "Relu", n.conv("c1", n.x, k1, b1))
    g = n.done(n.conv("c2", y, k2, np.zeros(2)))
    return n, g


# ------------------------------------------------------------------------------------------ registry
def test_builtin_criteria_are_registered():
    assert {"l1", "l2", "bn", "activation", "apoz", "thinet", "lsq"} <= set(CRITERIA)
    assert get_criterion("thinet").needs_data and get_criterion("thinet").cumulative
    assert not get_criterion("l1").needs_data and not get_criterion("l1").cumulative


def test_unknown_criterion_lists_the_registered_ones():
    with pytest.raises(PassError, match=r"unknown importance criterion 'l3'; did you mean 'l[12]'.*thinet"):
        get_criterion("l3")


def test_registering_a_taken_name_needs_replace():
    @importance("test-const", help="constant")
    def const(ctx, group):
        return np.ones(group.size)

    try:
        with pytest.raises(PassError, match="already registered"):
            @importance("test-const")
            def other(ctx, group):
                return np.zeros(group.size)

        @importance("test-const", replace=True)
        def other2(ctx, group):
            return np.arange(group.size)

        _, g = _chain()
        grp = group_for(g, "c1/Conv2D:0", 3)
        scores, _ = score_groups(g, [grp], "test-const")
        assert scores[grp.id].tolist() == [0, 1, 2, 3]
    finally:
        CRITERIA.pop("test-const", None)


def test_a_criterion_returning_the_wrong_length_is_an_error():
    CRITERIA.pop("test-bad", None)

    @importance("test-bad")
    def bad(ctx, group):
        return np.ones(group.size + 1)

    try:
        _, g = _chain()
        with pytest.raises(PassError, match="returned 5 scores for group"):
            score_groups(g, [group_for(g, "c1/Conv2D:0", 3)], "test-bad")
    finally:
        CRITERIA.pop("test-bad", None)


# ------------------------------------------------------------------------------------------ norms
@pytest.mark.parametrize("crit", ["l1", "l2"])
def test_filter_norms(crit):
    _, g = _chain()
    grp = group_for(g, "c1/Conv2D:0", 3)
    k = g.weight("c1/kernel").value.astype(np.float64)
    norms = np.abs(k).sum((0, 1, 2)) if crit == "l1" else np.sqrt(np.square(k).sum((0, 1, 2)))
    scores, _ = score_groups(g, [grp], crit)
    np.testing.assert_allclose(scores[grp.id], norms / norms.mean(), rtol=1e-6)


def test_residual_group_sums_normalized_norms_of_all_sources():
    n = Net((None, 4, 4, 2))
    rng = n.rng
    y = n.op("r1", "Relu", n.conv("c1", n.x, rng.randn(1, 1, 2, 3)))
    s = n.op("add", "AddV2", n.conv("c2", y, 100 * rng.randn(1, 1, 3, 3)), y)  # c2's norms 100x larger
    g = n.done(n.conv("c3", n.op("r2", "Relu", s), rng.randn(1, 1, 3, 2)))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert len(grp.sources) == 2
    scores, _ = score_groups(g, [grp], "l1")
    want = 0
    for name in ("c1/kernel", "c2/kernel"):
        v = np.abs(g.weight(name).value.astype(np.float64)).sum((0, 1, 2))
        want = want + v / v.mean()  # each source counts equally, whatever its scale
    np.testing.assert_allclose(scores[grp.id], want, rtol=1e-6)


# ------------------------------------------------------------------------------------------ bn
def _bn_net(fused, reshape_gamma=False):
    n = Net((None, 4, 4, 2))
    gamma = np.array([0.5, -3.0, 0.1, 2.0], np.float32)
    y = n.conv("c1", n.x, n.rng.randn(1, 1, 2, 4))
    ws = [n.w(f"bn/{p}", v) for p, v in (("gamma", gamma), ("beta", np.zeros(4)), ("moving_mean", np.zeros(4)),
                                          ("moving_variance", np.ones(4)))]
    if fused:
        y = n.op("bn", "FusedBatchNormV3", y, *ws, U=F, epsilon=1e-3, is_training=False)
    else:  # Keras 3 arithmetic
        eps = n.g.add_node("bn/eps", "Const", attrs={"dtype": F, "value": np.array(1e-3, np.float32)}).output(0)
        scale = n.op("bn/mul", "Mul", n.op("bn/rsqrt", "Rsqrt", n.op("bn/add", "AddV2", ws[3], eps)), ws[0])
        shift = n.op("bn/sub", "Sub", ws[1], n.op("bn/mul_2", "Mul", ws[2], scale))
        y = n.op("bn/add_1", "AddV2", n.op("bn/mul_1", "Mul", y, scale), shift)
    g = n.done(n.conv("c2", n.op("r", "Relu", y), n.rng.randn(1, 1, 4, 2)))
    return g, gamma


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "keras3"])
def test_bn_scores_are_abs_gamma(fused):
    g, gamma = _bn_net(fused)
    grp = group_for(g, "c1/Conv2D:0", 3)
    scores, notes = score_groups(g, [grp], "bn")
    np.testing.assert_allclose(scores[grp.id], np.abs(gamma) / np.abs(gamma).mean(), rtol=1e-6)
    assert not notes


def test_bn_without_batch_norm():
    g, _ = _bn_net(True)
    plain = group_for(g, "c2/Conv2D:0", 3)  # the output group has no batch norm: falls back, says so
    scores, notes = score_groups(g, [plain], "bn")
    assert scores[plain.id].shape == (2,) and "no batch norm" in notes[0] and "l1" in notes[0]
    _, h = _chain()
    with pytest.raises(PassError, match="needs batch norms.*fold-batchnorm"):
        score_groups(h, [group_for(h, "c1/Conv2D:0", 3)], "bn")


# ------------------------------------------------------------------------------------------ activations
def test_activation_and_apoz_on_calibration_data():
    rng = np.random.RandomState(0)
    k1 = rng.randn(3, 3, 3, 4)
    k1[..., 2] = 0.0  # channel 2 is dead after the ReLU (bias < 0)
    b1 = np.array([0.1, 0.0, -1.0, 0.3])
    n, g = _chain(k1=k1, b1=b1)
    data = n.data(32)
    grp = group_for(g, "c1/Conv2D:0", 3)
    act = run(g, data, fetch=["r1:0"])["r1:0"].astype(np.float64)
    mean_abs = np.abs(act).mean((0, 1, 2))
    nonzero = 1 - (act == 0).mean((0, 1, 2))
    scores, _ = score_groups(g, [grp], "activation", data=data)
    np.testing.assert_allclose(scores[grp.id], mean_abs / mean_abs.mean(), rtol=1e-5)
    scores, _ = score_groups(g, [grp], "apoz", data=data)
    np.testing.assert_allclose(scores[grp.id], nonzero / nonzero.mean(), rtol=1e-5)
    assert scores[grp.id][2] == 0
    with pytest.raises(PassError, match="needs calibration data"):
        score_groups(g, [grp], "activation")


# ------------------------------------------------------------------------------------------ thinet
def _brute_gram(x, kernel, labels, size):
    """Per group channel: the conv of x restricted to that channel's input positions (SAME padding)."""
    ys = []
    for c in range(size):
        mask = (labels == c).astype(np.float32)
        ys.append(tf.nn.conv2d(x * mask, kernel, 1, "SAME").numpy().astype(np.float64).reshape(-1))
    y = np.stack(ys, 1)
    full = tf.nn.conv2d(x, kernel, 1, "SAME").numpy().astype(np.float64)
    return y.T @ y, float(np.square(full).sum())


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [0, 0, 1, 1, 2, 2, -1]], ids=["identity", "multiplier+other"])
def test_channel_gram_is_exact_with_all_positions_and_outputs(labels):
    labels = np.array(labels)
    rng = np.random.RandomState(0)
    cin, size = len(labels), labels.max() + 1
    x = rng.randn(3, 5, 5, cin).astype("f")
    kernel = rng.randn(3, 3, cin, 4).astype("f")
    acc = ChannelGram(kernel.reshape(-1, 4), labels, size, ConvGeometry(3, 3, padding="SAME"), positions=None,
                      outputs=4)
    acc.update(x[:2])
    acc.update(x[2:])
    want, power = _brute_gram(x, kernel, labels, size)
    np.testing.assert_allclose(acc.gram, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(acc.power, power, rtol=1e-4)
    assert acc.count == 3 * 25 * 4


def test_channel_gram_dense_and_sampled_outputs_are_unbiased():
    rng = np.random.RandomState(1)
    x = rng.randn(4000, 6)
    w = rng.randn(6, 40)
    exact = ChannelGram(w, np.arange(6), 6, outputs=40)
    exact.update(x)
    y = x[:, None, :] * w.T[None]  # [n, out, in]: contributions
    want = np.einsum("noc,nod->cd", y, y)
    np.testing.assert_allclose(exact.gram, want, rtol=1e-8)
    sampled = ChannelGram(w, np.arange(6), 6, outputs=10, rng=np.random.default_rng(0))
    sampled.update(x)
    scale = exact.count / sampled.count
    np.testing.assert_allclose(sampled.gram * scale, want, rtol=0.2, atol=0.05 * np.abs(want).max())


def _random_gram(n, seed):
    y = np.random.RandomState(seed).randn(50, n) * np.linspace(0.2, 2, n)
    y[:, 3] = -0.8 * y[:, 1] + 0.05 * y[:, 3]  # a nearly redundant (cancelling) channel
    return y.T @ y


def test_thinet_order_is_the_greedy_of_the_objective():
    g = _random_gram(6, 0)
    order, errs = thinet_order(g)
    removed = []
    for step, c in enumerate(order):
        rest = [j for j in range(6) if j not in removed]
        costs = {j: np.ones(len(removed) + 1) @ g[np.ix_(removed + [j], removed + [j])] @ np.ones(len(removed) + 1)
                 for j in rest}
        assert c == min(costs, key=costs.get)
        removed.append(c)
        np.testing.assert_allclose(errs[step], costs[c], rtol=1e-9)


def _ls_residual(g, kept):
    """min_β ‖Σ_all y − Σ_kept β y‖² from the Gram matrix."""
    b = g.sum(1)
    if not kept:
        return float(b.sum())
    gk = g[np.ix_(kept, kept)]
    return float(b.sum() - b[kept] @ np.linalg.solve(gk, b[kept]))


def test_lsq_order_is_backward_elimination_with_exact_residuals():
    g = _random_gram(6, 2)
    order, errs = lsq_order(g, ridge=0.0)
    kept = list(range(6))
    for step, c in enumerate(order[:-1]):
        cands = {j: _ls_residual(g, [k for k in kept if k != j]) for j in kept}
        assert cands[c] == pytest.approx(min(cands.values()), rel=1e-6, abs=1e-9)
        kept.remove(c)
        assert errs[step] == pytest.approx(_ls_residual(g, kept), rel=1e-6, abs=1e-8)
    # the cancelling pair: with rescaling, channel 3 is almost free to remove (−0.8 · channel 1)
    assert order[0] in (1, 3)
    # best single removal by brute force
    best = min(range(6), key=lambda j: _ls_residual(g, [k for k in range(6) if k != j]))
    assert order[0] == best
    assert all(e >= 0 for e in errs)


@pytest.mark.parametrize("crit", ["thinet", "lsq"])
def test_data_criteria_put_a_channel_nobody_reads_first(crit):
    rng = np.random.RandomState(3)
    k2 = rng.randn(3, 3, 4, 2)
    k2[:, :, 1, :] = 0.0  # channel 1 feeds nothing
    n, g = _chain(k2=k2)
    grp = group_for(g, "c1/Conv2D:0", 3)
    scores, notes = score_groups(g, [grp], crit, data=n.data(16), positions=None)
    assert int(np.argmin(scores[grp.id])) == 1 and scores[grp.id][1] < 1e-5  # (lsq: a 1e-6 ridge)
    assert np.all(np.diff(np.sort(scores[grp.id])) >= 0) and not notes


def test_thinet_on_flatten_dense_sink_matches_brute_force():
    """Group channels spread over many positions of a Dense kernel (Flatten): the Gram matrix sums
    each channel's positions."""
    n = Net((None, 2, 2, 1))
    y = n.op("r1", "Relu", n.conv("c1", n.x, n.rng.randn(1, 1, 1, 3), np.zeros(3)))
    shape = n.g.add_node("flat/shape", "Const", attrs={"dtype": tf.int32, "value": np.array([-1, 12], np.int32)})
    flat = n.op("flat", "Reshape", y, shape.output(0), Tshape=tf.int32)
    w = n.rng.randn(12, 5).astype("f")
    g = n.done(n.op("d", "MatMul", flat, n.w("d/kernel", w)))
    grp = group_for(g, "c1/Conv2D:0", 3)
    data = n.data(64)
    from graphslim.analysis.importance import _thinet_requests, ImportanceContext

    ctx = ImportanceContext(g, data, positions=None)
    (key, (tensor, acc)), = _thinet_requests(ctx, grp).items()
    acc.outputs = 5
    xs = run(g, data, fetch=[tensor])[tensor].astype(np.float64)
    acc.update(xs)
    labels = np.arange(12) % 3
    y = np.stack([(xs * (labels == c)) @ w for c in range(3)], -1).reshape(-1, 3)
    np.testing.assert_allclose(acc.gram, y.T @ y, rtol=1e-6)


def test_all_builtin_criteria_run_on_every_group_of_a_block():
    """l1, l2, activation, apoz, thinet, lsq on every group of a small residual net give finite scores."""
    n = Net((None, 6, 6, 2))
    rng = n.rng
    r = n.op("r1", "Relu", n.conv("c1", n.x, rng.randn(3, 3, 2, 4), rng.randn(4)))
    s = n.op("add", "AddV2", n.conv("c2", r, rng.randn(3, 3, 4, 4), rng.randn(4)), r)
    g = n.done(n.conv("c3", n.op("r2", "Relu", s), rng.randn(1, 1, 4, 3)))
    from graphslim.analysis.channels import channel_groups

    groups = [grp for grp in channel_groups(g) if grp.prunable]
    for crit in ("l1", "l2", "activation", "apoz", "thinet", "lsq"):
        scores, _ = score_groups(g, groups, crit, data=n.data(8))
        for grp in groups:
            assert scores[grp.id].shape == (grp.size,) and np.isfinite(scores[grp.id]).all(), crit


def test_thinet_greedy_beats_random_subsets_on_its_objective():
    g = _random_gram(7, 5)
    order, errs = thinet_order(g)
    k = 3
    greedy = errs[k - 1]
    worse = sum(np.ones(k) @ g[np.ix_(list(s), list(s))] @ np.ones(k) >= greedy - 1e-9
                for s in itertools.combinations(range(7), k))
    assert worse >= 0.8 * len(list(itertools.combinations(range(7), k)))
