"""extend: old classes' logits identical; new classes present and trainable."""

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.errors import PipelineError
from graphslim.runtime import run
from graphslim.testing import fixture_io, fixture_path, run_saved_model


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


def test_extend_softmax_prior_keeps_old_probabilities():
    """prior=p on a softmax head: new classes start as the average class with the bias lowered by
    -log(p): at most p times the best class's probability, so the old probabilities do not move."""
    g = graphslim.load(fixture_path("vgg_digits"))
    inputs, expected = fixture_io("vgg_digits")
    lt = logits_tensor(g)
    rep = graphslim.run_pipeline(g, "extend{classes=2 prior=1e-9}")
    assert rep.passes[0]["stats"]["softmax_gap"] == pytest.approx(-np.log(1e-9))
    got = run(g, inputs)["output_0"]
    logits = run(g, inputs, fetch=[lt])[lt]
    assert_close_to_scale(got[..., :10], expected["output_0"], 1e-6)
    assert (got[..., 10:] <= 1e-9 * got[..., :10].max(-1, keepdims=True)).all()
    np.testing.assert_allclose(logits[..., 10:], np.repeat(logits[..., :10].mean(-1, keepdims=True) + np.log(1e-9), 2,
                                                           axis=-1), rtol=1e-4, atol=1e-4)


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


# ------------------------------------------------------------------ detectors with their post-processing in the graph
# Each small detector below is written as the real one (tf-models-official's NMS 'v2', Mask R-CNN's
# second stage, keras-cv's class-agnostic NMS) would be, for any class count. extend{classes=2} must
# give exactly what the same code built for k+2 classes gives with the grown weights: the cloned
# per-class post-processing, the grown box/mask heads and the row merges undone compute the same.

def _saved(module, path):
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.__call__})
    return path


def _dets(out, i):
    n = int(out["num_detections"][i])
    return {(int(c), round(float(s), 5), tuple(np.round(b, 5))) for b, s, c in
            zip(out["detection_boxes"][i][:n], out["detection_scores"][i][:n], out["detection_classes"][i][:n])}


class _UnrolledTopK(tf.Module):
    """tf-models-official's NMS 'v2': sigmoid scores past a background class, a top-k per class and image
    through Reshape([-1, anchors]) and back, then one NMS per class unrolled in Python (ids from
    tf.fill(.., i)), concatenated, a final top-k, ids + 1."""

    def __init__(self, k=12, anchors=40, seed=0, cls=None):
        rng = np.random.default_rng(seed)
        self.cls = tf.Variable(rng.normal(size=(6, anchors * k)).astype("float32") * 0.5 if cls is None else cls,
                               name="cls/kernel")
        box = np.random.default_rng(seed + 1).normal(size=(6, anchors * 4))  # the same for any k
        self.box = tf.Variable(box.astype("float32"), name="box/kernel")
        self.k, self.a = k, anchors

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        c, top = self.k - 1, 10
        scores = tf.slice(tf.sigmoid(tf.reshape(tf.matmul(x, self.cls), [-1, self.a, self.k])), [0, 0, 1], [-1, -1, -1])
        boxes = tf.sigmoid(tf.reshape(tf.matmul(x, self.box), [-1, self.a, 1, 4]))
        batch = tf.shape(x)[0]
        rows = tf.reshape(tf.transpose(scores, [0, 2, 1]), [-1, self.a])
        top_s, top_i = tf.nn.top_k(rows, k=top)
        top_s = tf.transpose(tf.reshape(top_s, [batch, c, top]), [0, 2, 1])
        top_i = tf.transpose(tf.reshape(top_i, [batch, c, top]), [0, 2, 1])
        all_s, all_b, all_c = [], [], []
        for i in range(c):
            b_i = tf.gather(boxes[:, :, 0, :], top_i[:, :, i], batch_dims=1)
            s_i = top_s[:, :, i]
            idx, n = tf.image.non_max_suppression_padded(b_i, s_i, 5, 0.5, 0.05, pad_to_max_output_size=True)
            all_s.append(tf.gather(s_i, idx, batch_dims=1) * tf.cast(tf.sequence_mask(n, 5), tf.float32))
            all_b.append(tf.gather(b_i, idx, batch_dims=1))
            all_c.append(tf.fill([batch, 5], i))
        s, best = tf.nn.top_k(tf.concat(all_s, 1), k=8)
        return {"detection_scores": s, "detection_boxes": tf.gather(tf.concat(all_b, 1), best, batch_dims=1),
                "detection_classes": tf.gather(tf.concat(all_c, 1), best, batch_dims=1) + 1,
                "num_detections": tf.reduce_sum(tf.cast(s > 0, tf.int32), 1)}


def test_extend_post_processing_unrolled_per_class(tmp_path):
    """The 'v2' NMS: the row merge around the per-class top-k is undone, each new class gets its own
    NMS cloned from the last class's; the result is exactly the same code built for 14 classes."""
    src = _saved(_UnrolledTopK(), tmp_path / "m")
    g = graphslim.load(src)
    loops = len(g.nodes(("While", "StatelessWhile")))
    rep = graphslim.run_pipeline(g, "extend{classes=2 background=true prior=0.3}")
    stats = rep.passes[0]["stats"]
    assert stats["classes_after"] == 14
    assert "row merges around" in stats["postprocess"] and "11 chunks" in stats["postprocess"]
    assert len(g.nodes(("While", "StatelessWhile"))) == loops + 2 * loops // 11
    out = graphslim.save(g, tmp_path / "out")
    ref = _saved(_UnrolledTopK(k=14, cls=g.weights["cls/kernel"].value), tmp_path / "ref")
    x = {"x": np.random.RandomState(3).normal(size=(6, 6)).astype("float32")}
    got, want, before = run_saved_model(out, x), run_saved_model(ref, x), run_saved_model(src, x)
    new = 0
    for i in range(6):
        assert _dets(got, i) == _dets(want, i)
        new += sum(c >= 12 for c, _, _ in _dets(got, i))
        best_new = max([s for c, s, _ in _dets(got, i) if c >= 12], default=0.0)
        assert {d for d in _dets(before, i) if d[1] > best_new} <= _dets(got, i)
    assert new > 0  # the new classes' NMS runs and finds boxes


def test_extend_refuses_unrolled_chunks_that_differ(tmp_path):
    """A post-processing unrolled per class whose classes do not all run the same ops (here the last
    class has another NMS threshold) cannot be extended: which would a new class run?"""

    class Uneven(_UnrolledTopK):
        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
        def __call__(self, x):
            scores = tf.sigmoid(tf.reshape(tf.matmul(x, self.cls), [-1, self.a, self.k]))
            boxes = tf.sigmoid(tf.reshape(tf.matmul(x, self.box), [-1, self.a, 4]))
            all_s, all_c = [], []
            for i in range(self.k):
                idx, n = tf.image.non_max_suppression_padded(boxes, scores[:, :, i], 5, 0.9 if i == 7 else 0.5, 0.05,
                                                             pad_to_max_output_size=True)
                all_s.append(tf.gather(scores[:, :, i], idx, batch_dims=1))
                all_c.append(tf.fill(tf.shape(idx), i))
            s, best = tf.nn.top_k(tf.concat(all_s, 1), k=8)
            return {"detection_scores": s, "detection_classes": tf.gather(tf.concat(all_c, 1), best, batch_dims=1)}

    g = graphslim.load(_saved(Uneven(), tmp_path / "m"))
    with pytest.raises(PipelineError, match=r"unrolled per class .* class \d+'s ops differ from class \d+'s"):
        graphslim.run_pipeline(g, "extend{classes=2}")


class _AgnosticNms(tf.Module):
    """keras-cv's YOLOv8 decoding: class-agnostic NMS on the best class's score, the detections' class
    rows by Keras's take_along_axis, their class by an argmax."""

    def __init__(self, k=9, anchors=30, seed=2, cls=None):
        rng = np.random.default_rng(seed)
        self.cls = tf.Variable(rng.normal(size=(6, anchors * k)).astype("float32") if cls is None else cls,
                               name="cls/kernel")
        box = np.random.default_rng(seed + 1).normal(size=(6, anchors * 4))  # the same for any k
        self.box = tf.Variable(box.astype("float32"), name="box/kernel")
        self.k, self.a = k, anchors

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        import keras

        scores = tf.sigmoid(tf.reshape(tf.matmul(x, self.cls), [-1, self.a, self.k]))
        boxes = tf.sigmoid(tf.reshape(tf.matmul(x, self.box), [-1, self.a, 4]))
        conf = tf.reduce_max(scores, -1)
        idx, n = tf.image.non_max_suppression_padded(boxes, conf, 6, 0.5, 0.3, pad_to_max_output_size=True)
        rows = keras.ops.take_along_axis(scores, tf.expand_dims(idx, -1), axis=1)
        return {"boxes": tf.gather(boxes, idx, batch_dims=1), "confidence": tf.gather(conf, idx, batch_dims=1),
                "classes": tf.argmax(rows, -1, output_type=tf.int32), "num_detections": n}


def test_extend_class_agnostic_nms(tmp_path):
    """The class axis grows through the max and the argmax over classes: Keras's take_along_axis
    (BroadcastTo, Reshape([-1, anchors]), a gather with batch_dims, Reshape back) is unmerged."""
    src = _saved(_AgnosticNms(), tmp_path / "m")
    g = graphslim.load(src)
    rep = graphslim.run_pipeline(g, "extend{classes=2}")
    assert "row merges around" in rep.passes[0]["stats"]["postprocess"]
    out = graphslim.save(g, tmp_path / "out")
    ref = _saved(_AgnosticNms(k=11, cls=g.weights["cls/kernel"].value), tmp_path / "ref")
    x = {"x": np.random.RandomState(4).normal(size=(6, 6)).astype("float32")}
    got, want = run_saved_model(out, x), run_saved_model(ref, x)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (got["classes"] >= 9).any()


class _TwoStage(tf.Module):
    """Mask R-CNN's second stage on ``a`` regions: softmax class scores with a background, box
    regression per class ``[N, a, 4k]``, CombinedNMS with one box per class, then each detection's
    ``m × m`` mask gathered by its class id from per-class mask logits (``batch_dims=2``)."""

    def __init__(self, k=8, regions=20, m=2, seed=5, weights=None):
        rng = np.random.default_rng(seed)
        w = weights or {"cls/kernel": rng.normal(size=(6, k)) * 2, "cls/bias": rng.normal(size=(k,)),
                        "box/kernel": rng.normal(size=(6, 4 * k)), "box/bias": rng.normal(size=(4 * k,)) * 0.1,
                        "mask/kernel": rng.normal(size=(4, m * m * k))}
        self.w = {name: tf.Variable(np.asarray(v, np.float32), name=name) for name, v in w.items()}
        self.k, self.a, self.m = k, regions, m

    @tf.function(input_signature=[tf.TensorSpec([None, 20, 6], tf.float32)])
    def __call__(self, x):
        w = self.w
        logits = tf.tensordot(x, w["cls/kernel"], 1) + w["cls/bias"]
        scores = tf.nn.softmax(logits)[:, :, 1:]
        deltas = tf.reshape(tf.tensordot(x, w["box/kernel"], 1) + w["box/bias"], [-1, self.a, self.k, 4])
        boxes = tf.sigmoid(deltas[:, :, 1:, :])
        b, s, c, n = tf.image.combined_non_max_suppression(boxes, scores, 5, 10, 0.5, 0.05, clip_boxes=False)
        ids = tf.cast(c, tf.int32) + 1
        masks = tf.reshape(tf.tensordot(b, w["mask/kernel"], 1), [-1, 10, self.m, self.m, self.k])
        masks = tf.gather(masks, ids, axis=4, batch_dims=2)
        return {"detection_boxes": b, "detection_scores": s, "detection_classes": ids, "num_detections": n,
                "detection_masks": tf.sigmoid(masks)}


def test_extend_two_stage_boxes_and_masks_per_class(tmp_path):
    """Box regression per class and the class-indexed mask head grow with the classes (new rows: the
    average class's); the softmax's new classes start far below the best class, so every detection
    of the original stays, score and mask included."""
    src = _saved(_TwoStage(), tmp_path / "m")
    g = graphslim.load(src)
    rep = graphslim.run_pipeline(g, "extend{classes=2 background=true}")
    stats = rep.passes[0]["stats"]
    assert stats["softmax_gap"] == pytest.approx(-np.log(1e-9))
    assert {"box/kernel", "box/bias", "mask/kernel"} <= set(stats["regression_weights"])
    assert g.weights["mask/kernel"].value.shape == (4, 4 * 10) and g.weights["box/kernel"].value.shape == (6, 40)
    box = g.weights["box/kernel"].value.reshape(6, 10, 4)  # new rows: the mean of the old classes'
    np.testing.assert_allclose(box[:, 8:], np.repeat(box[:, :8].mean(1, keepdims=True), 2, 1), rtol=1e-5, atol=1e-6)
    mask = g.weights["mask/kernel"].value.reshape(4, 4, 10)
    np.testing.assert_allclose(mask[..., 8:], np.repeat(mask[..., :8].mean(-1, keepdims=True), 2, -1), rtol=1e-5,
                               atol=1e-6)
    out = graphslim.save(g, tmp_path / "out")
    ref = _saved(_TwoStage(k=10, weights={w: g.weights[w].value for w in ("cls/kernel", "cls/bias", "box/kernel",
                                                                           "box/bias", "mask/kernel")}),
                 tmp_path / "ref")
    x = {"x": np.random.RandomState(6).normal(size=(4, 20, 6)).astype("float32")}
    got, want, before = run_saved_model(out, x), run_saved_model(ref, x), run_saved_model(src, x)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)
    for key in before:  # the new classes do not show yet: the original's detections, masks included
        np.testing.assert_allclose(got[key], before[key], rtol=1e-6, atol=1e-6, err_msg=key)
    # ids of new classes index the new mask channels: force them with a high prior
    g = graphslim.load(src)
    graphslim.run_pipeline(g, "extend{classes=2 background=true prior=none init=normal seed=1}")
    hot = g.weights["cls/bias"].value.copy()
    hot[-2:] += 10.0
    g.set_weight("cls/bias", hot)
    out = graphslim.save(g, tmp_path / "hot")
    ref = _saved(_TwoStage(k=10, weights={w: g.weights[w].value for w in ("cls/kernel", "cls/bias", "box/kernel",
                                                                           "box/bias", "mask/kernel")}),
                 tmp_path / "ref_hot")
    got, want = run_saved_model(out, x), run_saved_model(ref, x)
    assert (got["detection_classes"] >= 8).any()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)
