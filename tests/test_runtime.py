"""graphslim.runtime: running an IR graph in TensorFlow, fetching any tensor."""

import numpy as np
import tensorflow as tf

from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.runtime import Runner, run

F = {"T": tf.float32}


def _conv_bias_swish(out_bias: bool) -> Graph:
    """x → 1×1 Conv2D → BiasAdd → x·sigmoid(x): with oneDNN, Grappler's remapper fuses all four into
    one _FusedConv2D even when the BiasAdd is fetched (its swish pattern ignores the fetched nodes)."""
    rng = np.random.RandomState(0)
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 5, 5, 3)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    k = g.add_weight("c/kernel", rng.randn(1, 1, 3, 4).astype("f")).output(0)
    b = g.add_weight("c/bias", rng.randn(4).astype("f")).output(0)
    y = g.add_node("c/Conv2D", "Conv2D", inputs=[Tensor("x", 0), k],
                   attrs={**F, "strides": [1, 1, 1, 1], "padding": "SAME"}).output(0)
    y = g.add_node("c/BiasAdd", "BiasAdd", inputs=[y, b], attrs=F).output(0)
    sig = g.add_node("sig", "Sigmoid", inputs=[y], attrs=F).output(0)
    out = g.add_node("swish", "Mul", inputs=[y, sig], attrs=F).output(0)
    g.outputs.append(SignatureArg("y", out))
    if out_bias:
        g.outputs.append(SignatureArg("pre", y))
    g.infer_shapes()
    return g


def _expected(g: Graph, x: np.ndarray):
    pre = np.einsum("nhwc,cd->nhwd", x, g.weight("c/kernel").value[0, 0]) + g.weight("c/bias").value
    return pre, pre / (1 + np.exp(-pre))


def test_intermediate_tensors_survive_runtime_fusion():
    x = np.random.RandomState(1).randn(2, 5, 5, 3).astype("f")
    g = _conv_bias_swish(out_bias=False)
    pre, swish = _expected(g, x)
    r = Runner(g)
    try:
        for _ in range(2):  # calibration fetches the same tensors batch after batch
            got = r.run({"x": x}, fetch=["c/BiasAdd:0", "swish:0"])
            np.testing.assert_allclose(got["c/BiasAdd:0"], pre, rtol=1e-5, atol=1e-5 * np.abs(pre).max())
            np.testing.assert_allclose(got["swish:0"], swish, rtol=1e-5, atol=1e-5 * np.abs(swish).max())
        assert set(r.run({"x": x})) == {"y"}
    finally:
        r.close()
    # a signature output that another output's fusion would swallow
    got = run(_conv_bias_swish(out_bias=True), {"x": x})
    np.testing.assert_allclose(got["pre"], pre, rtol=1e-5, atol=1e-5 * np.abs(pre).max())
    np.testing.assert_allclose(got["y"], swish, rtol=1e-5, atol=1e-5 * np.abs(swish).max())
