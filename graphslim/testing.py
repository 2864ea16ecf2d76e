"""Helpers for graphslim's own tests and for users testing their passes (like ``torch.testing``).

Example::

    from graphslim.testing import fixture_path, fixture_io, assert_graph_matches
    g = graphslim.load(fixture_path("resnet_digits"))
    inputs, expected = fixture_io("resnet_digits")
    assert_graph_matches(g, inputs, expected, rtol=1e-5, atol=1e-5)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "models"


def fixture_index() -> list[dict]:
    """The entries of fixtures/models/index.json (one per fixture model)."""
    return json.loads((FIXTURES / "index.json").read_text())["fixtures"]


def fixture_entry(name: str) -> dict:
    for fx in fixture_index():
        if fx["name"] == name:
            return fx
    raise KeyError(f"no fixture {name!r}; have {[f['name'] for f in fixture_index()]}")


def fixture_path(name: str) -> Path:
    return FIXTURES / fixture_entry(name)["path"]


def fixture_io(name: str, signature: str | None = None) -> tuple[dict, dict]:
    """(inputs, expected outputs) of a fixture, keyed by signature input/output name."""
    fx = fixture_entry(name)
    file = fx["expected"] if signature in (None, "serving_default") else f"{name}.{signature}.expected.npz"
    data = np.load(FIXTURES / file)
    ins, outs = {}, {}
    for key in data.files:
        kind, _, rest = key.partition(":")
        rest = rest.split(":")[0]  # frozen graphs key by tensor name ("image:0")
        (ins if kind == "input" else outs)[rest] = data[key]
    return ins, outs


def digits() -> dict:
    """The fixed digits split: x_train, y_train, x_test, y_test."""
    data = np.load(FIXTURES / "digits.npz")
    return {k: data[k] for k in data.files}


def assert_close(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Every expected output present and allclose; the message names the output and the max error."""
    for key, exp in expected.items():
        assert key in actual, f"output {key!r} missing; have {sorted(actual)}"
        got = np.asarray(actual[key])
        assert got.shape == exp.shape, f"output {key!r}: shape {got.shape} != expected {exp.shape}"
        err = float(np.max(np.abs(got - exp))) if got.size else 0.0
        assert np.allclose(got, exp, rtol=rtol, atol=atol), f"output {key!r}: max abs error {err:.3g}"


def assert_graph_matches(graph, inputs: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Run the IR in TensorFlow and compare with ``expected``."""
    from graphslim.runtime import run

    assert_close(run(graph, inputs), expected, rtol, atol)


def run_saved_model(path, inputs: dict, signature: str = "serving_default") -> dict:
    """Outputs of a SavedModel's signature via ``tf.saved_model.load`` (the reference runtime)."""
    import tensorflow as tf

    obj = tf.saved_model.load(str(path))
    fn = obj.signatures[signature]
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in out.items()}


def zero_slices(graph, member, channels) -> None:
    """Zero the positions of group ``channels`` in a weight or constant member of a channel group."""
    idx = np.concatenate([member.index_map[c] for c in channels]).astype(int)
    value = graph.weight(member.name).value if member.kind == "weight" else graph.node(member.name).attr("value")
    value = value.copy()
    sl = [slice(None)] * value.ndim
    sl[member.axis] = idx
    value[tuple(sl)] = 0
    if member.kind == "weight":
        graph.set_weight(member.name, value)
    else:
        graph.node(member.name).set_attr("value", value)


def zero_produced_channels(graph, group, channels) -> None:
    """Make ``channels`` of a channel group all-zero activations: zero the sources' slices and every
    per-channel constant added on the way (biases, batch-norm shifts: the group weights in their
    expressions; over a layer norm, every weight of the group but the readers). Pruning such channels must
    not change the model's outputs."""
    from graphslim.analysis.constants import constant_value

    targets = {m.name for m in group.sources}
    params = [m for m in group.members if m.kind in ("weight", "const")]
    for m in group.members_of("tensor"):
        node = graph.node(m.tensor.node)
        if node.op in ("BiasAdd", "AddV2", "Add", "Sub"):
            for t in graph.inputs_of(node):
                if constant_value(graph, t) is not None:
                    anc = graph.ancestors([t.node])
                    targets |= {p.name for p in params if p.name in anc}
    if group.normalized_by:  # a layer norm over the channels (a transformer's hidden size): its scale and
        # shift, the embedding tables and a class token produce the channels too: every weight but the readers
        targets |= {m.name for m in group.members_of("weight") if m.role != "sink"}
    for m in params:
        if m.name in targets:
            zero_slices(graph, m, channels)


def digits_subset_model(path, classes: int = 8, epochs: int = 30, seed: int = 0):
    """A small CNN trained (Keras, seeded) on the digits ``0..classes-1`` only and exported to ``path``:
    the model ``extend`` adds the other digits to (imprinting's tests and benchmark). Conv 32 → conv 64
    → global pool → Dense 64 (ReLU) → Dense ``classes`` (softmax); input ``image``."""
    import keras

    d = digits()
    keep = d["y_train"] < classes
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(d["x_train"][keep], d["y_train"][keep], batch_size=32, epochs=epochs, verbose=0)
    model.export(str(path), verbose=False)
    keras.backend.clear_session()
    return path


def layernorm_net(input_shape=(16, 16, 3), width: int = 16, hidden: int = 32, stem: int = 4,
                  classes: int = 10, activation=None, seed: int = 0):
    """A small ConvNeXt-like Keras model (built, not trained): a ``stem``×``stem``/``stem`` conv →
    LayerNorm → 2 × [depthwise 3×3 → LayerNorm → Dense(``hidden``) → GELU → Dense(``width``)] +
    residual → global pool → LayerNorm → Dense(``classes``, ``activation``). Its residual stream of
    ``width`` channels is read by every LayerNorm. Layers are named ``stem``, ``stem_ln``, ``b{i}_dw``,
    ``b{i}_ln``, ``b{i}_pw1``, ``b{i}_pw2``, ``head_ln``, ``head``."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    x = inp = keras.Input(input_shape, name="image")
    x = layers.Conv2D(width, stem, strides=stem, name="stem")(x)
    x = layers.LayerNormalization(epsilon=1e-6, name="stem_ln")(x)
    for i in range(2):
        y = layers.DepthwiseConv2D(3, padding="same", name=f"b{i}_dw")(x)
        y = layers.LayerNormalization(epsilon=1e-6, name=f"b{i}_ln")(y)
        y = layers.Dense(hidden, name=f"b{i}_pw1")(y)
        y = layers.Activation("gelu", name=f"b{i}_gelu")(y)
        y = layers.Dense(width, name=f"b{i}_pw2")(y)
        x = layers.Add(name=f"b{i}_add")([x, y])
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.LayerNormalization(epsilon=1e-6, name="head_ln")(x)
    return keras.Model(inp, layers.Dense(classes, activation=activation, name="head")(x))


def valid_conv_graph(k: int, scale: float | None = None):
    """An IR graph ``x [?, ?, ?, 1] ─ Conv2D(k×k kernel of ``scale`` (default 1/k²), VALID) ─▶ "y"``:
    only inputs of at least k×k pixels are valid (to test checks that assume input sizes)."""
    import tensorflow as tf
    from tensorflow.core.framework import attr_value_pb2

    from graphslim.ir.attrs import shape_to_proto
    from graphslim.ir.graph import Graph, SignatureArg, Tensor

    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": attr_value_pb2.AttrValue(
        shape=shape_to_proto((None, None, None, 1)))})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    g.add_weight("conv/kernel", np.full((k, k, 1, 1), 1.0 / (k * k) if scale is None else scale, np.float32))
    g.add_node("conv", "Conv2D", ["x", "conv/kernel"],
               attrs={"T": tf.float32, "strides": [1, 1, 1, 1], "padding": b"VALID"})
    g.outputs.append(SignatureArg("y", Tensor("conv", 0)))
    g.infer_shapes()
    return g


def retina_like(classes: int = 9, anchors: int = 3, prior: float = 0.01, seed: int = 0):
    """A small Keras model shaped like keras-hub's RetinaNet raw heads (built, not trained): dynamic
    input size ``(None, None, 3)``, two feature levels, one class head and one box head Conv2D each
    *shared* by both levels, ``Reshape((-1, K))`` / ``Reshape((-1, 4))`` per level, concatenated into
    outputs ``cls_logits [N, anchors·positions, K]`` and ``bbox_regression [N, ..., 4]``. The class
    head's bias starts at the focal-loss prior ``-log((1-prior)/prior)``."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, 3), name="images")
    c1 = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c1")(inp)
    c2 = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c2")(c1)
    bias = keras.initializers.Constant(-float(np.log((1 - prior) / prior)))
    cls_head = layers.Conv2D(anchors * classes, 3, padding="same", bias_initializer=bias, name="cls_head")
    box_head = layers.Conv2D(anchors * 4, 3, padding="same", name="box_head")
    cls = [layers.Reshape((-1, classes), name=f"cls_pred_{i}")(cls_head(f)) for i, f in enumerate((c1, c2))]
    box = [layers.Reshape((-1, 4), name=f"box_pred_{i}")(box_head(f)) for i, f in enumerate((c1, c2))]
    return keras.Model(inp, {"cls_logits": layers.Concatenate(axis=1, name="cls_logits")(cls),
                             "bbox_regression": layers.Concatenate(axis=1, name="bbox_regression")(box)})


def detections(outputs: dict, i: int) -> set:
    """``{(class id, score, box)}`` of image ``i``'s valid detections in a detector's outputs
    (``num_detections`` plus ``detection_boxes``/``boxes``, ``detection_scores``/``confidence``,
    ``detection_classes``/``classes``), rounded to 4 digits (score) and 2 (box): float32 noise aside."""
    def field(*names):
        return next(outputs[n] for n in names if n in outputs)

    n = int(field("num_detections")[i])
    return {(int(c), round(float(s), 4), tuple(np.round(b, 2))) for b, s, c in zip(
        field("detection_boxes", "boxes")[i][:n], field("detection_scores", "confidence")[i][:n],
        field("detection_classes", "classes")[i][:n])}


def conv_chain(widths=(16, 8), k: int = 3, seed: int = 0):
    """An IR graph ``x [?, 6, 6, 3] → conv(widths[0]) → ReLU → conv(widths[1]) → ReLU → … → conv(2) → "y"``
    (k×k SAME convolutions named ``c{i}/Conv2D`` with kernels ``c{i}/kernel``, random weights)."""
    import tensorflow as tf

    from graphslim.ir.graph import Graph, SignatureArg, Tensor

    rng = np.random.RandomState(seed)
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 6, 6, 3)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    x, cin = Tensor("x", 0), 3
    for i, cout in enumerate(list(widths) + [2]):
        w = g.add_weight(f"c{i}/kernel", rng.randn(k, k, cin, cout).astype("f"))
        y = g.add_node(f"c{i}/Conv2D", "Conv2D", [x, w],
                       attrs={"T": tf.float32, "strides": [1, 1, 1, 1], "padding": "SAME"})
        x = g.add_node(f"c{i}/Relu", "Relu", [y], attrs={"T": tf.float32}).output(0) if i < len(widths) else y.output(0)
        cin = cout
    g.outputs.append(SignatureArg("y", x))
    g.infer_shapes()
    return g


def keras_attention_graph(seed: int = 0, bias: bool = False):
    """Keras 3's MultiHeadAttention equations as an IR graph over ``x [?, 5, 8]``, 3 heads of 4: projections
    ``abc,cde->abde`` (``q/kernel``, ``k/kernel``, ``v/kernel`` [8, 3, 4]), scores ``aecd,abcd->acbe``,
    Softmax, context ``acbe,aecd->abcd``, output ``abcd,cde->abe`` (``o/kernel`` [3, 4, 8]; with ``bias``
    an AddV2 of ``o/bias`` [8]) → ``"y"``."""
    import tensorflow as tf

    from graphslim.ir.graph import Graph, SignatureArg, Tensor

    rng = np.random.RandomState(seed)
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 5, 8)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))

    def einsum(name, eq, a, b):
        return g.add_node(name, "Einsum", inputs=[a, b], attrs={"T": tf.float32, "N": 2, "equation": eq}).output(0)

    def w(name, shape):
        return g.add_weight(name, rng.randn(*shape).astype("f")).output(0)

    x = Tensor("x", 0)
    q, k, v = (einsum(f"{n}/Einsum", "abc,cde->abde", x, w(f"{n}/kernel", (8, 3, 4))) for n in "qkv")
    scores = einsum("scores", "aecd,abcd->acbe", k, q)
    probs = g.add_node("softmax", "Softmax", inputs=[scores], attrs={"T": tf.float32}).output(0)
    ctx = einsum("context", "acbe,aecd->abcd", probs, v)
    y = einsum("o/Einsum", "abcd,cde->abe", ctx, w("o/kernel", (3, 4, 8)))
    if bias:
        y = g.add_node("o/Add", "AddV2", inputs=[y, w("o/bias", (8,))], attrs={"T": tf.float32}).output(0)
    g.outputs.append(SignatureArg("y", y))
    g.infer_shapes()
    return g


def keras_hub_bert(path, vocabulary: int = 500, sequence: int | None = None, seed: int = 0):
    """keras-hub's BertTextClassifier (bert_tiny's shape: 2 layers, 2 heads, hidden 128, FFN 512; 2 classes)
    built from constructor arguments with random weights, exported to ``path`` and loaded. ``sequence``:
    give the inputs that static length (else any length)."""
    import keras
    import keras_hub

    import graphslim

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=vocabulary, num_layers=2, num_heads=2, hidden_dim=128,
                                             intermediate_dim=512, max_sequence_length=128)
    keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None).export(str(path), verbose=False)
    keras.backend.clear_session()
    g = graphslim.load(path)
    if sequence is not None:
        for a in g.inputs:
            g.node(a.tensor.node).set_attr("shape", (None, sequence))
        g.infer_shapes()
    return g


def keras_hub_vit(path, image: int = 32, patch: int = 8, classes: int = 10, seed: int = 0):
    """keras-hub's ViTImageClassifier (2 layers, 3 heads, hidden 192, MLP 768, like ViT-Ti/16) on ``image``²×3
    images built from constructor arguments with random weights, exported to ``path`` and loaded."""
    import keras
    import keras_hub

    import graphslim

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ViTBackbone(image_shape=(image, image, 3), patch_size=patch, num_layers=2,
                                            num_heads=3, hidden_dim=192, mlp_dim=768)
    keras_hub.models.ViTImageClassifier(backbone, num_classes=classes, preprocessor=None).export(str(path),
                                                                                                verbose=False)
    keras.backend.clear_session()
    return graphslim.load(path)


def conv_graph(*, k=(3, 3), cin=4, cout=6, hw=(9, 10), strides=(1, 1), dilations=(1, 1), padding="SAME",
               explicit=None, bias=True, fmt="NHWC", seed=0, name="layer", kernel=None):
    """One Conv2D of any geometry as an IR graph: x → Conv2D(NAME/kernel) [→ BiasAdd(NAME/bias)] → Relu →
    "y" (``explicit``: EXPLICIT padding top, bottom, left, right; ``fmt``: NHWC or NCHW; ``kernel``: the
    kernel's values, random by default). The conv node is ``net/NAME/Conv2D``."""
    import tensorflow as tf

    from graphslim.ir.graph import Graph, SignatureArg, Tensor

    rng = np.random.default_rng(seed)
    g = Graph()
    shape = (None, *hw, cin) if fmt == "NHWC" else (None, cin, *hw)
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": shape})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    values = rng.normal(size=(*k, cin, cout)) if kernel is None else kernel
    kern = g.add_weight(f"{name}/kernel", np.asarray(values, np.float32))

    def four(a, b):
        return [1, a, b, 1] if fmt == "NHWC" else [1, 1, a, b]

    attrs = {"T": tf.float32, "strides": four(*strides), "dilations": four(*dilations), "padding": padding,
             "data_format": fmt}
    if explicit is not None:
        t, b_, l, r = explicit
        attrs["explicit_paddings"] = [0, 0, t, b_, l, r, 0, 0] if fmt == "NHWC" else [0, 0, 0, 0, t, b_, l, r]
    y = g.add_node(f"net/{name}/Conv2D", "Conv2D", ["x", kern], attrs=attrs)
    if bias:
        b = g.add_weight(f"{name}/bias", rng.normal(size=(cout,)).astype(np.float32))
        y = g.add_node(f"net/{name}/BiasAdd", "BiasAdd", [y, b], attrs={"T": tf.float32, "data_format": fmt})
    out = g.add_node("net/relu", "Relu", [y], attrs={"T": tf.float32})
    g.outputs.append(SignatureArg("y", out.output(0)))
    g.infer_shapes()
    return g


def pass_stats(report, i: int = 0) -> dict:
    """The statistics pass ``i`` of a pipeline report recorded."""
    return report.passes[i]["stats"]


def layer_stats(report, name: str | None = None, i: int = 0) -> dict:
    """The per-layer record of layer ``name`` (the first one when None) in pass ``i``'s statistics."""
    recs = pass_stats(report, i)["layers"]
    return recs[0] if name is None else next(r for r in recs if r["layer"] == name)
