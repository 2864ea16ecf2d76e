"""Least-squares reconstruction of transformer sinks (graphslim/analysis/reconstruct.py: linear_sink):
an Einsum reading a weight over the input's trailing axes (BERT's attention output ``abcd,cde->abe``), a
BatchMatMul reading a reshaped weight (Keras's attention output under TensorFlow), and the MatMul of a
Dense under ``Tensordot`` whose bias comes after a Reshape. The weight keeps its original shape.
"""

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.analysis.reconstruct import linear_sink
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.runtime import run
from graphslim.testing import digits, fixture_path, keras_attention_graph


def _reshaped_matmul(rng, adj_y: bool):
    """x [?, 5, 12] · Reshape(w) with w [3, 4, 6] → [12, 6] (or w [6, 3, 4] → [6, 12] with adj_y)."""
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 5, 12)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    shape, target = ((6, 3, 4), (6, 12)) if adj_y else ((3, 4, 6), (12, 6))
    w = g.add_weight("o/kernel", rng.randn(*shape).astype("f")).output(0)
    t = g.add_const("o/shape", np.array(target, np.int32))
    r = g.add_node("o/Reshape", "Reshape", inputs=[w, t], attrs={"T": tf.float32, "Tshape": tf.int32}).output(0)
    y = g.add_node("o/MatMul", "BatchMatMulV2", inputs=[Tensor("x", 0), r],
                   attrs={"T": tf.float32, "adj_x": False, "adj_y": adj_y}).output(0)
    g.outputs.append(SignatureArg("y", y))
    g.infer_shapes()
    return g


@pytest.mark.parametrize("case", ["einsum", "batch_matmul", "batch_matmul_adj_y"])
def test_linear_sink_is_the_op_as_rows_times_a_matrix(case):
    rng = np.random.RandomState(0)
    g = keras_attention_graph(bias=True) if case == "einsum" else _reshaped_matmul(rng, case.endswith("adj_y"))
    node = g.node("o/Einsum" if case == "einsum" else "o/MatMul")
    sink = linear_sink(g, node)
    assert sink.kernel.name == "o/kernel"
    assert (sink.in_axes, sink.out_axes) == {"einsum": ((0, 1), (2,)), "batch_matmul": ((0, 1), (2,)),
                                             "batch_matmul_adj_y": ((1, 2), (0,))}[case]
    w = sink.kernel.value
    m = sink.matrix(w)
    assert np.array_equal(sink.to_kernel(m, w.shape), w)
    x = {"x": rng.randn(2, 5, 8 if case == "einsum" else 12).astype("f")}
    xin = str(g.input(node, 0))
    got = run(g, x, fetch=[xin, str(node.output(0))])
    rows = got[xin].reshape(-1, m.shape[0])
    np.testing.assert_allclose(rows @ m, got[str(node.output(0))].reshape(rows.shape[0], -1), rtol=1e-4, atol=1e-4)


def test_linear_sink_refuses_what_is_not_a_dense_layer():
    g = keras_attention_graph(bias=True)
    with pytest.raises(ValueError, match="operand 1 is not a weight"):
        linear_sink(g, g.node("context"))
    with pytest.raises(ValueError, match="not refit"):
        linear_sink(g, g.node("softmax"))


def test_einsum_attention_output_is_refit_and_keeps_its_shape(tmp_path):
    rng = np.random.RandomState(0)
    g0 = keras_attention_graph(bias=True)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.randn(256, 5, 8).astype("f"))
    test = {"x": rng.randn(64, 5, 8).astype("f")}
    ref = run(g0, test)["y"]
    errs = {}
    for rec in ("false", "true"):
        g = g0.copy()
        st = graphslim.run_pipeline(g, f"prune{{ratio=0.3 calib={calib} reconstruct={rec}}}").passes[0]["stats"]
        errs[rec] = float(np.linalg.norm(run(g, test)["y"] - ref) / np.linalg.norm(ref))
        assert g.weight("o/kernel").value.shape == (2, 3, 8)  # heads 3 → 2, head size 4 → 3
    row = next(r for r in st["layers"] if r["layer"] == "o/Einsum")
    assert row["error_after"] < 0.95 * row["error_before"], row  # random weights: little to recover
    assert g.weight("o/bias").value.shape == (8,) and not g.nodes(op="BiasAdd")  # the bias refit in place
    assert errs["true"] < 0.95 * errs["false"], errs


@pytest.fixture(scope="module")
def vit_digits():
    d = digits()
    return graphslim.load(str(fixture_path("vit_digits"))), d


def test_vit_digits_attention_output_and_ffn_are_refit(vit_digits, tmp_path):
    """Keras's attention output (BatchMatMulV2 of the [heads, head size, hidden] kernel reshaped) and the
    FFN's second Dense (MatMul under Tensordot, its BiasAdd after a Reshape) are refit; accuracy on the
    held-out digits recovers most of what pruning lost."""
    g0, d = vit_digits
    calib = tmp_path / "calib.npz"
    np.savez(calib, images=d["x_train"][np.random.RandomState(0).permutation(len(d["x_train"]))[:512]])
    acc = {}
    for rec in ("false", "true"):
        g = g0.copy()
        st = graphslim.run_pipeline(g, f"prune{{ratio=0.3 calib={calib} reconstruct={rec}}}").passes[0]["stats"]
        pred = run(g, {"images": d["x_test"]})["output_0"].argmax(1)
        acc[rec] = float((pred == d["y_test"]).mean())
    fitted = {r["layer"]: r for r in st["layers"] if r.get("error_after") is not None}
    for block in (1, 2):
        for end in ("mha_1/attention_output_1/MatMul", "mlp_1/dense_2_1/Tensordot/MatMul"):
            assert any(n.endswith(f"transformer_block_{block}_1/{end}") for n in fitted), sorted(fitted)
    assert all(r["error_after"] < 0.8 * r["error_before"] for r in fitted.values()), fitted
    assert g.weight("vit_encoder/transformer_block_1/mha/attention_output/kernel").value.shape == (3, 11, 64)  # 3 heads of 11
    assert not any("added bias" in r.get("note", "") for r in st["layers"])  # the FFN's bias refit in place
    assert acc["true"] > acc["false"] + 0.15 and acc["true"] > 0.85, acc
