import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.runtime import run
from graphslim.testing import fixture_io, fixture_path, assert_close


def _bn_graph(op, with_bias, fused, fmt="NHWC"):
    rng = np.random.RandomState(0)
    g = Graph()
    shape = (None, 6, 6, 3) if fmt == "NHWC" else (None, 3, 6, 6)
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": shape})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    if op == "Conv2D":
        k = g.add_weight("l/kernel", rng.randn(3, 3, 3, 4).astype("f"))
        strides = [1, 1, 1, 1]
        y = g.add_node("l/op", "Conv2D", inputs=["x", k], attrs={"T": tf.float32, "strides": strides,
                                                                 "padding": "SAME", "data_format": fmt})
        c = 4
    elif op == "DepthwiseConv2dNative":
        k = g.add_weight("l/kernel", rng.randn(3, 3, 3, 2).astype("f"))
        y = g.add_node("l/op", op, inputs=["x", k], attrs={"T": tf.float32, "strides": [1, 1, 1, 1],
                                                           "padding": "SAME", "data_format": fmt})
        c = 6
    else:
        g.add_node("flat/shape", "Const", attrs={"dtype": tf.int32, "value": np.array([-1, 108], np.int32)})
        f = g.add_node("flat", "Reshape", inputs=["x", "flat/shape"], attrs={"T": tf.float32, "Tshape": tf.int32})
        k = g.add_weight("l/kernel", rng.randn(108, 5).astype("f"))
        y = g.add_node("l/op", "MatMul", inputs=[f, k], attrs={"T": tf.float32})
        c = 5
    if with_bias:
        b = g.add_weight("l/bias", rng.randn(c).astype("f"))
        y = g.add_node("l/BiasAdd", "BiasAdd", inputs=[y, b], attrs={"T": tf.float32, "data_format": fmt if op != "MatMul" else "NHWC"})
    gamma, beta = rng.rand(c).astype("f") + 0.5, rng.randn(c).astype("f")
    mean, var = rng.randn(c).astype("f"), rng.rand(c).astype("f") + 0.5
    names = ["bn/gamma", "bn/beta", "bn/mean", "bn/var"]
    ws = [g.add_weight(n, v) for n, v in zip(names, (gamma, beta, mean, var))]
    if fused:
        bn = g.add_node("bn/FusedBatchNormV3", "FusedBatchNormV3", inputs=[y] + ws,
                        attrs={"T": tf.float32, "U": tf.float32, "epsilon": 1e-3, "is_training": False,
                               "data_format": fmt})
    else:  # Keras 3 style arithmetic
        eps = g.add_node("bn/eps", "Const", attrs={"dtype": tf.float32, "value": np.array(1e-3, np.float32)})
        a = g.add_node("bn/add", "AddV2", inputs=[ws[3], eps], attrs={"T": tf.float32})
        r = g.add_node("bn/rsqrt", "Rsqrt", inputs=[a], attrs={"T": tf.float32})
        m = g.add_node("bn/mul", "Mul", inputs=[r, ws[0]], attrs={"T": tf.float32})
        m1 = g.add_node("bn/mul_1", "Mul", inputs=[y, m], attrs={"T": tf.float32})
        m2 = g.add_node("bn/mul_2", "Mul", inputs=[ws[2], m], attrs={"T": tf.float32})
        s = g.add_node("bn/sub", "Sub", inputs=[ws[1], m2], attrs={"T": tf.float32})
        bn = g.add_node("bn/add_1", "AddV2", inputs=[m1, s], attrs={"T": tf.float32})
    out = g.add_node("relu", "Relu", inputs=[bn.output(0)], attrs={"T": tf.float32})
    g.outputs.append(SignatureArg("y", out.output(0)))
    g.infer_shapes()
    return g


CASES = [(op, bias, fused) for op in ("Conv2D", "DepthwiseConv2dNative", "MatMul")
         for bias in (True, False) for fused in (True, False)
         if not (op == "MatMul" and fused)]  # FusedBatchNorm takes rank-4 inputs only


@pytest.mark.parametrize("op,with_bias,fused", CASES)
def test_fold_exact_and_complete(op, with_bias, fused):
    g = _bn_graph(op, with_bias, fused)
    x = np.random.RandomState(1).randn(2, 6, 6, 3).astype("f")
    before = run(g, {"x": x})
    rep = graphslim.run_pipeline(g, "fold-batchnorm")
    assert rep.passes[0]["stats"]["folded_layers"] == 1
    assert not any(w.startswith("bn/") for w in g.weights), "batch-norm weights must be gone"
    assert {n.op for n in g.nodes()} - {"Weight", "Const", "Placeholder", "Reshape"} == {op, "BiasAdd", "Relu"}
    assert "l/kernel" in g.weights  # the kernel keeps its name
    assert_close(run(g, {"x": x}), before, rtol=1e-5, atol=1e-5)


def test_fold_nchw_conv():
    g = _bn_graph("Conv2D", True, True, fmt="NCHW")
    assert len(g.nodes(op="FusedBatchNormV3")) == 1
    # NCHW Conv2D does not run on CPU: check structure and folded values against numpy instead
    k0 = g.weights["l/kernel"].value.copy()
    gamma, var = g.weights["bn/gamma"].value, g.weights["bn/var"].value
    graphslim.run_pipeline(g, "fold-batchnorm")
    scale = gamma / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(g.weights["l/kernel"].value, k0 * scale, rtol=1e-6)
    assert g.nodes(op="BiasAdd")[0].attr("data_format") == "NCHW"


@pytest.mark.parametrize("name", ["resnet_digits", "mobilenet_tiny"])
def test_fold_fixture_exact_and_removes_all_batchnorms(name):
    g = graphslim.load(fixture_path(name))
    inputs, expected = fixture_io(name)
    n_weights = len(g.weights)
    graphslim.run_pipeline(g, "fold-batchnorm,dce")
    assert not any("batch_normalization" in w for w in g.weights)
    assert len(g.weights) < n_weights
    assert not g.nodes(op=("Rsqrt", "FusedBatchNormV3"))
    assert_close(run(g, inputs), expected, rtol=1e-5, atol=1e-5)


def test_fold_leaves_shared_kernel_alone():
    g = _bn_graph("Conv2D", False, True)
    # a second reader of the kernel makes folding unsafe
    g.add_node("other", "Conv2D", inputs=["x", "l/kernel"], attrs={"T": tf.float32, "strides": [1, 1, 1, 1], "padding": "SAME"})
    g.outputs.append(SignatureArg("z", Tensor("other", 0)))
    rep = graphslim.run_pipeline(g, "fold-batchnorm")
    assert not rep.passes[0]["changed"]


def test_fold_through_channel_concat_into_each_branch():
    rng = np.random.RandomState(3)
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 5, 5, 3)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    conv = {"T": tf.float32, "strides": [1, 1, 1, 1], "padding": "SAME"}
    k1 = g.add_weight("a/kernel", rng.randn(1, 1, 3, 4).astype("f"))
    b1 = g.add_weight("a/bias", rng.randn(4).astype("f"))
    y1 = g.add_node("a/BiasAdd", "BiasAdd", inputs=[g.add_node("a/conv", "Conv2D", inputs=["x", k1], attrs=conv), b1],
                    attrs={"T": tf.float32})
    k2 = g.add_weight("b/kernel", rng.randn(3, 3, 3, 2).astype("f"))
    y2 = g.add_node("b/conv", "Conv2D", inputs=["x", k2], attrs=conv)  # no bias
    ax = g.add_node("cat/axis", "Const", attrs={"dtype": tf.int32, "value": np.array(-1, np.int32)})
    cat = g.add_node("cat", "ConcatV2", inputs=[y1, y2, ax], attrs={"T": tf.float32, "N": 2, "Tidx": tf.int32})
    ws = [g.add_weight(f"bn/{n}", v.astype("f")) for n, v in
          (("gamma", rng.rand(6) + .5), ("beta", rng.randn(6)), ("mean", rng.randn(6)), ("var", rng.rand(6) + .5))]
    bn = g.add_node("bn", "FusedBatchNormV3", inputs=[cat] + ws, attrs={
        "T": tf.float32, "U": tf.float32, "epsilon": 1e-3, "is_training": False})
    g.outputs.append(SignatureArg("y", g.add_node("relu", "Relu", inputs=[bn], attrs={"T": tf.float32}).output(0)))
    g.infer_shapes()
    x = rng.randn(2, 5, 5, 3).astype("f")
    before = run(g, {"x": x})
    rep = graphslim.run_pipeline(g, "fold-batchnorm")
    assert rep.passes[0]["stats"]["folded_layers"] == 1
    assert not g.nodes(op="FusedBatchNormV3") and not any(w.startswith("bn/") for w in g.weights)
    assert "b/bias" in g.weights  # the bias-less branch got a bias named after its kernel
    assert_close(run(g, {"x": x}), before, rtol=1e-5, atol=1e-5)


def test_batchnorm_after_relu_is_left_alone():
    g = graphslim.load(fixture_path("inception_tiny"))
    rep = graphslim.run_pipeline(g, "fold-batchnorm")
    # the BN after the concat follows ReLUs: folding it would change results
    assert any("batch_normalization" in w for w in g.weights)
    assert_close(run(g, fixture_io("inception_tiny")[0]), fixture_io("inception_tiny")[1], rtol=1e-5, atol=1e-5)
