"""subset: kept logits identical to the original's kept logits; softmax renormalized over the kept classes."""

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.errors import PipelineError
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.runtime import run
from graphslim.testing import digits, fixture_io, fixture_path, run_saved_model

# fixture, options, class-score output
CLASSIFIERS = [
    ("vgg_digits", "", "output_0"), ("resnet_digits", "", "output_0"), ("mobilenet_tiny", "", "output_0"),
    ("inception_tiny", "", "output_0"), ("fcn_tiny", "", "output_0"), ("multi_io", " output=classes", "classes"),
    ("tf_module", "", "logits"), ("tf1_model", "", "scores"), ("frozen_vgg", "", "Identity"),
    ("legacy_slots", "", "output_0"),
]


def logits_tensor(g, output):
    t = next(o.tensor for o in g.outputs if o.name == output)
    node = g.producer(t)
    return str(g.input(node, 0)) if node.op == "Softmax" else str(t)


def renormalized(p, keep):
    q = p[..., keep]
    return q / q.sum(-1, keepdims=True)


@pytest.mark.parametrize("name,extra,output", CLASSIFIERS)
def test_subset_keeps_logits_exactly(name, extra, output):
    g = graphslim.load(fixture_path(name))
    inputs, expected = fixture_io(name)
    n = g.shape(next(o.tensor for o in g.outputs if o.name == output))[-1]
    keep = [n - 1, 0, n // 2][: min(3, n - 1)]
    lt = logits_tensor(g, output)
    before = run(g, inputs, fetch=[lt])[lt]
    cost0 = g.cost()
    rep = graphslim.run_pipeline(g, f"subset{{keep={','.join(map(str, keep))}{extra}}}")
    stats = rep.passes[0]["stats"]
    after = run(g, inputs)
    got_logits = run(g, inputs, fetch=[lt])[lt]
    np.testing.assert_allclose(got_logits, before[..., keep], rtol=1e-6, atol=1e-6)
    if lt != str(next(o.tensor for o in g.outputs if o.name == output)):  # softmax output
        np.testing.assert_allclose(after[output], renormalized(expected[output], keep), rtol=1e-5, atol=1e-6)
    for other in set(expected) - {output}:  # other outputs untouched
        np.testing.assert_allclose(after[other], expected[other], rtol=1e-5, atol=1e-6)
    cost1 = g.cost()
    assert cost1.params < cost0.params and cost1.macs < cost0.macs
    assert stats["params"] == [cost0.params, cost1.params]
    assert stats["index_map"] == {k: i for i, k in enumerate(keep)}


def test_subset_labels_and_asset(tmp_path):
    g = graphslim.load(fixture_path("vgg_digits"))
    rep = graphslim.run_pipeline(g, "subset{labels=seven,two}")
    assert rep.passes[0]["stats"]["index_map"] == {7: 0, 2: 1}
    out = graphslim.save(g, tmp_path / "out")
    assert (out / "assets" / "labels.txt").read_text().split() == ["seven", "two"]
    inputs, expected = fixture_io("vgg_digits")
    np.testing.assert_allclose(run_saved_model(out, inputs)["output_0"], renormalized(expected["output_0"], [7, 2]),
                               rtol=1e-5, atol=1e-6)


def test_subset_detection_head_consistent():
    g = graphslim.load(fixture_path("ssd_tiny"))
    inputs, expected = fixture_io("ssd_tiny")
    lt = logits_tensor(g, "class_scores")
    before = run(g, inputs, fetch=[lt])[lt]
    keep = [4, 2]  # background 0 is kept first
    rep = graphslim.run_pipeline(g, "subset{keep=4,2 background=true output=class_scores}")
    assert rep.passes[0]["stats"]["sliced_outputs"] == {"class_scores": -1, "class_boxes": 1}
    got = run(g, inputs)
    full = [0] + keep
    np.testing.assert_allclose(run(g, inputs, fetch=[lt])[lt], before[..., full], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["class_scores"], renormalized(expected["class_scores"], full), rtol=1e-5, atol=1e-6)
    # per-class boxes have no background row: class k is row k-1
    np.testing.assert_allclose(got["class_boxes"], expected["class_boxes"][:, [k - 1 for k in keep], :], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["boxes"], expected["boxes"], rtol=1e-6, atol=1e-6)


def test_subset_drop_outputs_removes_head():
    g = graphslim.load(fixture_path("ssd_tiny"))
    n_weights = len(g.weights)
    graphslim.run_pipeline(g, "subset{keep=1 background=true output=class_scores drop_outputs=boxes,class_boxes}")
    assert [o.name for o in g.outputs] == ["class_scores"]
    assert len(g.weights) < n_weights - 2  # box conv and per-class dense are gone with their biases


def test_subset_digits_accuracy_not_worse():
    d = digits()
    keep = [1, 3, 5, 7, 8]
    mask = np.isin(d["y_test"], keep)
    x, y = d["x_test"][mask], d["y_test"][mask]
    g = graphslim.load(fixture_path("vgg_digits"))
    orig = run(g, {"image": x})["output_0"].argmax(-1)
    graphslim.run_pipeline(g, f"subset{{keep={','.join(map(str, keep))}}}")
    sub = np.array(keep)[run(g, {"image": x})["output_0"].argmax(-1)]
    acc_orig, acc_sub = float((orig == y).mean()), float((sub == y).mean())
    assert acc_sub >= acc_orig, (acc_sub, acc_orig)


def _blocked_head():
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 4)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    k = g.add_weight("head/kernel", np.ones((4, 6), np.float32))
    mm = g.add_node("head/MatMul", "MatMul", inputs=["x", k], attrs={"T": tf.float32})
    ax = g.add_node("cum/axis", "Const", attrs={"dtype": tf.int32, "value": np.array(-1, np.int32)})
    cs = g.add_node("cum", "Cumsum", inputs=[mm, ax], attrs={"T": tf.float32, "Tidx": tf.int32})
    g.outputs.append(SignatureArg("scores", cs.output(0)))
    g.infer_shapes()
    return g


def test_op_without_rule_in_class_group_is_named():
    g = _blocked_head()
    with pytest.raises(PipelineError, match=r"blocked at cum \(Cumsum\): no channel rule"):
        graphslim.run_pipeline(g, "subset{keep=1,2}")
    assert g.weights["head/kernel"].value.shape == (4, 6)  # untouched


@pytest.mark.parametrize("pipeline,message", [
    ("subset{keep=3,10}", r"class indices \[10\] are out of range: output 'output_0' has classes 0..9"),
    ("subset{labels=seven,sevn}", r"no class labelled 'sevn'.*Did you mean 'seven'"),
    ("subset{keep=1,1}", r"given twice"),
    ("subset{keep=1 labels=one}", r"exactly one"),
    ("subset{keep=1 output=nope}", r"no output 'nope'"),
])
def test_bad_class_selection(pipeline, message):
    g = graphslim.load(fixture_path("vgg_digits"))
    with pytest.raises(PipelineError, match=message):
        graphslim.run_pipeline(g, pipeline)


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    out = {}
    for arch, shape in (("MobileNetV2", (64, 64, 3)), ("ResNet50", (64, 64, 3))):
        model = getattr(keras.applications, arch)(weights=None, input_shape=shape)
        path = tmp_path_factory.mktemp("zoo") / arch
        model.export(str(path), verbose=False)
        out[arch] = path
    return out


@pytest.mark.parametrize("arch", ["MobileNetV2", "ResNet50"])
def test_subset_keras_applications(keras_models, arch):
    g = graphslim.load(keras_models[arch])
    x = {g.inputs[0].name: np.random.RandomState(0).rand(2, 64, 64, 3).astype("float32")}
    lt = logits_tensor(g, "output_0")
    before = run(g, x, fetch=[lt])[lt]
    keep = [954, 1, 430, 999, 0]
    cost0 = g.cost()
    graphslim.run_pipeline(g, "subset{keep=954,1,430,999,0}")
    np.testing.assert_allclose(run(g, x, fetch=[lt])[lt], before[..., keep], rtol=1e-6, atol=1e-6)
    cost1 = g.cost()
    head_in = g.shape(g.input(g.nodes(op="MatMul")[0], 0))[-1]
    assert cost0.params - cost1.params == (1000 - 5) * (head_in + 1)


def _detector_outputs(outputs):
    """x [N, 8] → one MatMul head per output ``(name, width, activation)``, shaped [N, 3, width]."""
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 8)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    for name, width, act in outputs:
        k = g.add_weight(f"{name}/kernel", np.ones((8, 3 * width), np.float32))
        t = g.add_node(f"{name}/MatMul", "MatMul", inputs=["x", k], attrs={"T": tf.float32}).output(0)
        shape = g.add_node(f"{name}/shape", "Const", attrs={"dtype": tf.int32, "value": np.array([-1, 3, width], np.int32)})
        t = g.add_node(f"{name}/Reshape", "Reshape", inputs=[t, shape], attrs={"T": tf.float32, "Tshape": tf.int32}).output(0)
        if act:
            t = g.add_node(f"{name}/{act}", act, inputs=[t], attrs={"T": tf.float32}).output(0)
        g.outputs.append(SignatureArg(name, t))
    g.infer_shapes()
    return g


@pytest.mark.parametrize("outputs,chosen", [
    ([("bbox_regression", 4, None), ("cls_logits", 91, None)], "cls_logits"),
    ([("boxes", 4, None), ("classification", 91, "Sigmoid"), ("masks", 28, "Sigmoid")], "classification"),
    ([("box_outputs", 91, None), ("class_outputs", 91, None)], "class_outputs"),  # never the boxes
    ([("landmarks", 10, None), ("output_0", 3, "Softmax")], "output_0"),
])
def test_class_output_found_by_name_and_structure(outputs, chosen):
    from graphslim.analysis.heads import find_class_head

    assert find_class_head(_detector_outputs(outputs), None, False, None, "subset").output == chosen


def test_ambiguous_class_output_lists_candidates():
    g = _detector_outputs([("a", 91, None), ("b", 91, None)])
    with pytest.raises(PipelineError, match=r"candidates: a \[None, 3, 91\].*b \[None, 3, 91\].*output=NAME"):
        graphslim.run_pipeline(g, "subset{keep=1,2}")
    graphslim.run_pipeline(g, "subset{keep=1,2 output=b}")
    assert g.shape(next(o.tensor for o in g.outputs if o.name == "b")) == (None, 3, 2)


@pytest.fixture(scope="module")
def retina_like_model(tmp_path_factory):
    from graphslim.testing import retina_like

    path = tmp_path_factory.mktemp("retina") / "m"
    retina_like().export(str(path), verbose=False)
    return path


def test_subset_raw_detection_heads_dynamic_size(retina_like_model, tmp_path):
    """keras-hub-style raw heads: a class conv shared by two FPN levels, Reshape((-1, K)) whose target
    is packed from the run-time batch size (several unknown dims on both sides), concatenated."""
    g = graphslim.load(retina_like_model)
    keep = [4, 0, 7]
    graphslim.run_pipeline(g, "subset{keep=4,0,7},dce")
    assert g.weights["cls_head/kernel"].value.shape[-1] == 3 * 3
    out = graphslim.save(g, tmp_path / "out")
    for h, w in ((32, 40), (48, 16)):  # any input size
        x = {"images": np.random.RandomState(h).rand(2, h, w, 3).astype("float32")}
        before, after = run_saved_model(retina_like_model, x), run_saved_model(out, x)
        np.testing.assert_allclose(after["cls_logits"], before["cls_logits"][..., keep], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(after["bbox_regression"], before["bbox_regression"])


class _PackedHead(tf.Module):
    """Detection post-processing shapes: logits [N, A, K] with class 0 the background, a
    ``[boxes | classes]`` tensor split again by two strided slices, and ``tf.slice(.., [0, 0, 1], ..)``
    dropping the background from the scores."""

    def __init__(self, k=7):
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.normal(size=(5, 3 * k)).astype("float32"), name="cls/kernel")
        self.b = tf.Variable(rng.normal(size=(5, 12)).astype("float32"), name="box/kernel")
        self.k = k

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32)])
    def __call__(self, x):
        logits = tf.reshape(tf.matmul(x, self.w), [-1, 3, self.k])
        boxes = tf.reshape(tf.matmul(x, self.b), [-1, 3, 4])
        packed = tf.concat([boxes, logits], axis=-1)  # [N, 3, 4 + K]
        boxes_again, logits_again = packed[..., :4], packed[..., 4:]
        scores = tf.slice(tf.sigmoid(logits_again), [0, 0, 1], [-1, -1, -1])  # no background
        return {"detection_boxes": boxes_again * 2.0, "class_scores": scores, "raw_logits": logits}


def test_subset_through_partial_slices(tmp_path):
    m = _PackedHead()
    src = tmp_path / "m"
    tf.saved_model.save(m, str(src), signatures={"serving_default": m.__call__})
    g = graphslim.load(src)
    graphslim.run_pipeline(g, "subset{keep=5,2 background=true output=raw_logits},dce")
    out = graphslim.save(g, tmp_path / "out")
    x = {"x": np.random.RandomState(1).normal(size=(4, 5)).astype("float32")}
    before, after = run_saved_model(src, x), run_saved_model(out, x)
    np.testing.assert_allclose(after["raw_logits"], before["raw_logits"][..., [0, 5, 2]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after["class_scores"], before["class_scores"][..., [4, 1]], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(after["detection_boxes"], before["detection_boxes"])


def test_subset_slice_refuses_mixing_its_range(tmp_path):
    """Without the background kept first, the slice that drops class 0 would take a kept class."""
    m = _PackedHead()
    tf.saved_model.save(m, str(tmp_path / "m"), signatures={"serving_default": m.__call__})
    g = graphslim.load(tmp_path / "m")
    with pytest.raises(PipelineError, match=r"channel 5 cannot take the place of channel 0"):
        graphslim.run_pipeline(g, "subset{keep=5,0,2 output=raw_logits}")
    # without class 0 at all the slice starts at 0 and keeps both
    graphslim.run_pipeline(g, "subset{keep=5,2 output=raw_logits}")
    assert g.shape(next(o.tensor for o in g.outputs if o.name == "class_scores"))[-1] == 2


class _Detector(tf.Module):
    """x [N, 6] → class logits of ``anchors`` × ``k`` classes and boxes, from two seeded kernels."""

    def __init__(self, k, anchors, seed):
        rng = np.random.default_rng(seed)
        self.cls = tf.Variable(rng.normal(size=(6, anchors * k)).astype("float32") * 2, name="cls/kernel")
        self.box = tf.Variable(rng.normal(size=(6, anchors * 4)).astype("float32"), name="box/kernel")
        self.k, self.a = k, anchors


class _NmsDetector(_Detector):
    """A one-stage detector with its post-processing in the graph, as tf-models-official's 'batched'
    export writes it: sigmoid scores, the background class dropped by tf.slice, CombinedNMS over the
    classes, class ids + 1 past the background."""

    def __init__(self, k=12, anchors=40):
        super().__init__(k, anchors, seed=0)

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        scores = tf.sigmoid(tf.reshape(tf.matmul(x, self.cls), [-1, self.a, self.k]))
        scores = tf.slice(scores, [0, 0, 1], [-1, -1, -1])
        boxes = tf.sigmoid(tf.reshape(tf.matmul(x, self.box), [-1, self.a, 1, 4]))
        b, s, c, n = tf.image.combined_non_max_suppression(boxes, scores, 10, 20, 0.5, 0.05, clip_boxes=False)
        return {"detection_boxes": b, "detection_scores": s, "detection_classes": tf.cast(c, tf.int32) + 1,
                "num_detections": n}


def _detections(out, i):
    n = int(out["num_detections"][i])
    return {(int(c), round(float(s), 5), tuple(np.round(b, 5))) for b, s, c in
            zip(out["detection_boxes"][i][:n], out["detection_scores"][i][:n], out["detection_classes"][i][:n])}


@pytest.mark.parametrize("ids", ["new", "original"])
def test_subset_detector_with_nms_in_the_graph(tmp_path, ids):
    m = _NmsDetector()
    src = tmp_path / "m"
    tf.saved_model.save(m, str(src), signatures={"serving_default": m.__call__})
    g = graphslim.load(src)
    keep = [0, 7, 3, 9]  # background first, then three classes
    rep = graphslim.run_pipeline(g, f"subset{{keep={','.join(map(str, keep))} background=true ids={ids}}},dce")
    stats = rep.passes[0]["stats"]
    assert stats["output"] == "detection_classes" and stats["classes_before"] == 12
    assert stats["ids_outputs"]["detection_classes"]["map"] == {7: 1, 3: 2, 9: 3}
    assert g.weights["cls/kernel"].value.shape == (6, 40 * 4)
    out = graphslim.save(g, tmp_path / "out")
    x = {"x": np.random.RandomState(3).normal(size=(5, 6)).astype("float32")}
    before, after = run_saved_model(src, x), run_saved_model(out, x)
    new_id = {7: 1, 3: 2, 9: 3}
    for i in range(5):
        kept_before = {(c if ids == "original" else new_id[c], s, b) for c, s, b in _detections(before, i) if c in new_id}
        got = _detections(after, i)
        assert kept_before <= got  # every original detection of a kept class, same box and score
        allowed = set(new_id) if ids == "original" else set(new_id.values())
        assert {c for c, _, _ in got} <= allowed


class _UnrolledNmsDetector(_Detector):
    """Post-processing the class axis cannot be followed through, as tf-models-official's 'v2' NMS
    writes it: one NMS per class, unrolled in Python, ids from tf.fill(.., i), then a top-k over all."""

    def __init__(self, k=6, anchors=30):
        super().__init__(k, anchors, seed=1)

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        scores = tf.sigmoid(tf.reshape(tf.matmul(x, self.cls), [-1, self.a, self.k]))
        boxes = tf.sigmoid(tf.reshape(tf.matmul(x, self.box), [-1, self.a, 4]))
        all_s, all_b, all_c = [], [], []
        for i in range(self.k):
            s_i = scores[:, :, i]
            idx, n = tf.image.non_max_suppression_padded(boxes, s_i, 5, 0.5, 0.3, pad_to_max_output_size=True)
            all_s.append(tf.gather(s_i, idx, batch_dims=1) * tf.cast(tf.sequence_mask(n, 5), tf.float32))
            all_b.append(tf.gather(boxes, idx, batch_dims=1))
            all_c.append(tf.fill(tf.shape(idx), i))
        s, top = tf.nn.top_k(tf.concat(all_s, 1), k=8)
        return {"detection_scores": s, "detection_boxes": tf.gather(tf.concat(all_b, 1), top, batch_dims=1),
                "detection_classes": tf.gather(tf.concat(all_c, 1), top, batch_dims=1),
                "num_detections": tf.reduce_sum(tf.cast(s > 0, tf.int32), 1)}


@pytest.mark.parametrize("ids", ["new", "original"])
def test_subset_keeps_unfollowable_post_processing_whole(tmp_path, ids):
    m = _UnrolledNmsDetector()
    src = tmp_path / "m"
    tf.saved_model.save(m, str(src), signatures={"serving_default": m.__call__})
    g = graphslim.load(src)
    nms_loops = len(g.nodes(("While", "StatelessWhile")))
    rep = graphslim.run_pipeline(g, f"subset{{keep=4,1 ids={ids}}},dce")
    stats = rep.passes[0]["stats"]
    assert "kept whole" in stats["postprocess"] and stats["classes_before"] == 6
    # the dropped classes' NMS, unrolled per class, is gone: 2 of the 6 loops are left
    assert "3 concatenation(s) unrolled per class" in stats["postprocess"]
    assert len(g.nodes(("While", "StatelessWhile"))) * 3 == nms_loops
    assert g.weights["cls/kernel"].value.shape == (6, 30 * 2)
    out = graphslim.save(g, tmp_path / "out")
    x = {"x": np.random.RandomState(3).normal(size=(6, 6)).astype("float32")}
    before, after = run_saved_model(src, x), run_saved_model(out, x)
    new_id = {4: 0, 1: 1}
    seen = 0
    for i in range(6):
        kept_before = {(c if ids == "original" else new_id[c], s, b) for c, s, b in _detections(before, i) if c in new_id}
        got = _detections(after, i)
        seen += len(kept_before)
        assert kept_before <= got  # every original detection of a kept class, same box and score
        allowed = set(new_id) if ids == "original" else set(new_id.values())
        assert {c for c, _, _ in got} <= allowed
    assert seen > 0
