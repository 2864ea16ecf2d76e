"""The emitter writes a SavedModel that TensorFlow, saved_model_cli, Keras and TFLite all accept, with
the IR's outputs, names, variables and assets, and writes it atomically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.core.protobuf import saved_model_pb2, trackable_object_graph_pb2

from graphslim.errors import EmitError
from graphslim.io.emitter import save
from graphslim.ir.attrs import shape_to_proto
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.ir.tfconv import graph_to_graph_def
from graphslim.runtime import run
from graphslim.testing import valid_conv_graph

RTOL = ATOL = 1e-5
LABELS = b"cat\ndog\nbird\nfish\nfrog\n"


def _placeholder(g: Graph, name: str, shape, dtype=tf.float32) -> None:
    g.add_node(name, "Placeholder",
               attrs={"dtype": dtype, "shape": attr_value_pb2.AttrValue(shape=shape_to_proto(shape))})
    g.inputs.append(SignatureArg(name, Tensor(name, 0)))


def tiny_graph(seed: int = 0) -> Graph:
    """x ─ Conv2D(conv2d/kernel) ─ BiasAdd(conv2d/bias) ─ Relu ─▶ "features"
       x ─ Mean(H, W) ─ MatMul(dense/kernel) ─ BiasAdd(dense/bias, not trainable) ─▶ "logits"."""
    rng = np.random.default_rng(seed)
    g = Graph()
    _placeholder(g, "x", (None, 8, 8, 3))
    g.add_weight("conv2d/kernel", rng.normal(size=(3, 3, 3, 4)).astype(np.float32))
    g.add_weight("conv2d/bias", rng.normal(size=(4,)).astype(np.float32))
    g.add_weight("dense/kernel", rng.normal(size=(3, 5)).astype(np.float32))
    g.add_weight("dense/bias", rng.normal(size=(5,)).astype(np.float32), trainable=False)
    f32 = {"T": tf.float32}
    g.add_node("conv2d/Conv2D", "Conv2D", ["x", "conv2d/kernel"],
               attrs={**f32, "strides": [1, 1, 1, 1], "padding": "SAME", "data_format": "NHWC",
                      "dilations": [1, 1, 1, 1]})
    g.add_node("conv2d/BiasAdd", "BiasAdd", ["conv2d/Conv2D", "conv2d/bias"], attrs=f32)
    g.add_node("conv2d/Relu", "Relu", ["conv2d/BiasAdd"], attrs=f32)
    g.add_node("mean/axes", "Const", attrs={"value": np.array([1, 2], np.int32), "dtype": tf.int32})
    g.add_node("mean", "Mean", ["x", "mean/axes"], attrs={**f32, "Tidx": tf.int32, "keep_dims": False})
    g.add_node("dense/MatMul", "MatMul", ["mean", "dense/kernel"],
               attrs={**f32, "transpose_a": False, "transpose_b": False})
    g.add_node("dense/BiasAdd", "BiasAdd", ["dense/MatMul", "dense/bias"], attrs=f32)
    g.outputs.append(SignatureArg("features", Tensor("conv2d/Relu", 0)))
    g.outputs.append(SignatureArg("logits", Tensor("dense/BiasAdd", 0)))
    g.assets["labels.txt"] = LABELS
    g.infer_shapes()
    return g


def reference(g: Graph, x: np.ndarray) -> dict:
    """The tiny graph computed directly from its weights."""
    w = {k: v.value for k, v in g.weights.items()}
    conv = tf.nn.conv2d(x, w["conv2d/kernel"], strides=1, padding="SAME").numpy()
    features = np.maximum(conv + w["conv2d/bias"], 0)
    logits = x.mean(axis=(1, 2)) @ w["dense/kernel"] + w["dense/bias"]
    return {"features": features, "logits": logits}


@pytest.fixture(scope="module")
def graph() -> Graph:
    return tiny_graph()


@pytest.fixture(scope="module")
def emitted(graph, tmp_path_factory) -> Path:
    return save(graph, tmp_path_factory.mktemp("emit") / "model")


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)


def assert_outputs(got: dict, want: dict, atol=ATOL, rtol=RTOL) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=rtol, atol=atol, err_msg=k)


# ------------------------------------------------------------------------------- numerics, signature
def test_signature_outputs_equal_reference(graph, emitted, x):
    loaded = tf.saved_model.load(str(emitted))
    sig = loaded.signatures["serving_default"]
    want = reference(graph, x)
    assert_outputs(sig(x=tf.constant(x)), want)
    assert_outputs(loaded.serve(x), want)

    _, inputs = sig.structured_input_signature
    assert inputs == {"x": tf.TensorSpec((None, 8, 8, 3), tf.float32, name="x")}
    outputs = sig.structured_outputs
    assert sorted(outputs) == ["features", "logits"]
    for arg in graph.outputs:
        spec = outputs[arg.name]
        assert spec.dtype == graph.dtype(arg.tensor)
        assert tuple(spec.shape.as_list()) == graph.shape(arg.tensor)
    assert graph.shape(Tensor("dense/BiasAdd", 0)) == (None, 5)  # the comparison above is not vacuous


def function_nodes(saved_model_dir: Path, op: str) -> dict:
    """``{node name: op}`` of the one function in the SavedModel that contains an ``op`` node."""
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    lib = sm.meta_graphs[0].graph_def.library.function
    bodies = [f for f in lib if any(n.op == op for n in f.node_def)]
    assert len(bodies) == 1, "the graph must be in the SavedModel exactly once"
    return {n.name: n.op for n in bodies[0].node_def}


def test_node_names_kept_inside_the_function(graph, emitted):
    names = function_nodes(emitted, "Conv2D")
    for node in graph.nodes():
        if node.op not in ("Placeholder", "Weight"):
            assert names.get(node.name) == node.op, node.name
    for w in graph.weights:
        assert names.get(w) == "ReadVariableOp"
    assert not any(n.startswith("import/") for n in names)
    assert "Placeholder" not in names.values()


def test_saved_model_cli_shows_signature(emitted):
    cli = Path(sys.executable).parent / "saved_model_cli"
    proc = subprocess.run([str(cli), "show", "--dir", str(emitted), "--all"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "serving_default" in proc.stdout
    for name in ("inputs['x']", "outputs['features']", "outputs['logits']"):
        assert name in proc.stdout, name


@pytest.mark.parametrize("endpoint", ["serving_default", "serve"])
def test_keras_tfsmlayer(graph, emitted, x, endpoint):
    import keras

    layer = keras.layers.TFSMLayer(str(emitted), call_endpoint=endpoint)
    assert_outputs(layer(x), reference(graph, x))
    assert len(layer.trainable_weights) == 3 and len(layer.non_trainable_weights) == 1


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_tflite_conversion(graph, emitted, x):
    model = tf.lite.TFLiteConverter.from_saved_model(str(emitted)).convert()
    interpreter = tf.lite.Interpreter(model_content=model)
    runner = interpreter.get_signature_runner("serving_default")
    assert_outputs(runner(x=x), reference(graph, x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------- variables
def test_variables_keep_names_and_trainable_flags(graph, emitted):
    loaded = tf.saved_model.load(str(emitted))
    assert sorted(v.name for v in loaded.variables) == sorted(f"{n}:0" for n in graph.weights)
    assert sorted(v.name for v in loaded.trainable_variables) == [
        "conv2d/bias:0", "conv2d/kernel:0", "dense/kernel:0"]
    assert [v.name for v in loaded.non_trainable_variables] == ["dense/bias:0"]
    for v in loaded.variables:
        np.testing.assert_array_equal(v.numpy(), graph.weights[v.name[:-2]].value)
        assert v.trainable == graph.weights[v.name[:-2]].trainable

    reader = tf.train.load_checkpoint(str(emitted / "variables" / "variables"))
    object_graph = trackable_object_graph_pb2.TrackableObjectGraph()
    object_graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    full_names = {}
    for node in object_graph.nodes:
        for attr in node.attributes:
            if attr.name == "VARIABLE_VALUE":
                full_names[attr.full_name] = attr.checkpoint_key
    assert sorted(full_names) == sorted(graph.weights)
    # Checkpoint keys follow the weight names (TensorFlow escapes "/" in a key as ".S").
    assert full_names["conv2d/kernel"] == "weights/conv2d.Skernel/.ATTRIBUTES/VARIABLE_VALUE"
    np.testing.assert_array_equal(reader.get_tensor(full_names["dense/kernel"]),
                                  graph.weights["dense/kernel"].value)


def test_gradient_step_on_loaded_model_changes_trainable_weights(graph, emitted, x):
    loaded = tf.saved_model.load(str(emitted))
    before = {v.name: v.numpy().copy() for v in loaded.variables}
    with tf.GradientTape() as tape:
        out = loaded.serve(x)
        loss = tf.reduce_sum(out["logits"] ** 2) + tf.reduce_sum(out["features"])
    grads = tape.gradient(loss, loaded.trainable_variables)
    assert all(g is not None for g in grads)
    for v, g in zip(loaded.trainable_variables, grads):
        v.assign_sub(0.01 * g)
    for v in loaded.variables:
        changed = not np.array_equal(v.numpy(), before[v.name])
        assert changed == v.trainable, v.name
    # The model computes with the updated values.
    assert not np.allclose(loaded.serve(x)["logits"], reference(graph, x)["logits"])


# -------------------------------------------------------------------------------------------- assets
def test_assets_are_written(emitted):
    assert (emitted / "assets" / "labels.txt").read_bytes() == LABELS
    loaded = tf.saved_model.load(str(emitted))
    assert Path(loaded.assets["labels.txt"].asset_path.numpy().decode()).read_bytes() == LABELS


# ------------------------------------------------------------------------------------ signature edge
def test_odd_signatures_and_names(tmp_path):
    """Outputs bound to an input and to a weight, two inputs, a node named like a weight's scope,
    weight names that flatten alike, an unused weight, a caller's name scope."""
    g = Graph()
    _placeholder(g, "a", (None, 3))
    _placeholder(g, "b", (None, 3), tf.int32)
    g.add_weight("mul/scale", np.array([1.0, 2.0, 3.0], np.float32))
    g.add_weight("mul_scale", np.array([5.0, 5.0, 5.0], np.float32))  # flattens like "mul/scale"
    g.add_weight("unused", np.zeros((2,), np.float32))  # read by nothing: still a variable
    g.add_node("mul", "Mul", ["a", "mul/scale"], attrs={"T": tf.float32})  # named like a weight's scope
    g.add_node("add", "AddV2", ["mul", "mul_scale"], attrs={"T": tf.float32})
    g.outputs += [SignatureArg("scaled", Tensor("add", 0)), SignatureArg("b_out", Tensor("b", 0)),
                  SignatureArg("scale_out", Tensor("mul/scale", 0))]
    g.infer_shapes()
    with tf.name_scope("caller"):  # must not leak into the variable names
        path = save(g, tmp_path / "m")
    loaded = tf.saved_model.load(str(path))
    a = np.ones((2, 3), np.float32)
    b = np.arange(6, dtype=np.int32).reshape(2, 3)
    out = loaded.signatures["serving_default"](a=tf.constant(a), b=tf.constant(b))
    np.testing.assert_array_equal(out["scaled"], a * [1, 2, 3] + 5)
    np.testing.assert_array_equal(out["b_out"], b)
    assert out["b_out"].dtype == tf.int32
    np.testing.assert_array_equal(out["scale_out"], [1, 2, 3])
    assert sorted(v.name for v in loaded.variables) == ["mul/scale:0", "mul_scale:0", "unused:0"]
    names = function_nodes(path, "Mul")
    assert names["mul"] == "Mul" and names["add"] == "AddV2"
    assert names["mul/scale"] == names["mul_scale"] == "ReadVariableOp"


def test_save_leaves_the_graph_unchanged(tmp_path):
    g = tiny_graph()
    before = graph_to_graph_def(g).SerializeToString(deterministic=True)
    values = {k: w.value.copy() for k, w in g.weights.items()}
    save(g, tmp_path / "m")
    assert graph_to_graph_def(g).SerializeToString(deterministic=True) == before
    assert [(a.name, a.tensor) for a in g.inputs] == [("x", Tensor("x", 0))]
    for k, w in g.weights.items():
        np.testing.assert_array_equal(w.value, values[k])


# ----------------------------------------------------------------------------------------- atomicity
def _siblings(path: Path) -> list:
    return sorted(p.name for p in path.parent.iterdir())


def test_existing_output_is_refused_and_left_untouched(graph, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(EmitError, match="force") as err:
        save(graph, out)
    assert str(out) in str(err.value)
    assert (out / "keep.txt").read_text() == "old"
    assert _siblings(out) == ["model"]


def test_force_replaces_existing_output(graph, tmp_path, x):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert save(graph, out, force=True) == out
    assert not (out / "keep.txt").exists()
    loaded = tf.saved_model.load(str(out))  # keep a reference: its variables die with it
    assert_outputs(loaded.serve(x), reference(graph, x))
    assert _siblings(out) == ["model"]


def _bad_attr_graph() -> Graph:
    g = tiny_graph()
    g.node("conv2d/Conv2D").set_attr("padding", "SIDEWAYS")  # not one of SAME / VALID / EXPLICIT
    return g


def _bad_dtype_graph() -> Graph:
    g = tiny_graph()
    g.weights["dense/bias"].value = np.array([object()] * 5, dtype=object)
    return g


@pytest.mark.parametrize("make_graph, causes", [(_bad_attr_graph, ("'conv2d/Conv2D'", "padding")),
                                                (_bad_dtype_graph, ("'dense/bias'", "dtype object"))])
@pytest.mark.parametrize("force", [False, True])
def test_failure_leaves_nothing_behind(tmp_path, make_graph, causes, force):
    out = tmp_path / "model"
    if force:
        out.mkdir()
        (out / "keep.txt").write_text("old")
    with pytest.raises(EmitError) as err:
        save(make_graph(), out, force=force)
    message = str(err.value)
    assert str(out) in message and all(c in message for c in causes), message
    assert "\n" not in message
    if force:  # the old model survives a failed replacement
        assert (out / "keep.txt").read_text() == "old"
        assert _siblings(out) == ["model"]
    else:
        assert _siblings(out) == []


def test_missing_parent_directories_are_created_and_removed_on_failure(graph, tmp_path):
    with pytest.raises(EmitError):
        save(_bad_attr_graph(), tmp_path / "a" / "b" / "model")
    assert list(tmp_path.iterdir()) == []
    out = save(graph, tmp_path / "a" / "b" / "model")
    assert (out / "saved_model.pb").is_file()


# ------------------------------------------------------------------------------------------------ load check
def test_the_load_check_runs_in_the_execution_child(graph, tmp_path, monkeypatch, x):
    """TensorFlow's loader never runs in graphslim's process for the check: it runs in the shared
    execution child, on a copy in its scratch directory, which is removed afterwards."""
    from tensorflow.python.saved_model import function_deserialization

    from graphslim.sandbox import shared_child

    def refuse(*args, **kwargs):
        raise AssertionError("the load check ran in graphslim's own process")

    with monkeypatch.context() as m:
        m.setattr(tf.saved_model, "load", refuse)
        m.setattr(function_deserialization, "load_function_def_library", refuse)
        out = save(graph, tmp_path / "model")
    child = shared_child()
    assert child.alive and not list(child.scratch.glob("check-*"))
    loaded = tf.saved_model.load(str(out))
    assert_outputs(loaded.serve(x), reference(graph, x))


def test_a_load_check_that_kills_its_process_is_a_clean_error(graph, tmp_path, monkeypatch):
    """The child dies during the check (as on a crash in TensorFlow's loader): EmitCheckError (exit 3)
    naming the signal, nothing written, graphslim's process unharmed; the next save starts a new child."""
    import os
    import signal

    from graphslim.errors import EmitCheckError
    from graphslim.sandbox import Child

    request = Child._request

    def killed(self, header, *args, **kwargs):
        if header.get("op") == "check_saved_model":
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        return request(self, header, *args, **kwargs)

    out = tmp_path / "model"
    with monkeypatch.context() as m:
        m.setattr(Child, "_request", killed)
        with pytest.raises(EmitCheckError, match="does not load in TensorFlow") as err:
            save(graph, out)
    message = str(err.value)
    assert "SIGKILL" in message and "nothing was written" in message and "\n" not in message, message
    assert err.value.exit_code == 3
    assert _siblings(out) == []
    assert (save(graph, out) / "saved_model.pb").is_file()


# ------------------------------------------------------------------------------------------------ XLA
def _must_compile(saved_model_dir: Path) -> dict:
    """``{function name: _XlaMustCompile}`` of the functions in the SavedModel that hold a Conv2D."""
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    lib = sm.meta_graphs[0].graph_def.library.function
    return {f.signature.name: f.attr["_XlaMustCompile"].b if "_XlaMustCompile" in f.attr else None
            for f in lib if any(n.op == "Conv2D" for n in f.node_def)}


def test_jit_compile_marks_the_function_for_xla_and_keeps_outputs_and_training(graph, emitted, x, tmp_path):
    path = save(graph, tmp_path / "jit", jit_compile=True)
    assert list(_must_compile(path).values()) == [True]
    assert list(_must_compile(emitted).values()) == [None]  # the default is TensorFlow's executor
    loaded = tf.saved_model.load(str(path))
    want = reference(graph, x)
    assert_outputs(loaded.signatures["serving_default"](x=tf.constant(x)), want)
    assert_outputs(loaded.serve(x[:1]), {k: v[:1] for k, v in want.items()})  # another input shape
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(loaded.serve(x)["logits"] ** 2)
    grads = tape.gradient(loss, loaded.trainable_variables)
    assert all(g is not None for g in grads) and len(grads) == 3
    # graphslim reads its own XLA-marked model back
    from graphslim.io.loader import load

    again = load(path)
    assert sorted(again.weights) == sorted(graph.weights)
    assert_outputs(run(again, {"x": x}), want)


def _string_graph() -> Graph:
    """x ─ Mul(scale) ─ AsString ─▶ "text": XLA has no kernel for AsString."""
    g = Graph()
    _placeholder(g, "x", (None, 3))
    g.add_weight("scale", np.array([1.0, 2.0, 3.0], np.float32))
    g.add_node("mul", "Mul", ["x", "scale"], attrs={"T": tf.float32})
    g.add_node("text", "AsString", ["mul"], attrs={"T": tf.float32, "precision": -1, "scientific": False,
                                                  "shortest": False, "width": -1, "fill": ""})
    g.outputs.append(SignatureArg("text", Tensor("text", 0)))
    g.infer_shapes()
    return g


def test_jit_compile_refuses_a_model_xla_cannot_compile(tmp_path):
    g = _string_graph()
    out = tmp_path / "model"
    with pytest.raises(EmitError) as err:
        save(g, out, jit_compile=True)
    message = str(err.value)
    assert "XLA has no kernel for AsString" in message and "--jit-compile" in message, message
    assert str(out) in message and "\n" not in message
    assert _siblings(out) == []
    # Without jit_compile the same graph is written and runs.
    loaded = tf.saved_model.load(str(save(g, out)))
    got = loaded.signatures["serving_default"](x=tf.constant([[1.0, 1.0, 1.0]]))["text"].numpy()
    assert [float(s) for s in got[0]] == [1.0, 2.0, 3.0]


def test_jit_compile_check_tries_a_larger_input_before_giving_up(tmp_path):
    # 40x40 kernels do not fit the first assumed size (32); the check retries at 256 and passes.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = save(valid_conv_graph(40), tmp_path / "m", jit_compile=True)
    x = np.random.default_rng(0).random((1, 41, 45, 1), np.float32)
    loaded = tf.saved_model.load(str(path))
    got = loaded.serve(x)["y"].numpy()
    want = tf.nn.conv2d(x, np.full((40, 40, 1, 1), 1 / 1600, np.float32), 1, "VALID").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_jit_compile_check_warns_but_writes_when_only_assumed_shapes_fail(tmp_path):
    from graphslim.errors import XlaCheckWarning

    with pytest.warns(XlaCheckWarning, match=r"could not be checked for XLA.*\[1, 256, 256, 1\]"):
        path = save(valid_conv_graph(300), tmp_path / "m", jit_compile=True)
    assert list(_must_compile(path).values()) == [True]
    x = np.ones((1, 300, 301, 1), np.float32)
    loaded = tf.saved_model.load(str(path))
    # float32 sum of 90,000 terms: rtol 1e-4
    np.testing.assert_allclose(loaded.serve(x)["y"].numpy(), np.ones((1, 1, 2, 1)), rtol=1e-4)


def test_jit_compile_check_refuses_a_static_model_that_fails_at_its_own_shape(tmp_path):
    g = valid_conv_graph(300)
    g.node("x").attrs["shape"] = attr_value_pb2.AttrValue(shape=shape_to_proto((1, 300, 301, 1)))
    g.infer_shapes()
    g.node("x").attrs["shape"] = attr_value_pb2.AttrValue(shape=shape_to_proto((1, 32, 32, 1)))
    out = tmp_path / "m"
    with pytest.raises(EmitError, match="XLA cannot compile it"):
        save(g, out, jit_compile=True)
    assert _siblings(out) == []
