"""extend: old classes' logits identical; new classes present and trainable."""

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.errors import PipelineError
from graphslim.runtime import run
from graphslim.testing import fixture_io, fixture_path


def assert_close_to_scale(actual, desired, rel=1e-6):
    """|actual - desired| <= rel * (|desired| + max|desired|). float32 round-off (oneDNN's kernels, another
    summation order) scales with the output's magnitude, not with each value: a value near zero may move
    by ~1e-7 of the largest one."""
    np.testing.assert_allclose(actual, desired, rtol=rel, atol=rel * float(np.max(np.abs(desired))))


def logits_tensor(g):
    node = g.producer(g.outputs[0].tensor)
    return str(g.input(node, 0)) if node.op == "Softmax" else str(g.outputs[0].tensor)


@pytest.mark.parametrize("name", ["vgg_digits", "resnet_digits", "fcn_tiny", "mobilenet_tiny", "tf_module"])
@pytest.mark.parametrize("init", ["zeros", "normal", "mean"])
def test_extend_keeps_old_logits(name, init):
    g = graphslim.load(fixture_path(name))
    inputs, _ = fixture_io(name)
    lt = logits_tensor(g)
    before = run(g, inputs, fetch=[lt])[lt]
    graphslim.run_pipeline(g, f"extend{{classes=2 init={init}}}")
    after = run(g, inputs, fetch=[lt])[lt]
    assert after.shape[-1] == before.shape[-1] + 2
    np.testing.assert_allclose(after[..., :-2], before, rtol=1e-6, atol=1e-6)
    if init == "zeros":
        np.testing.assert_array_equal(after[..., -2:], 0)
    else:
        assert np.abs(after[..., -2:]).max() > 0


def test_extend_labels_grow_and_fine_tuning_changes_new_columns(tmp_path):
    g = graphslim.load(fixture_path("vgg_digits"))
    rep = graphslim.run_pipeline(g, "extend{labels=ten,eleven init=zeros}")
    assert rep.passes[0]["stats"]["grown_weights"] == ["dense_1/bias", "dense_1/kernel"]
    out = graphslim.save(g, tmp_path / "out")
    assert (out / "assets" / "labels.txt").read_text().split()[-3:] == ["nine", "ten", "eleven"]
    model = tf.saved_model.load(str(out))
    kernel = next(v for v in model.trainable_variables if v.name.startswith("dense_1/kernel"))
    before = kernel.numpy().copy()
    x = tf.constant(fixture_io("vgg_digits")[0]["image"])
    y = tf.constant([10, 11, 10, 11])
    with tf.GradientTape() as tape:
        probs = model.serve(x)["output_0"]
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, probs))
    grads = tape.gradient(loss, model.trainable_variables)
    for v, gr in zip(model.trainable_variables, grads):
        if gr is not None:
            v.assign_sub(0.5 * gr)
    after = kernel.numpy()
    assert after.shape == (32, 12)
    assert np.abs(after[:, 10:] - before[:, 10:]).max() > 0, "new columns must learn"


def test_extend_detection_with_per_class_boxes():
    g = graphslim.load(fixture_path("ssd_tiny"))
    inputs, expected = fixture_io("ssd_tiny")
    scores = next(o.tensor for o in g.outputs if o.name == "class_scores")
    lt = str(g.input(g.producer(scores), 0))
    before = run(g, inputs, fetch=[lt])[lt]
    graphslim.run_pipeline(g, "extend{classes=2 output=class_scores background=true}")
    got = run(g, inputs)
    after = run(g, inputs, fetch=[lt])[lt]
    assert_close_to_scale(after[..., :7], before)
    assert got["class_boxes"].shape == (4, 8, 4)
    assert_close_to_scale(got["class_boxes"][:, :6], expected["class_boxes"])
    assert_close_to_scale(got["boxes"], expected["boxes"])


@pytest.mark.parametrize("pipeline,message", [
    ("extend{classes=2 labels=a}", "exactly one"),
    ("extend{labels=three}", r"classes \['three'\] already exist"),
])
def test_extend_errors(pipeline, message):
    g = graphslim.load(fixture_path("vgg_digits"))
    with pytest.raises(PipelineError, match=message):
        graphslim.run_pipeline(g, pipeline)


def test_extend_sigmoid_head_starts_new_classes_at_the_prior(tmp_path):
    """Raw focal-loss heads (no Sigmoid in the graph, biases at the prior): new classes' biases start at
    -log((1-p)/p) with p the existing classes' mean probability, so they do not flood detections."""
    from graphslim.testing import retina_like, run_saved_model

    src = tmp_path / "m"
    retina_like(prior=0.01).export(str(src), verbose=False)
    g = graphslim.load(src)
    rep = graphslim.run_pipeline(g, "extend{classes=2 init=normal}")
    assert rep.passes[0]["stats"]["prior_bias"] == pytest.approx(-np.log(0.99 / 0.01), rel=1e-6)
    bias = g.weights["cls_head/bias"].value.reshape(3, 11)  # anchors × classes
    np.testing.assert_allclose(bias[:, 9:], -np.log(0.99 / 0.01), rtol=1e-6)
    out = graphslim.save(g, tmp_path / "out")
    x = {"images": np.random.RandomState(0).rand(1, 24, 24, 3).astype("float32")}
    before, after = run_saved_model(src, x), run_saved_model(out, x)
    np.testing.assert_allclose(after["cls_logits"][..., :9], before["cls_logits"], rtol=1e-6, atol=1e-6)
    new_prob = 1 / (1 + np.exp(-after["cls_logits"][..., 9:]))
    assert new_prob.mean() < 0.05  # near the prior, not 0.5
    # and prior=none keeps the old behaviour (the mean of the existing biases)
    g = graphslim.load(src)
    assert graphslim.run_pipeline(g, "extend{classes=2 prior=none}").passes[0]["stats"]["prior_bias"] is None


def test_extend_detector_with_nms_in_the_graph(tmp_path):
    """CombinedNMS after a background slice: old classes' detections identical, new classes present,
    new ids after the old ones; a gradient step moves the new classes' weights."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_subset import _NmsDetector, _detections
    from graphslim.testing import run_saved_model

    m = _NmsDetector()
    src = tmp_path / "m"
    tf.saved_model.save(m, str(src), signatures={"serving_default": m.__call__})
    g = graphslim.load(src)
    rep = graphslim.run_pipeline(g, "extend{classes=2 background=true init=normal}")
    assert rep.passes[0]["stats"]["classes_after"] == 14
    assert g.weights["cls/kernel"].value.shape == (6, 40 * 14)
    out = graphslim.save(g, tmp_path / "out")
    x = {"x": np.random.RandomState(3).normal(size=(5, 6)).astype("float32")}
    before, after = run_saved_model(src, x), run_saved_model(out, x)
    for i in range(5):
        old, got = _detections(before, i), _detections(after, i)
        best_new = max([s for c, s, _ in got if c >= 12], default=0.0)
        # per-class NMS is unchanged: an old detection can only be displaced from the top-k by a new
        # class scoring higher
        assert {d for d in old if d[1] > best_new} <= got
        assert all(1 <= c < 14 for c, _, _ in got)
