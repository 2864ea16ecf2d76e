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
