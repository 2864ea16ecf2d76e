import collections
import re

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

import graphslim
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.runtime import run
from graphslim.testing import assert_close, fixture_io, fixture_path, run_saved_model

F = {"T": tf.float32}


def _keras_bn_graph(scale: bool = True, center: bool = True, rank: int = 4, extra_reader: bool = False,
                    conv_bias: bool = False, reshaped: bool = False):
    """Conv (or MatMul) → the arithmetic tf.nn.batch_normalization writes for Keras 3 → Relu."""
    rng = np.random.RandomState(0)
    g = Graph()
    shape = (None, 6, 6, 3) if rank == 4 else (None, 3)
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": shape})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    if rank == 4:
        k = g.add_weight("conv/kernel", rng.randn(3, 3, 3, 4).astype("f"))
        y = g.add_node("conv/op", "Conv2D", inputs=["x", k], attrs={**F, "strides": [1, 1, 1, 1], "padding": "SAME"})
        if conv_bias:
            y = g.add_node("conv/BiasAdd", "BiasAdd", inputs=[y, g.add_weight("conv/bias", rng.randn(4).astype("f"))],
                           attrs=F)
    else:
        k = g.add_weight("dense/kernel", rng.randn(3, 4).astype("f"))
        y = g.add_node("dense/op", "MatMul", inputs=["x", k], attrs=F)
    def param(name, value, trainable=True):
        w = g.add_weight(name, value.astype("f"), trainable=trainable)
        if not reshaped:  # Keras with an explicit axis=3 (ResNet50) reshapes the parameters to [1, 1, 1, C]
            return w
        shape = g.add_node(f"{name}/shape", "Const", attrs={"dtype": tf.int32, "value": np.array([1, 1, 1, 4], np.int32)})
        return g.add_node(f"{name}/Reshape", "Reshape", inputs=[w, shape], attrs=F)

    mean = param("bn/moving_mean", rng.randn(4), trainable=False)
    var = param("bn/moving_variance", rng.rand(4) + .5, trainable=False)
    eps = g.add_node("bn/add/y", "Const", attrs={"dtype": tf.float32, "value": np.array(1.001e-5, np.float32)})
    inv = g.add_node("bn/Rsqrt", "Rsqrt", inputs=[g.add_node("bn/add", "AddV2", inputs=[var, eps], attrs=F)], attrs=F)
    if scale:
        gamma = param("bn/gamma", rng.rand(4) + .5)
        inv = g.add_node("bn/mul", "Mul", inputs=[inv, gamma], attrs=F)
    m1 = g.add_node("bn/mul_1", "Mul", inputs=[y, inv], attrs=F)
    m2 = g.add_node("bn/mul_2", "Mul", inputs=[mean, inv], attrs=F)
    if center:
        beta = param("bn/beta", rng.randn(4))
        shift = g.add_node("bn/sub", "Sub", inputs=[beta, m2], attrs=F)
    else:
        shift = g.add_node("bn/Neg", "Neg", inputs=[m2], attrs=F)
    out = g.add_node("bn/add_1", "AddV2", inputs=[m1, shift], attrs=F)
    g.outputs.append(SignatureArg("y", g.add_node("relu", "Relu", inputs=[out], attrs=F).output(0)))
    if extra_reader:  # a second reader of x * inv: the Mul must stay
        g.outputs.append(SignatureArg("scaled", g.add_node("tanh", "Tanh", inputs=[m1], attrs=F).output(0)))
    g.infer_shapes()
    return g


@pytest.mark.parametrize("scale,center", [(True, True), (False, True), (True, False), (False, False)])
def test_fuse_is_exact_and_keeps_the_variables(scale, center):
    g = _keras_bn_graph(scale, center)
    x = np.random.RandomState(1).randn(2, 6, 6, 3).astype("f")
    before = run(g, {"x": x})
    weights = {n: (w.value.copy(), w.trainable) for n, w in g.weights.items()}
    rep = graphslim.run_pipeline(g, "fuse-batchnorm")
    assert rep.passes[0]["stats"]["fused"] == 1
    bn, = g.nodes(op="FusedBatchNormV3")
    assert not bn.attr("is_training") and bn.attr("epsilon") == pytest.approx(1.001e-5)
    assert not g.nodes(op=("Rsqrt", "Mul", "Sub", "Neg", "AddV2")), "the element-wise batch norm must be gone"
    # same variables, same values, same trainable flags: nothing is folded
    assert {n: (w.value.tolist(), w.trainable) for n, w in g.weights.items()} == \
        {n: (v.tolist(), t) for n, (v, t) in weights.items()}
    assert_close(run(g, {"x": x}), before, rtol=1e-5, atol=1e-5)


def test_conv_bias_moves_into_the_mean_and_the_runtime_fuses_it(tmp_path):
    """Conv2D → BiasAdd → batch norm with [1, 1, 1, C] parameters (Keras ResNet50): the bias is read by
    ``mean − bias`` so that Conv2D meets the batch norm directly, and TensorFlow fuses the two."""
    g = _keras_bn_graph(conv_bias=True, reshaped=True)
    x = np.random.RandomState(1).randn(2, 6, 6, 3).astype("f")
    before = run(g, {"x": x})
    names = {n: w.trainable for n, w in g.weights.items()}
    rep = graphslim.run_pipeline(g, "fuse-batchnorm")
    assert rep.passes[0]["stats"]["fused"] == 1
    assert not g.nodes(op=("BiasAdd", "Reshape", "Rsqrt", "Mul"))
    bn, = g.nodes(op="FusedBatchNormV3")
    assert g.producer(g.input(bn, 0)).op == "Conv2D"
    assert {n: w.trainable for n, w in g.weights.items()} == names  # the bias is still a trainable variable
    assert_close(run(g, {"x": x}), before, rtol=1e-5, atol=1e-5)
    out = graphslim.save(g, tmp_path / "fused")
    assert_close(run_saved_model(out, {"x": x}), before, rtol=1e-5, atol=1e-5)
    ops = _runtime_ops(out, {"x": x})
    assert ops["_FusedConv2D"] == 1 and ops["FusedBatchNormV3"] + ops["Conv2D"] + ops["BiasAdd"] == 0, dict(ops)


def _generic_op(op: str) -> str:
    """The op TensorFlow's oneDNN build (TF_ENABLE_ONEDNN_OPTS, on by default on x86) runs under another
    name, by that op's name: _MklNativeFusedConv2D (_MklFusedConv2D with oneDNN's blocked layouts) is a
    _FusedConv2D, _MklNativeConv2D a Conv2D, _MklNativeFusedBatchNormV3 a FusedBatchNormV3. oneDNN-only
    fusions (_MklNativeConv2DWithBias: Conv2D + BiasAdd, no batch norm) keep their own name."""
    m = re.fullmatch(r"_Mkl(?:Native)?(\w+)", op)
    if m is None:
        return op
    for generic in (m.group(1), "_" + m.group(1)):
        if op_def_registry.get(generic) is not None:
            return generic
    return op


def _runtime_ops(path, inputs) -> collections.Counter:
    """Op counts of the graph TensorFlow actually runs (after grappler) for a SavedModel's signature,
    oneDNN's ops counted as the ops they stand for (see _generic_op)."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.load(sess, ["serve"], str(path))
        sig = meta.signature_def["serving_default"]
        feed = {sig.inputs[k].name: v for k, v in inputs.items()}
        md = tf.compat.v1.RunMetadata()
        sess.run([t.name for t in sig.outputs.values()], feed,
                 options=tf.compat.v1.RunOptions(output_partition_graphs=True), run_metadata=md)
    return collections.Counter(_generic_op(n.op) for pg in md.partition_graphs for n in pg.node)


def test_rank2_and_shared_intermediates_are_left_alone():
    g = _keras_bn_graph(rank=2)
    assert not graphslim.run_pipeline(g, "fuse-batchnorm").passes[0]["changed"]
    g = _keras_bn_graph(extra_reader=True)
    x = np.random.RandomState(1).randn(2, 6, 6, 3).astype("f")
    before = run(g, {"x": x})
    st = graphslim.run_pipeline(g, "fuse-batchnorm").passes[0]["stats"]
    assert st["fused"] == 0 and st["skipped"] == 1
    assert_close(run(g, {"x": x}), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet_digits", "mobilenet_tiny"])
def test_fixture_exact_after_emit_and_runtime_fuses_conv_bn(name, tmp_path):
    g = graphslim.load(fixture_path(name))
    inputs, expected = fixture_io(name)
    n_bn = len(g.nodes(op="Rsqrt"))
    names = set(g.weights)
    rep = graphslim.run_pipeline(g, "fuse-batchnorm,dce")
    assert rep.passes[0]["stats"]["fused"] == n_bn > 0
    assert set(g.weights) == names
    out = graphslim.save(g, tmp_path / "fused")
    assert_close(run_saved_model(out, inputs), expected, rtol=1e-5, atol=1e-5)
    # the point of the pass: TensorFlow's grappler now fuses each Conv2D with its batch norm
    ops = _runtime_ops(out, inputs)
    # (a batch norm after a depthwise conv stays a FusedBatchNormV3: one pass instead of two)
    assert ops["Rsqrt"] == ops["Conv2D"] == 0, dict(ops)
    assert ops["_FusedConv2D"] == len(g.nodes(op="Conv2D")) > 0, dict(ops)


def test_prune_after_fuse_keeps_batchnorm_variables_in_step():
    g = graphslim.load(fixture_path("resnet_digits"))
    inputs, expected = fixture_io("resnet_digits")
    graphslim.run_pipeline(g, "fuse-batchnorm,prune{ratio=0.5}")
    for bn in g.nodes(op="FusedBatchNormV3"):
        c = g.shape(g.input(bn, 0))[3]
        assert all(g.shape(t) == (c,) for t in g.inputs_of(bn)[1:]), bn.name
    got = run(g, inputs)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
