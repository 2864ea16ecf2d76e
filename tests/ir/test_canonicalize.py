"""Grouped Conv2D is rewritten exactly into ops TensorFlow's CPU kernels run."""

import numpy as np
import pytest
import tensorflow as tf

from graphslim.ir.canonicalize import canonicalize
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.runtime import run


def grouped(cin, fin, cout, stride=1):
    rng = np.random.RandomState(0)
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 7, 7, cin)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    w = g.add_weight("conv/kernel", rng.randn(3, 3, fin, cout).astype("f"))
    c = g.add_node("conv/Conv2D", "Conv2D", inputs=["x", w], attrs={
        "T": tf.float32, "strides": [1, stride, stride, 1], "padding": "SAME"})
    g.outputs.append(SignatureArg("y", g.add_node("relu", "Relu", inputs=[c], attrs={"T": tf.float32}).output(0)))
    g.infer_shapes()
    return g


def reference(x, w, groups, stride):
    xs = np.split(x, groups, axis=3)
    ws = np.split(w, groups, axis=3)
    outs = [tf.nn.conv2d(a, b, strides=stride, padding="SAME").numpy() for a, b in zip(xs, ws)]
    return np.maximum(np.concatenate(outs, axis=3), 0)


@pytest.mark.parametrize("cin,fin,cout,stride,op", [
    (4, 1, 8, 1, "DepthwiseConv2dNative"),  # groups == channels (ConvNeXt): depthwise, multiplier 2
    (6, 2, 6, 2, "Split"),                  # 3 groups of 2 channels
])
def test_grouped_conv_rewritten_exactly(cin, fin, cout, stride, op):
    g = grouped(cin, fin, cout, stride)
    canonicalize(g)
    g.verify()
    assert g.nodes(op=op) and g.weights["conv/kernel"].value.shape == (3, 3, fin, cout)
    x = np.random.RandomState(1).randn(2, 7, 7, cin).astype("f")
    want = reference(x, g.weights["conv/kernel"].value, cin // fin, stride)
    np.testing.assert_allclose(run(g, {"x": x})["y"], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- tensordot (Keras Dense on 4-D)
@pytest.fixture(scope="module")
def dense4d(tmp_path_factory):
    """Keras 3 Dense layers on a 4-D activation (ConvNeXt's pointwise convs): tf.tensordot, whose
    reshape targets and transpose permutation are computed from Shape at run time. Two exports: static
    spatial size, and dynamic (None, None)."""
    import keras

    paths = {}
    for size in (6, None):
        keras.utils.set_random_seed(0)
        x = inp = keras.Input((size, size, 3), name="image")
        x = keras.layers.Conv2D(8, 3, padding="same")(x)
        x = keras.layers.Dense(16, activation="gelu", name="expand")(x)
        x = keras.layers.Dense(8, name="project")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        out = keras.layers.Dense(4, name="head")(x)
        path = tmp_path_factory.mktemp("dense4d") / f"size_{size}"
        keras.Model(inp, out).export(str(path), verbose=False)
        paths[size] = path
    return paths


def test_tensordot_shapes_become_static_and_prunable(dense4d, tmp_path):
    import graphslim
    from graphslim.testing import assert_close, run_saved_model

    g = graphslim.load(dense4d[6])
    assert not g.nodes(op=("Shape", "GatherV2", "Prod", "Transpose")), "the shape computation must be gone"
    reshapes = g.nodes(op="Reshape")
    assert reshapes and all(g.producer(g.input(r, 1)).op == "Const" for r in reshapes)
    x = {"image": np.random.RandomState(0).rand(3, 6, 6, 3).astype("f")}
    expected = run_saved_model(dense4d[6], x)
    assert_close(run_saved_model(graphslim.save(g, tmp_path / "rt"), x), expected, rtol=1e-6, atol=1e-6)
    # the hidden units between the two Dense layers are now one prunable group; zero units prune exactly
    k, b = g.weights["expand/kernel"].value.copy(), g.weights["expand/bias"].value.copy()
    k[:, [1, 5, 6, 12]] = 0
    b[[1, 5, 6, 12]] = 0
    g.set_weight("expand/kernel", k)
    g.set_weight("expand/bias", b)
    before = run(g, x)
    rep = graphslim.run_pipeline(g, "prune{threshold=0}")
    assert g.weights["expand/kernel"].value.shape == (8, 12)
    assert g.weights["project/kernel"].value.shape == (12, 8)
    assert rep.passes[0]["stats"]["pruned_groups"] >= 1
    assert_close(run(g, x), before, rtol=1e-5, atol=1e-5)
    assert_close(run_saved_model(graphslim.save(g, tmp_path / "pruned"), x), before, rtol=1e-5, atol=1e-5)


def test_tensordot_with_dynamic_spatial_dims_is_left_dynamic(dense4d, tmp_path):
    import graphslim
    from graphslim.testing import assert_close, run_saved_model

    g = graphslim.load(dense4d[None])
    assert g.nodes(op="Shape"), "a target with unknown height and width must stay computed"
    for size in (5, 9):
        x = {"image": np.random.RandomState(size).rand(2, size, size, 3).astype("f")}
        assert_close(run_saved_model(graphslim.save(g, tmp_path / f"rt{size}", force=True), x),
                     run_saved_model(dense4d[None], x), rtol=1e-6, atol=1e-6)
    # the Dense units between the two layers prune through the computed Reshape targets too (their
    # constant part is rebuilt); zeroed units prune exactly at any height and width
    k, b = g.weights["expand/kernel"].value.copy(), g.weights["expand/bias"].value.copy()
    k[:, [1, 5, 6, 12]] = 0
    b[[1, 5, 6, 12]] = 0
    g.set_weight("expand/kernel", k)
    g.set_weight("expand/bias", b)
    xs = [{"image": np.random.RandomState(size).rand(2, size, size, 3).astype("f")} for size in (5, 9)]
    before = [run(g, x) for x in xs]
    graphslim.run_pipeline(g, "prune{threshold=0}")
    assert g.weights["expand/kernel"].value.shape == (8, 12) and g.nodes(op="Shape")
    saved = graphslim.save(g, tmp_path / "pruned")
    for x, ref in zip(xs, before):
        assert_close(run_saved_model(saved, x), ref, rtol=1e-5, atol=1e-5)


def _shape_graph(parts_fn):
    """x [None, 4, 4, 6] → Reshape(x, <computed target>) → y; ``parts_fn(g, shape_tensor)`` builds the
    target from Shape(x)."""
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 4, 4, 6)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    shp = g.add_node("shape", "Shape", inputs=["x"], attrs={"T": tf.float32, "out_type": tf.int32})
    target = parts_fn(g, shp.output(0))
    r = g.add_node("r", "Reshape", inputs=["x", target], attrs={"T": tf.float32, "Tshape": tf.int32})
    g.outputs.append(SignatureArg("y", r.output(0)))
    g.infer_shapes()
    return g


def _c(g, name, value):
    return g.add_node(name, "Const", attrs={"dtype": tf.int32, "value": np.array(value, np.int32)}).output(0)


def _gather_concat(idx, tail, axis=0):
    def build(g, shp):
        gat = g.add_node("gather", "GatherV2", inputs=[shp, _c(g, "idx", idx), _c(g, "gaxis", 0)],
                         attrs={"Tparams": tf.int32, "Tindices": tf.int32, "Taxis": tf.int32})
        return g.add_node("concat", "ConcatV2", inputs=[gat, _c(g, "tail", tail), _c(g, "caxis", axis)],
                          attrs={"T": tf.int32, "N": 2, "Tidx": tf.int32}).output(0)
    return build


@pytest.mark.parametrize("build,static", [
    (_gather_concat([0, 1], [24]), True),       # [N, 4, 24]: made constant [-1, 4, 24]
    (_gather_concat([0], [4, 4, 6]), True),
    (_gather_concat([-3, 1], [24]), False),     # a negative index fails at run time: left alone
    (_gather_concat([0, 7], [24]), False),      # out of range
])
def test_computed_reshape_targets(build, static):
    g = _shape_graph(build)
    x = np.random.RandomState(0).randn(2, 4, 4, 6).astype("f")
    try:
        before = run(g, {"x": x})
    except Exception:  # noqa: BLE001 - TensorFlow refuses the graph: it must stay refused
        before = None
    canonicalize(g)
    r = g.node("r")
    assert (g.producer(g.input(r, 1)).op == "Const") == static
    assert bool(g.nodes(op="Shape")) != static  # the shape computation goes with the rewrite
    if before is not None:
        np.testing.assert_array_equal(run(g, {"x": x})["y"], before["y"])
    else:
        with pytest.raises(Exception):
            run(g, {"x": x})


def test_tensordot_macs_count_every_position(dense4d):
    """Dense on [N, 6, 6, 8] is 36 positions × 8 × 16 MACs per example, not 8 × 16."""
    import graphslim

    g = graphslim.load(dense4d[6])
    cost = {c.name: c.macs for c in g.cost().nodes}
    expand = next(n.name for n in g.nodes(op="MatMul") if g.weight_of(n, 1).name == "expand/kernel")
    head = next(n.name for n in g.nodes(op="MatMul") if g.weight_of(n, 1).name == "head/kernel")
    assert cost[expand] == 6 * 6 * 8 * 16
    assert cost[head] == 8 * 4  # after pooling: one row per example
