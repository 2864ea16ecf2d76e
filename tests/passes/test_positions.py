"""``positions`` (dead-position elimination, graphslim/analysis/positions.py and position_rules.py): a
class-token classifier's last block computes its query, attention output, MLP and layer norms on the
class token alone. Exact on the trained digits ViT and on keras-hub's ViT and BERT (random weights,
built from constructor arguments) through save and load; fewer MACs; nothing changes where every position
is needed; a span that cannot be cut on an edge makes its consumer compute everything; a wrong position
rule is caught by the shape check and leaves the model untouched; positions then prune runs and loads.
"""

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.analysis.position_rules import Span, position_rule
from graphslim.analysis.positions import live_spans, slice_dead_positions, static_reshapes
from graphslim.errors import PassError
from graphslim.ir import ops
from graphslim.runtime import run
from graphslim.testing import digits, fixture_path, keras_hub_bert, keras_hub_vit


def _rel(got, ref):
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))


def _exact_through_save(g0, g, inputs, tmp_path, tol=1e-5):
    """The rewritten model's outputs equal the original's (relative to their magnitude), in memory and
    after save and load."""
    ref = run(g0, inputs)
    got = run(g, inputs)
    graphslim.save(g, tmp_path / "out")
    again = run(graphslim.load(tmp_path / "out"), inputs)
    for k in ref:
        assert got[k].shape == ref[k].shape
        assert _rel(got[k], ref[k]) < tol, k
        assert _rel(again[k], ref[k]) < tol, k


def _positions(g, node_suffix):
    """Length of axis 1 of the node whose name ends with ``node_suffix`` (the positions of a [?, T, C])."""
    (node,) = [n for n in g.nodes() if n.name.endswith(node_suffix)]
    return g.shape(node.output(0))[1]


def test_vit_digits_last_block_runs_on_the_class_token_exactly(tmp_path):
    g0 = graphslim.load(fixture_path("vit_digits"))
    g = g0.copy()
    result = graphslim.run_pipeline(g, "positions")
    assert result.changed
    x = digits()["x_test"][:64]
    _exact_through_save(g0, g, {"images": x}, tmp_path)
    # the last block's MLP and layer norms hold one position, the first block all 17
    assert _positions(g, "transformer_block_2_1/mlp_1/dense_2_1/BiasAdd") == 1
    assert _positions(g, "transformer_block_2_1/ln_2_1/add_2") == 1
    assert _positions(g, "transformer_block_1_1/mlp_1/dense_2_1/BiasAdd") == 17
    # keys and values of the last block still see every token; its query only the class token
    assert _positions(g, "transformer_block_2_1/mha_1/key_1/Add") == 17
    assert _positions(g, "transformer_block_2_1/mha_1/query_1/Add") == 1
    ratio = g.cost().macs / g0.cost().macs
    assert 0.55 < ratio < 0.7, ratio  # about 16/17 of the last block's query, output, MLP: a third of the MACs


@pytest.fixture(scope="module")
def keras_hub_models(tmp_path_factory):
    rng = np.random.RandomState(0)
    mask = np.ones((2, 16), "int32")
    mask[1, 11:] = 0
    bert_inputs = {"token_ids": rng.randint(0, 500, (2, 16)).astype("int32"),
                   "segment_ids": rng.randint(0, 2, (2, 16)).astype("int32"), "padding_mask": mask}
    return {
        "vit": (keras_hub_vit(tmp_path_factory.mktemp("vit") / "m"),
                {"images": rng.rand(2, 32, 32, 3).astype("float32")}),
        "bert": (keras_hub_bert(tmp_path_factory.mktemp("bert") / "m", sequence=16), bert_inputs),
        "bert-any-length": (keras_hub_bert(tmp_path_factory.mktemp("bert_any") / "m"), bert_inputs),
    }


@pytest.mark.parametrize("name, saves", [("vit", 0.3), ("bert", 0.2), ("bert-any-length", 0.0)])
def test_keras_hub_models_exact_and_smaller(keras_hub_models, name, saves, tmp_path):
    """ViT and BERT (the pooled [CLS] token) at a static length cut at least ``saves`` of the MACs; BERT of
    any length still restricts its last layer norms (its MLP's run-time reshape target is unknown)."""
    g0, inputs = keras_hub_models[name]
    g = g0.copy()
    stats = slice_dead_positions(g)
    assert stats["restricted"] > 0 and stats["slices"] > 0
    g.remove_dead_nodes()
    _exact_through_save(g0, g, inputs, tmp_path)
    reference = g0.copy()  # the MACs the original's shapes imply once its run-time reshape targets are known
    static_reshapes(reference)
    before = reference.cost().macs
    if saves:
        assert g.cost().macs < (1 - saves) * before


def test_every_position_needed_changes_nothing():
    g = graphslim.load(fixture_path("vgg_digits"))
    before = g.format()
    result = graphslim.run_pipeline(g, "positions")
    assert not result.changed
    assert g.format() == before


def _saved(module, tmp_path, spec):
    tf.saved_model.save(module, str(tmp_path / "src"), signatures={"serving_default": module.__call__.get_concrete_function(spec)})
    return graphslim.load(tmp_path / "src")


class _MergedRows(tf.Module):
    """x [?, 4, 8] → Dense as tf.tensordot does it ([?·4, 8] rows) → back to [?, 4, 8] → x[:, 0]; the flat
    rows also feed a second output that needs all of them."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.random.RandomState(0).randn(8, 8).astype("f"))

    @tf.function
    def __call__(self, x):
        rows = tf.matmul(tf.reshape(x, [-1, 8]), self.w)
        y = tf.reshape(rows, [-1, 4, 8])
        return {"first": tf.tanh(y)[:, 0], "total": tf.reduce_sum(rows, axis=1)}


def test_a_merged_span_not_cut_on_an_edge_makes_its_consumer_read_everything(tmp_path):
    g0 = _saved(_MergedRows(), tmp_path, tf.TensorSpec([None, 4, 8], tf.float32))
    live = live_spans(g0)
    # the matmul rows are needed whole (the 'total' output), so the reshape back computes all 4 positions
    # and the tanh after it only the first
    (reshape,) = [n for n in g0.nodes("Reshape") if g0.shape(n.output(0)) == (None, 4, 8)]
    (tanh,) = g0.nodes("Tanh")
    assert reshape.name not in live.computed
    assert live.computed[tanh.name] == Span(1, 0, 1, 4)
    g = g0.copy()
    slice_dead_positions(g)
    x = np.random.RandomState(1).randn(3, 4, 8).astype("f")
    _exact_through_save(g0, g, {"x": x}, tmp_path)


def test_a_wrong_position_rule_is_caught_and_the_model_left_unchanged():
    g = graphslim.load(fixture_path("vit_digits"))
    before = g.format()
    saved = ops.snapshot()
    try:
        @position_rule("Rsqrt")  # claims the positions move to the last axis: a bug in a rule
        def _wrong(ctx, node, need):
            return [None if need is None else need.at(2)]

        with pytest.raises(PassError, match=r"positions: node .* should hold 1 positions .* bug in a position rule"):
            slice_dead_positions(g)
    finally:
        ops.restore(saved)
    assert g.format() == before


def test_positions_then_prune_meets_the_total_target_and_loads(tmp_path):
    g0 = graphslim.load(fixture_path("vit_digits"))
    sliced = g0.copy()
    graphslim.run_pipeline(sliced, "positions")
    target = 0.5 * g0.cost().macs / sliced.cost().macs
    g = g0.copy()
    graphslim.run_pipeline(g, f"positions,prune{{macs={target:.4f}}}")
    assert g.cost().macs / g0.cost().macs == pytest.approx(0.5, abs=0.03)
    graphslim.save(g, tmp_path / "out")
    x = digits()["x_test"][:32]
    out = run(graphslim.load(tmp_path / "out"), {"images": x})["output_0"]
    assert out.shape == (32, 10) and np.allclose(out.sum(1), 1, atol=1e-5)


class _Picks(tf.Module):
    """A projection of x [?, 6, 8] read at position 2 by ``tf.gather`` and at positions 3..4 by ``tf.slice``
    (through ExpandDims and Squeeze): positions 0, 1 and 5 feed nothing."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.random.RandomState(0).randn(8, 8).astype("f"))

    @tf.function
    def __call__(self, x):
        y = tf.tanh(tf.einsum("btc,cd->btd", x, self.w))
        picked = tf.gather(y, 2, axis=1)
        window = tf.squeeze(tf.expand_dims(tf.slice(y, [0, 3, 0], [-1, 2, -1]), 1), [1])
        return {"picked": picked, "window": tf.reduce_sum(window, axis=1)}


def test_gather_and_slice_start_spans_and_their_hull_is_computed(tmp_path):
    g0 = _saved(_Picks(), tmp_path, tf.TensorSpec([None, 6, 8], tf.float32))
    (tanh,) = g0.nodes("Tanh")
    assert live_spans(g0).computed[tanh.name] == Span(1, 2, 5, 6)
    g = g0.copy()
    graphslim.run_pipeline(g, "positions")
    assert g.shape(g.node(tanh.name).output(0)) == (None, 3, 8)
    _exact_through_save(g0, g, {"x": np.random.RandomState(1).randn(3, 6, 8).astype("f")}, tmp_path)
