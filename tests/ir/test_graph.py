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


def test_copy_shares_weight_arrays_but_not_changes():
    g = conv_graph()
    h = g.copy()
    name = next(iter(g.weights))
    before = g.weights[name].value
    assert h.weights[name].value is before  # shared, not copied: one copy of each weight
    h.set_weight(name, np.zeros_like(before), trainable=False)  # how passes change weights
    h.weights[name].trainable = True
    assert g.weights[name].value is before and np.any(before != 0) and g.weights[name].trainable
    assert g.shape(Tensor(name, 0)) == before.shape


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


# ------------------------------------------------------------------ the IR's graph mechanics (issue 14)
def test_add_const_and_add_input_are_typed_and_bound():
    g = conv_graph()
    c = g.add_const("conv/axis", np.int32(3))
    assert c.op == "Const" and c.attr("dtype") == tf.int32 and g.constant_value(c.output(0)) == 3
    assert g.add_const("conv/axis", np.float32(1), dtype=tf.float64, unique=True).name == "conv/axis_1"
    assert g.node("conv/axis_1").attr("dtype") == tf.float64
    p = g.add_input("mask", tf.bool, (None, 8))
    assert p.op == "Placeholder" and [a.name for a in g.inputs] == ["x", "mask"]
    assert g.shape(p.output(0)) == (None, 8)
    g.verify()


def test_rename_node_keeps_edges_weights_and_signature():
    g = conv_graph()
    g.rename_node("conv/kernel", "conv1/kernel")
    g.rename_nodes({"conv/Relu": "out", "conv/Conv2D": "c"})
    assert "conv1/kernel" in g.weights and "conv/kernel" not in g.weights
    assert g.weight_of(g.node("c"), 1).name == "conv1/kernel"
    assert g.outputs[0].tensor == Tensor("out", 0) and g.producer("out:0").op == "Relu"
    with pytest.raises(ValueError):
        g.rename_node("c", "conv/BiasAdd")  # taken
    g.verify()


def test_weight_readers_sole_consumer_sole_weight_and_bias_after():
    g = conv_graph()
    ident = g.add_node("conv/kernel/read", "Identity", inputs=["conv/kernel"], attrs={"T": tf.float32})
    g.set_input(g.node("conv/Conv2D"), 1, ident.output(0))
    g.infer_shapes()
    assert [(n.name, p) for n, p in g.weight_readers("conv/kernel")] == [("conv/Conv2D", 1)]
    assert g.sole_consumer("conv/Conv2D:0")[0].name == "conv/BiasAdd"
    assert g.sole_consumer("conv/Relu:0") is None  # a signature output
    w, why = g.sole_weight(g.node("conv/Conv2D"), 1)
    assert w.name == "conv/kernel" and why is None
    ba, bias = g.bias_after(g.node("conv/Conv2D"))
    assert ba.name == "conv/BiasAdd" and bias.name == "conv/bias"
    # a second reader of the kernel: no longer the sole weight
    g.add_node("probe", "Identity", inputs=[ident.output(0)], attrs={"T": tf.float32})
    w, why = g.sole_weight(g.node("conv/Conv2D"), 1)
    assert w is None and "shared" in why
    assert g.sole_weight(g.node("conv/BiasAdd"), 0) == (None, "input 0 is computed (Conv2D), not a trained weight")
    assert g.bias_after(g.node("conv/BiasAdd")) == (None, None)  # Relu after it


def test_remove_unused_walks_up_and_keeps_weights_by_choice():
    g = conv_graph()
    k2 = g.add_weight("k2", np.ones((3,), np.float32))
    i2 = g.add_node("k2/read", "Identity", inputs=[k2], attrs={"T": tf.float32})
    neg = g.add_node("k2/neg", "Neg", inputs=[i2], attrs={"T": tf.float32})
    assert g.remove_unused([neg]) == ["k2/neg", "k2/read"]
    assert "k2" in g.weights and g.has_node("k2")  # weights stay by default
    assert g.remove_unused(["k2"], keep_weights=False) == ["k2"] and "k2" not in g.weights
    assert g.remove_unused(["conv/Relu", "x"]) == []  # a signature output, a Placeholder
    g.verify()


def test_format_is_one_line_per_node_with_signature():
    g = conv_graph()
    text = g.format()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0].startswith("graph serving_default (6 nodes, 2 weights)"), text
    assert "conv/Conv2D = Conv2D(x, conv/kernel) {T=float32, padding=\"SAME\", strides=[1,1,1,1]} " \
           "-> float32[?,8,8,4]" in lines, text
    assert "conv/kernel = Weight() -> float32[3,3,3,4]  // trainable" in lines, text
    assert lines[-2:] == ["return {y: conv/Relu}", "}"], text
    assert len(lines) == 6 + 3


def test_restore_rolls_back_to_a_copy_sharing_weights():
    g = conv_graph()
    saved = g.copy()
    g.set_weight("conv/kernel", np.zeros((3, 3, 3, 2), np.float32))
    g.remove_node("conv/Relu", safe=False)
    g.restore(saved)
    assert g.has_node("conv/Relu") and g.weights["conv/kernel"].value.shape == (3, 3, 3, 4)
    assert g.weights["conv/kernel"].value is saved.weights["conv/kernel"].value
    g.verify()


def test_post_dominators_are_the_nodes_every_path_crosses():
    """resnet_digits: every path from the input crosses the stem, each residual block's output (the
    Add, and its ReLU) and the head, never a branch inside a block."""
    import graphslim
    from graphslim.testing import fixture_path

    g = graphslim.load(fixture_path("resnet_digits"))
    start = str(g.inputs[0].tensor).split(":")[0]
    chain = g.post_dominators(start)
    ops = [g.node(n).op for n in chain]
    assert ops.count("AddV2") >= 2 and "Softmax" in ops and "MatMul" in ops
    for name in chain:  # removing it disconnects the input from the outputs
        assert name in g.ancestors([str(a.tensor).split(":")[0] for a in g.outputs])
    inside = [n.name for n in g.nodes("Conv2D") if n.name not in chain]
    assert inside  # the convolutions inside the blocks are bypassed by the skip connections
