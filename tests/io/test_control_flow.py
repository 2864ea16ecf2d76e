"""Functional control flow end to end: While/If/Case bodies, map_fn and TensorLists load, pass through
passes, and are written with every function they need; variables used inside bodies become weights;
what the emitter writes always loads (or nothing is written)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.errors import EmitCheckError, LoadError, VerificationError
from graphslim.testing import assert_close, run_saved_model


def _scaled(expected: dict) -> float:
    return max(1.0, max(float(np.max(np.abs(v))) for v in expected.values()))


class _Loops(tf.Module):
    """Variables read inside a while_loop body, a map_fn, a cond branch and a switch_case, nested."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.normal(size=(4, 6)).astype("float32"), name="w")
        self.b = tf.Variable(rng.normal(size=(6,)).astype("float32"), name="b")
        self.emb = tf.Variable(rng.normal(size=(10, 6)).astype("float32"), name="emb")
        self.head = tf.Variable(rng.normal(size=(6, 3)).astype("float32"), name="head")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int32)])
    def __call__(self, x, ids):
        y = tf.matmul(x, self.w)

        def body(i, acc):
            inner = tf.cond(i % 2 == 0, lambda: tf.nn.relu(y + self.b), lambda: tf.tanh(y - self.b))
            return i + 1, acc + inner * tf.cast(i, tf.float32)

        _, acc = tf.while_loop(lambda i, a: i < 3, body, [0, tf.zeros_like(y)])
        rows = tf.map_fn(lambda r: tf.reduce_sum(r) * self.b + tf.gather(self.emb, 2), acc)
        picked = tf.gather(self.emb, ids)  # ResourceGather outside the loop
        mixed = tf.switch_case(tf.reduce_sum(ids) % 3, [lambda: rows + picked, lambda: rows * 2.0,
                                                        lambda: rows - self.b])
        arr = tf.TensorArray(tf.float32, size=2)
        arr = arr.write(0, mixed).write(1, mixed * self.b)
        stacked = tf.reduce_sum(arr.stack(), axis=0)
        return {"logits": tf.matmul(stacked, self.head), "features": stacked}


@pytest.fixture(scope="module")
def loops_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cf") / "loops"
    m = _Loops()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.__call__})
    return path


def _loops_inputs(n=5, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(n, 4)).astype("float32"), "ids": rng.integers(0, 10, size=n).astype("int32")}
            for n in (n, n + 1, n + 2)]  # ids sums differ: every switch_case branch is taken


def test_loop_bodies_are_written_and_match(tmp_path, loops_model):
    g = graphslim.load(loops_model)
    ops = {n.op for n in g.nodes()}
    assert {"StatelessWhile", "StatelessIf"} & ops or {"While", "If"} & ops, ops
    # variables read inside the bodies are weights of the graph, passed in as values
    assert {"w", "b", "emb", "head"} <= set(g.weights)
    assert g.functions, "the loop bodies are kept beside the graph"
    out = graphslim.save(g, tmp_path / "out")
    for inputs in _loops_inputs():
        expected = run_saved_model(loops_model, inputs)
        tol = 1e-5 * _scaled(expected)
        assert_close(run_saved_model(out, inputs), expected, rtol=1e-5, atol=tol)
    # and the written model reads back: variables are still weights
    assert {"w", "b", "emb", "head"} <= set(graphslim.load(out).weights)


def test_loop_model_through_passes_and_cli(tmp_path, loops_model):
    out = tmp_path / "out"
    g = graphslim.load(loops_model)
    graphslim.run_pipeline(g, "fold-batchnorm,fuse-batchnorm,dce")
    graphslim.save(g, out)
    inputs = _loops_inputs()[0]
    expected = run_saved_model(loops_model, inputs)
    assert_close(run_saved_model(out, inputs), expected, rtol=1e-5, atol=1e-5 * _scaled(expected))
    assert json.loads((out / "graphslim.json").read_text())["written_by"] == "graphslim"


def test_truncate_drops_unused_bodies(tmp_path, loops_model):
    """A pass that removes the loops leaves their functions out of the written model."""
    g = graphslim.load(loops_model)
    matmul = next(n for n in g.nodes("MatMul") if "w" in {t.node for t in g.inputs_of(n)})
    g.outputs = [type(g.outputs[0])("y", matmul.output(0))]
    g.remove_dead_nodes()
    out = graphslim.save(g, tmp_path / "out")
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((out / "saved_model.pb").read_bytes())
    names = [f.signature.name for f in sm.meta_graphs[0].graph_def.library.function]
    assert not any("while" in n or "cond" in n or "map" in n for n in names), names


def test_missing_body_is_a_verification_error(loops_model):
    g = graphslim.load(loops_model)
    body = next(n for n in g.functions if "body" in n)
    del g.functions[body]
    with pytest.raises(VerificationError, match=body):
        g.verify()


def test_emitter_refuses_what_tensorflow_cannot_load(tmp_path, loops_model):
    """A body whose cached shapes contradict the graph saves but does not load in TensorFlow: the
    emitter's load check catches it, exit code 3, nothing written."""
    g = graphslim.load(loops_model)
    fname, fdef = next((n, f) for n, f in g.functions.items()
                       if any(nd.op in ("Mul", "AddV2") for nd in f.node_def))
    nd = next(nd for nd in fdef.node_def if nd.op in ("Mul", "AddV2"))
    shape = nd.attr["_output_shapes"].list.shape.add()
    for d in (1, 2, 3, 4, 5):
        shape.dim.add().size = d
    with pytest.raises(EmitCheckError, match="does not load in TensorFlow") as err:
        graphslim.save(g, tmp_path / "out")
    assert err.value.exit_code == 3
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_variable_assigned_in_a_loop_is_refused(tmp_path):
    class Counter(tf.Module):
        def __init__(self):
            self.v = tf.Variable(np.ones(3, "float32"), name="v")

        @tf.function(input_signature=[tf.TensorSpec([3], tf.float32)])
        def __call__(self, x):
            def body(i):
                self.v.assign_add(x)
                return i + 1

            (i,) = tf.while_loop(lambda i: i < 2, body, [0])
            with tf.control_dependencies([i]):
                return {"out": self.v.read_value() * 1.0}

    m = Counter()
    tf.saved_model.save(m, str(tmp_path / "m"), signatures={"serving_default": m.__call__})
    with pytest.raises(LoadError, match=r"AssignAddVariableOp.*assigns variables"):
        graphslim.load(tmp_path / "m")


TF1_COND = textwrap.dedent("""
    import sys, numpy as np, tensorflow as tf
    tf.compat.v1.disable_eager_execution()
    tf.compat.v1.enable_control_flow_v2()
    tf.compat.v1.enable_resource_variables()
    out = sys.argv[1]
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.set_random_seed(0)
        var = lambda name, shape, init: tf.compat.v1.get_variable(name, shape, initializer=init)
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        training = tf.compat.v1.placeholder_with_default(False, [], name="is_training")
        h = tf.nn.conv2d(x, var("conv/kernel", [3, 3, 3, 6], tf.compat.v1.glorot_uniform_initializer()), 1, "VALID")
        gamma, beta = var("bn/gamma", [6], tf.compat.v1.ones_initializer()), var("bn/beta", [6], tf.compat.v1.zeros_initializer())
        mean = var("bn/moving_mean", [6], tf.compat.v1.zeros_initializer())
        variance = var("bn/moving_variance", [6], tf.compat.v1.ones_initializer())
        # a TF1 batch norm: batch statistics while training, moving ones otherwise (tf.cond -> If)
        h = tf.cond(training,
                    lambda: tf.compat.v1.nn.fused_batch_norm(h, gamma, beta, epsilon=1e-3)[0],
                    lambda: tf.compat.v1.nn.fused_batch_norm(h, gamma, beta, mean, variance, epsilon=1e-3,
                                                             is_training=False)[0])
        h = tf.nn.relu(h)
        logits = tf.matmul(tf.reduce_mean(h, [1, 2]), var("fc/kernel", [6, 4], tf.compat.v1.glorot_uniform_initializer()))
        probs = tf.nn.softmax(logits, name="probs")
        with tf.compat.v1.Session() as s:
            s.run(tf.compat.v1.global_variables_initializer())
            for v in tf.compat.v1.global_variables():  # non-trivial moving statistics
                if "moving" in v.name:
                    s.run(v.assign(np.random.RandomState(1).uniform(0.5, 1.5, v.shape).astype("float32")))
            b = tf.compat.v1.saved_model.Builder(out)
            sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"probs": probs})
            b.add_meta_graph_and_variables(s, ["serve"], signature_def_map={"serving_default": sig})
            b.save()
            xs = np.random.RandomState(2).normal(size=(3, 8, 8, 3)).astype("float32")
            np.savez(out + ".io.npz", x=xs, probs=s.run(probs, {x: xs}))
""")


def test_tf1_cond_on_variables(tmp_path):
    """A TF1 batch norm that branches on an is_training placeholder_with_default: the If receives the
    variables as handles; they become weights and the output is unchanged."""
    path = tmp_path / "tf1"
    subprocess.run([sys.executable, "-c", TF1_COND, str(path)], check=True, capture_output=True)
    g = graphslim.load(path)
    assert {n.op for n in g.nodes()} & {"If", "StatelessIf"}
    assert any("moving_mean" in w for w in g.weights)
    out = graphslim.save(g, tmp_path / "out")
    io = np.load(str(path) + ".io.npz")
    assert_close(run_saved_model(out, {"x": io["x"]}), {"probs": io["probs"]}, rtol=1e-5, atol=1e-6)
