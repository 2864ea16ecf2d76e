"""LiteRT (issue 15, item 1): the contained child's ``litert`` engine (graphslim's IR converted to
TFLite with builtin ops, run by the LiteRT interpreter on XNNPACK), ``graphslim bench --runtime``, and
``graphslim optimize --tflite`` / ``graphslim.to_tflite``.

Numerics are compared with the graph engine on the fixtures' recorded inputs, tolerances scaled to
the output's magnitude (rtol 1e-4, atol 1e-4·max|y|): TFLite's kernels (XNNPACK) sum in another order
than TensorFlow's (Eigen or oneDNN), so the results agree to float rounding, not bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import graphslim
from graphslim.errors import ConversionError
from graphslim.sandbox import Child, ExecutionError, Limits
from graphslim.testing import fixture_io, fixture_path, run_saved_model
from tests.test_cli import assert_clean_error, run  # the CLI in-process; a clean exit-2 error

RESNET = fixture_path("resnet_digits")
VGG = fixture_path("vgg_digits")
#: the interpreter the engine uses: LiteRT's (the test extra installs it), else TensorFlow's
INTERPRETER = "ai_edge_litert" if importlib.util.find_spec("ai_edge_litert") else "tf.lite"
FIXTURES = ["vgg_digits", "resnet_digits", "mobilenet_tiny", "inception_tiny", "multi_io", "ssd_tiny"]


def assert_near(actual: dict, expected: dict) -> None:
    """Every expected output, within rtol 1e-4 and atol 1e-4 times its largest magnitude."""
    assert set(actual) == set(expected)
    for name, want in expected.items():
        got = np.asarray(actual[name])
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
        if want.dtype.kind not in "fc":
            assert np.array_equal(got, want), name
            continue
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        err = float(np.max(np.abs(got - want))) if want.size else 0.0
        assert np.allclose(got, want, rtol=1e-4, atol=1e-4 * scale), (name, err, scale)


def small_graph(activation: str = "Atan", input_name: str = "x", output_name: str = "y"):
    """An IR graph ``x [?, 4] ─ MatMul(w) ─ activation ─▶ output_name`` (TFLite has no builtin Atan), its
    input named ``input_name`` in the signature."""
    import tensorflow as tf
    from tensorflow.core.framework import attr_value_pb2

    from graphslim.ir.attrs import shape_to_proto
    from graphslim.ir.graph import Graph, SignatureArg, Tensor

    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": attr_value_pb2.AttrValue(
        shape=shape_to_proto((None, 4)))})
    g.inputs.append(SignatureArg(input_name, Tensor("x", 0)))
    g.add_weight("dense/kernel", np.arange(16, dtype=np.float32).reshape(4, 4) / 16)
    g.add_node("dense", "MatMul", ["x", "dense/kernel"], attrs={"T": tf.float32})
    g.add_node("angle", activation, ["dense"], attrs={"T": tf.float32})
    g.outputs.append(SignatureArg(output_name, Tensor("angle", 0)))
    g.infer_shapes()
    return g


@pytest.fixture(scope="module")
def child():
    with Child(Limits(threads=2, timeout=300), label="the fixture") as c:
        yield c


@pytest.fixture(scope="module")
def atan_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("litert") / "atan"
    graphslim.save(small_graph(), out)
    return out


# ------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("name", FIXTURES)
def test_litert_matches_the_graph_engine(child, name):
    g = graphslim.load(fixture_path(name))
    inputs, _ = fixture_io(name)
    reference = child.run(child.load_graph(g), inputs)
    handle = child.load_graph(g, "litert")
    assert child.engine_info[handle]["interpreter"].startswith(INTERPRETER)
    assert child.engine_info[handle]["tflite_bytes"] > 0
    assert_near(child.run(handle, inputs), reference)
    child.drop(handle)


def test_litert_resizes_an_unknown_batch_and_times(child):
    g = graphslim.load(RESNET)
    inputs, _ = fixture_io("resnet_digits")
    x = inputs["image"]
    handle = child.load_graph(g, "litert")
    for batch in (1, 3, len(x)):
        out = child.run(handle, {"image": x[:batch]})["output_0"]
        assert out.shape == (batch, 10)
    child.set_inputs(handle, {"image": x[:1]})
    assert 0 < child.time(handle, 3) < 1.0


def test_litert_refuses_intermediate_fetches(child):
    g = graphslim.load(RESNET)
    inputs, _ = fixture_io("resnet_digits")
    handle = child.load_graph(g, "litert")
    conv = next(n.name for n in g.nodes("Conv2D"))
    with pytest.raises(ExecutionError, match="signature's outputs only.*graph engine"):
        child.run(handle, inputs, fetch=[f"{conv}:0"])
    assert set(child.run(handle, inputs)) == {"output_0"}  # the child is still usable


def test_conversion_runs_under_landlock(child):
    """The converter writes a temporary SavedModel under TMPDIR, the child's scratch directory: the only
    place Landlock lets it write."""
    if not child.landlock:
        pytest.skip("this kernel has no Landlock")
    before = set(child.scratch.iterdir())
    flatbuffer = child.to_tflite(graphslim.load(VGG))
    assert flatbuffer[4:8] == b"TFL3"  # the flatbuffer's file identifier
    left = [p.name for p in set(child.scratch.iterdir()) - before]
    assert all(n.startswith("__autograph_generated_file") for n in left), left  # its SavedModel removed


def test_signature_names_tensorflow_would_rename_and_an_input_passed_through(child):
    """Names that are not argument names get positional signature keys in the flatbuffer (else the
    converter drops the signature); the engine maps them back. An output may be an input itself."""
    from graphslim.ir.graph import SignatureArg, Tensor

    g = small_graph("Relu", input_name="images/0:0", output_name="scores (raw)")
    g.outputs.append(SignatureArg("echo", Tensor("x", 0)))
    x = {"images/0:0": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    expected = child.run(child.load_graph(g), x)
    assert_near(child.run(child.load_graph(g, "litert"), x), expected)
    assert np.array_equal(expected["echo"], x["images/0:0"])


def test_an_op_tflite_lacks_is_a_clear_error(child):
    g = small_graph()
    with pytest.raises(ConversionError, match=r"cannot be converted to TFLite: TFLite has no builtin kernel "
                                              r"for Atan .*nodes: Atan at 'angle'") as info:
        child.load_graph(g, "litert")
    assert info.value.ops == ["Atan"] and info.value.exit_code == 2
    with pytest.raises(ConversionError, match="Atan"):
        child.to_tflite(g)
    out = child.run(child.load_graph(g), {"x": np.ones((2, 4), np.float32)})  # still usable
    assert np.allclose(out["y"], np.arctan(np.ones((2, 4)) @ g.weights["dense/kernel"].value))


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tensorflow_interpreter_when_litert_is_not_installed(child, monkeypatch):
    """Without ai_edge_litert the engine runs the same flatbuffer on tf.lite.Interpreter."""
    import tensorflow as tf

    from graphslim import _litert

    g = graphslim.load(VGG)
    inputs, expected = fixture_io("vgg_digits")
    flatbuffer = child.to_tflite(g)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    engine = _litert.LiteRTEngine(tf, flatbuffer, {a.name: str(a.tensor) for a in g.inputs},
                                  {a.name: str(a.tensor) for a in g.outputs}, threads=2)
    assert engine.interpreter.startswith("tf.lite")
    assert_near(engine.run(inputs, None), expected)


def test_no_interpreter_installed_is_a_clear_refusal(monkeypatch):
    """Where neither ai_edge_litert nor tf.lite.Interpreter exists (TensorFlow has announced the latter's
    removal: a TensorFlow without it stands in here, as a namespace holding only its version), the
    litert engine refuses before converting anything, saying what is missing; the parent words it as
    RuntimeUnavailable naming the package to install."""
    import types

    from graphslim import _litert

    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(_litert.RuntimeMissing, match="no TFLite interpreter is installed") as info:
        _litert.interpreter_class(types.SimpleNamespace(__version__="9.9"))
    assert info.value.details == {"kind": "runtime", "runtime": "litert", "reason": str(info.value)}


# ------------------------------------------------------------------------------------ bench
def test_bench_runtimes_as_a_library_call():
    data = graphslim.bench([RESNET, VGG], runtimes=("tf", "litert"), rounds=2, calls=2, threads=2)
    rows = data["models"]
    assert [(r["model"], r["runtime"]) for r in rows] == [
        (str(RESNET), "graph"), (str(RESNET), "litert"), (str(VGG), "graph"), (str(VGG), "litert")]
    assert data["runtimes"] == ["tf", "litert"] and data["litert_interpreter"].startswith(INTERPRETER)
    by = {(r["model"], r["runtime"]): r for r in rows}
    for runtime in ("graph", "litert"):  # speedup within a runtime: the first model's median over this one's
        first, second = by[(str(RESNET), runtime)], by[(str(VGG), runtime)]
        assert first["speedup"] == 1.0
        assert abs(second["speedup"] - first["median_ms"] / second["median_ms"]) < 1e-9
    for model in (RESNET, VGG):
        tf_row, lite = by[(str(model), "graph")], by[(str(model), "litert")]
        assert tf_row["vs_tf"] is None and lite["xla_gain"] is None
        assert abs(lite["vs_tf"] - tf_row["median_ms"] / lite["median_ms"]) < 1e-9


def test_bench_runtime_litert_on_the_command_line():
    result = run("bench", RESNET, "--runtime", "litert", "--threads", "2", "--rounds", "2", "--calls", "2",
                 "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(r["model"], r["runtime"]) for r in data["models"]] == [(str(RESNET), "litert")]
    assert data["models"][0]["median_ms"] > 0 and data["runtimes"] == ["litert"]
    both = run("bench", RESNET, "--runtime", "tf", "--runtime", "litert,tf", "--xla", "--rounds", "1", "--json")
    assert both.exit_code == 0, both.stderr
    assert [r["runtime"] for r in json.loads(both.stdout)["models"]] == ["graph", "litert", "xla"]
    table = run("-q", "bench", RESNET, "--runtime", "tf,litert", "--rounds", "1")
    assert table.exit_code == 0 and "litert" in table.stdout and "vs tf" in table.stdout


def test_bench_unknown_runtime_lists_the_valid_ones():
    result = run("bench", RESNET, "--runtime", "tf,tflite")
    assert result.exit_code == 2 and result.stdout == ""
    assert "Invalid value for '--runtime'" in result.stderr
    assert "unknown runtime 'tflite'; the runtimes are tf, xla, litert" in result.stderr
    with pytest.raises(graphslim.GraphslimError, match="unknown runtime 'onnx'"):
        graphslim.bench([RESNET], runtimes=["onnx"])


def test_bench_litert_on_a_model_tflite_cannot_convert(atan_model):
    assert_clean_error(run("bench", atan_model, "--runtime", "tf,litert", "--rounds", "1"),
                       "cannot be converted to TFLite", "no builtin kernel for Atan", "'angle'", "--runtime tf")


# ------------------------------------------------------------------------------------ optimize --tflite
def test_optimize_tflite_writes_a_model_litert_runs(tmp_path):
    import tensorflow as tf

    out, tflite, report = tmp_path / "out", tmp_path / "model.tflite", tmp_path / "r.json"
    result = run("optimize", RESNET, "-o", out, "--passes", "fold-batchnorm", "--tflite", tflite,
                 "--report", report)
    assert result.exit_code == 0, result.stderr
    assert f"TFLite {tflite} (" in " ".join(result.stdout.split())
    data = json.loads(report.read_text())["tflite"]
    assert data["path"] == str(tflite) and data["size_bytes"] == tflite.stat().st_size > 0
    assert not list(tmp_path.glob(".model.tflite.tmp-*"))
    inputs, _ = fixture_io("resnet_digits")
    expected = run_saved_model(out, inputs)
    interpreter = tf.lite.Interpreter(model_path=str(tflite), num_threads=2)
    runner = interpreter.get_signature_runner("serving_default")
    assert_near(runner(**inputs), expected)


def test_to_tflite_is_a_library_call():
    flatbuffer = graphslim.to_tflite(graphslim.load(VGG))
    assert isinstance(flatbuffer, bytes) and flatbuffer[4:8] == b"TFL3"


@pytest.mark.parametrize("where", ["model_dir", "saved_model.pb", "variables/x.tflite", "output_dir", "report"])
def test_optimize_tflite_onto_the_input_or_another_output_is_refused(tmp_path, where):
    import shutil

    model = tmp_path / "in"
    shutil.copytree(VGG, model)
    before = sorted((p.relative_to(model), p.stat().st_size) for p in model.rglob("*"))
    out, report = tmp_path / "out", tmp_path / "r.json"
    target = {"model_dir": model, "output_dir": out, "report": report}.get(where) or model / where
    result = run("optimize", model, "-o", out, "--tflite", target, "--report", report)
    assert_clean_error(result, "--tflite", str(target))
    assert sorted((p.relative_to(model), p.stat().st_size) for p in model.rglob("*")) == before
    assert not out.exists() and not report.exists()


def test_optimize_tflite_failure_keeps_the_savedmodel_and_says_so(tmp_path, atan_model):
    out, tflite, report = tmp_path / "out", tmp_path / "atan.tflite", tmp_path / "r.json"
    result = run("optimize", atan_model, "-o", out, "--tflite", tflite, "--report", report)
    assert_clean_error(result, "no builtin kernel for Atan", f"The SavedModel {out} was written",
                       f"the TFLite model {tflite} was not", "leave out --tflite")
    assert (out / "saved_model.pb").is_file() and not tflite.exists()
    assert not list(tmp_path.glob(".atan.tflite.tmp-*"))
    recorded = json.loads(report.read_text())["tflite"]
    assert recorded["size_bytes"] is None and "Atan" in recorded["error"]
