"""Structure tests of the IR API on tiny graphs built inline."""

import numpy as np
import pytest
import tensorflow as tf

from graphslim.errors import VerificationError
from graphslim.ir.graph import Graph, SignatureArg, Tensor


def conv_graph(cout=4):
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 8, 8, 3)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    k = g.add_weight("conv/kernel", np.ones((3, 3, 3, cout), np.float32))
    b = g.add_weight("conv/bias", np.zeros((cout,), np.float32))
    c = g.add_node("conv/Conv2D", "Conv2D", inputs=["x", k],
                   attrs={"T": tf.float32, "strides": [1, 1, 1, 1], "padding": "SAME"})
    ba = g.add_node("conv/BiasAdd", "BiasAdd", inputs=[c, b], attrs={"T": tf.float32})
    r = g.add_node("conv/Relu", "Relu", inputs=[ba], attrs={"T": tf.float32})
    g.outputs.append(SignatureArg("y", r.output(0)))
    g.infer_shapes()
    return g


def test_shapes_inferred_and_use_def():
    g = conv_graph()
    assert g.shape("conv/Relu:0") == (None, 8, 8, 4)
    assert g.producer("conv/BiasAdd:0").op == "BiasAdd"
    assert [(n.name, p) for n, p in g.consumers(Tensor("conv/Conv2D", 0))] == [("conv/BiasAdd", 0)]
    assert g.weight_of(g.node("conv/Conv2D"), 1).name == "conv/kernel"
    assert [t.node for t in g.inputs_of("conv/BiasAdd")] == ["conv/Conv2D", "conv/bias"]
    g.verify()


def test_replace_all_uses_moves_consumers_and_outputs():
    g = conv_graph()
    n = g.replace_all_uses("conv/Relu:0", "conv/BiasAdd:0")
    assert n == 1 and g.outputs[0].tensor == Tensor("conv/BiasAdd", 0)
    with pytest.raises(ValueError, match="still used"):
        g.remove_node("conv/BiasAdd")
    g.remove_node("conv/Relu")
    g.verify()
    assert "conv/Relu" not in g


def test_weight_shape_conflict_is_reported_with_node():
    g = conv_graph()
    g.set_weight("conv/bias", np.zeros((5,), np.float32))
    with pytest.raises(VerificationError, match="conv/BiasAdd"):
        g.verify()


def test_cycle_detected():
    g = conv_graph()
    g.set_input("conv/Conv2D", 0, "conv/Relu:0")
    with pytest.raises(VerificationError, match="cycle"):
        g.verify()


def test_port_out_of_range_detected():
    g = conv_graph()
    g.set_input("conv/Relu", 0, Tensor("conv/BiasAdd", 3))
    with pytest.raises(VerificationError):
        g.verify()


def test_cost_counts_conv_macs_and_params():
    g = conv_graph(cout=4)
    c = g.cost()
    assert c.params == 3 * 3 * 3 * 4 + 4
    assert c.by_node()["conv/Conv2D"].macs == 8 * 8 * 4 * (3 * 3 * 3)


def test_copy_is_independent():
    g = conv_graph()
    h = g.copy()
    h.remove_node("conv/Relu", safe=False)
    assert "conv/Relu" in g and "conv/Relu" not in h


def test_dead_nodes_removed_with_their_weights():
    g = conv_graph()
    w = g.add_weight("unused/kernel", np.ones((2,), np.float32))
    g.add_node("unused/Neg", "Neg", inputs=[w], attrs={"T": tf.float32})
    dead = g.remove_dead_nodes()
    assert set(dead) == {"unused/kernel", "unused/Neg"} and "unused/kernel" not in g.weights
    g.verify()


def test_signature_output_port_out_of_range_detected():
    g = conv_graph()
    g.set_output("y", Tensor("conv/Relu", 2))
    with pytest.raises(VerificationError, match=r"signature tensor 'y' is conv/Relu:2"):
        g.verify()
