import numpy as np
import tensorflow as tf

import graphslim
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.testing import assert_graph_matches, fixture_io, fixture_path


def test_dce_removes_dead_branch_and_its_weights():
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 3)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    w = g.add_weight("live/kernel", np.ones((3, 2), np.float32))
    dead_w = g.add_weight("dead/kernel", np.ones((3, 5), np.float32))
    y = g.add_node("live/MatMul", "MatMul", inputs=["x", w], attrs={"T": tf.float32})
    g.add_node("dead/MatMul", "MatMul", inputs=["x", dead_w], attrs={"T": tf.float32})
    g.outputs.append(SignatureArg("y", y.output(0)))
    report = graphslim.run_pipeline(g, "dce")
    assert report.passes[0]["changed"] and report.passes[0]["stats"]["removed_nodes"] == 2
    assert "dead/kernel" not in g.weights and "dead/MatMul" not in g
    assert [a.name for a in g.inputs] == ["x"]
    # idempotent
    assert not graphslim.run_pipeline(g, "dce").passes[0]["changed"]


def test_dce_exact_on_fixture():
    g = graphslim.load(fixture_path("multi_io"))
    graphslim.run_pipeline(g, "dce")
    assert_graph_matches(g, *fixture_io("multi_io"))
