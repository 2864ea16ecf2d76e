"""Safety scan (issue 6, item 1): dangerous ops anywhere in the graph or its function library, and
files leading outside the model, are refused with a message naming op, node and function; the
checkpoint machinery is recognised precisely; ``--allow-ops`` accepts named ops knowingly; loading
never executes the model."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import assert_clean_cli_error, leftovers, run_cli

import corpus
import graphslim
from graphslim.cli import cli
from graphslim.io import scan
from graphslim.io.loader import load
from graphslim.io.scan import UnsafeModelError, check_safe, scan_path
from graphslim.testing import assert_graph_matches, fixture_index, fixture_io, fixture_path

DANGEROUS = {c.name: c for c in corpus.DANGEROUS}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("name", [fx["name"] for fx in fixture_index()])
def test_every_fixture_scans_clean_although_savers_hold_checkpoint_ops(name):
    assert scan_path(fixture_path(name)) == []


def test_every_listed_op_exists_in_tensorflow():
    """A misspelled op name would silently never match."""
    from tensorflow.python.framework import op_def_registry

    unknown = [op for op in scan.dangerous_ops() if op_def_registry.get(op) is None]
    assert not unknown


@pytest.mark.parametrize("name", sorted(DANGEROUS))
def test_dangerous_model_is_refused_naming_op_node_and_function(dangerous_models, name):
    case = DANGEROUS[name]
    with pytest.raises(UnsafeModelError) as info:
        load(dangerous_models[name])
    message = str(info.value)
    assert "\n" not in message and str(dangerous_models[name]) in message
    for fragment in case.expect:
        assert fragment in message, (fragment, message)
    assert info.value.findings


@pytest.mark.parametrize("name", ["read_file_in_unreachable_function", "save_v2_in_serving_body",
                                  "asset_symlink_out", "frozen_pyfunc"])
def test_cli_refuses_with_exit_2_and_leaves_no_output(dangerous_models, tmp_path, name):
    out = tmp_path / "out"
    result = invoke("optimize", dangerous_models[name], "-o", out)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert all(f in line for f in DANGEROUS[name].expect), line
    assert not leftovers(out)
    result = invoke("inspect", dangerous_models[name])
    assert result.exit_code == 2 and "refusing the model" in result.stderr


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_commands_that_run_models_scan_them_first(dangerous_models, command):
    """verify and bench execute models with TensorFlow: an unsafe one is refused before it is loaded,
    whichever position it has; --allow-ops accepts it knowingly."""
    bad, good = dangerous_models["read_file_in_unreachable_function"], fixture_path("vgg_digits")
    for args in ((good, bad), (bad, good)):
        result = invoke(command, *args, *(["--rounds", "1"] if command == "bench" else []))
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
        [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
        assert "ReadFile" in line and str(bad) in line and "--allow-ops ReadFile" in line, line
        assert result.stdout == ""
    extra = ["--rounds", "1"] if command == "bench" else []
    result = invoke(command, good, bad, "--allow-ops", "ReadFile", *extra)
    assert result.exit_code == 0, result.output


def test_scan_command_lists_findings_and_exits_1(dangerous_models):
    result = invoke("scan", dangerous_models["serving_calls_traced_save"])
    assert result.exit_code == 1, result.output
    assert "SaveV2" in result.stdout and "MergeV2Checkpoints" in result.stdout
    assert "REFUSED: 2 finding(s); accept knowingly with --allow-ops MergeV2Checkpoints,SaveV2" in result.stdout

    result = invoke("scan", dangerous_models["serving_calls_traced_save"], "--json",
                    "--allow-ops", "SaveV2", "--allow-ops", "MergeV2Checkpoints")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["safe"] and not data["findings"] and {f["op"] for f in data["allowed"]} == {
        "SaveV2", "MergeV2Checkpoints"}

    result = invoke("scan", fixture_path("resnet_digits"))
    assert result.exit_code == 0 and "OK: nothing dangerous found" in result.stdout
    assert "function nodes" in result.stdout


def test_scan_command_unreadable_model_exits_2(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"\x00garbage")
    result = invoke("scan", tmp_path)
    assert result.exit_code == 2 and "corrupt SavedModel" in result.stderr


def test_allow_ops_accepts_named_ops_only(dangerous_models, tmp_path):
    path = dangerous_models["read_file_in_unreachable_function"]
    g = load(path, allow_ops=("ReadFile",))
    inputs, expected = fixture_io("vgg_digits")
    assert_graph_matches(g, inputs, expected)
    assert g.meta["allowed_ops"] == ["ReadFile"]
    with pytest.raises(UnsafeModelError, match="--allow-ops WriteFile"):
        load(dangerous_models["write_file_in_unreachable_function"], allow_ops=("ReadFile",))
    # files leading out of the model cannot be allowed away
    with pytest.raises(UnsafeModelError, match="outside the model directory"):
        load(dangerous_models["asset_symlink_out"], allow_ops=("ReadFile",))
    out = tmp_path / "out"
    result = invoke("-q", "optimize", path, "-o", out, "--allow-ops", "ReadFile,PyFunc")
    assert result.exit_code == 0, result.stderr
    assert (out / "saved_model.pb").exists()
    assert graphslim.load(out).meta["scanned"]


def test_scan_false_skips_the_scan(dangerous_models):
    g = load(dangerous_models["write_file_outer_graph"], scan=False)
    assert g.meta["scanned"] is False


def test_loading_never_executes_the_graph(tmp_path):
    """A WriteFile in the serving function, accepted knowingly: load, inspect and optimize never run
    it (the file it would write does not appear); TensorFlow running the model does write it."""
    target = tmp_path / "written_by_model.txt"

    class Writer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def __call__(self, x):
            tf.io.write_file(str(target), tf.strings.as_string(tf.reduce_sum(x)))
            return {"y": x * 2.0}

    model = tmp_path / "writer"
    m = Writer()
    tf.saved_model.save(m, str(model), signatures=m.__call__)
    findings = scan_path(model)
    assert {f.op for f in findings} == {"WriteFile"}
    with pytest.raises(UnsafeModelError, match=r"op WriteFile \(node '[^']+' in function '__inference"):
        load(model)
    g = load(model, allow_ops=["WriteFile"])
    result = invoke("-q", "optimize", model, "-o", tmp_path / "out", "--allow-ops", "WriteFile")
    assert result.exit_code == 0, result.stderr
    assert not target.exists()  # nothing ran
    # The IR keeps only what the outputs need (the write was a side effect, dropped with the control
    # edges): what calibration would run is clean, the model on disk is not.
    assert not g.nodes(op="WriteFile")
    check_safe(g)
    with pytest.raises(UnsafeModelError, match="WriteFile"):
        check_safe(model)
    check_safe(model, allow_ops=["WriteFile"])
    tf.saved_model.load(str(model)).signatures["serving_default"](x=tf.ones([1, 3]))
    assert target.exists()  # the control: running it does write


def test_check_safe_on_an_ir_graph_and_a_path(dangerous_models):
    g = graphslim.load(fixture_path("tf_module"))
    check_safe(g)
    check_safe(fixture_path("tf_module"))
    g.add_node("evil_py", "PyFunc", attrs={"token": "pyfunc_9"})
    with pytest.raises(UnsafeModelError, match=r"op PyFunc \(node 'evil_py' in the graph\)"):
        check_safe(g)
    check_safe(g, allow_ops="PyFunc")
    with pytest.raises(UnsafeModelError, match="EagerPyFunc"):
        check_safe(dangerous_models["pyfunc_in_nested_function"])


def test_print_to_stderr_is_fine_but_print_to_a_file_is_not():
    from tensorflow.core.framework import attr_value_pb2

    ok = {"output_stream": attr_value_pb2.AttrValue(s=b"stderr")}
    bad = {"output_stream": attr_value_pb2.AttrValue(s=b"file:///tmp/x")}
    assert scan._category("PrintV2", ok) is None
    assert scan._category("PrintV2", bad)[0] == scan.FILES
    assert scan._category("Conv2D", {}) is None
    assert scan._category("ParallelMapDatasetV2", {})[0] == scan.DATASET
    assert scan._category("CollectiveReduceV2", {})[0] == scan.NETWORK
    assert scan._category("QueueDequeueV2", {})[0] == scan.BLOCKING


def test_console_script_refuses_in_a_subprocess(dangerous_models, tmp_path):
    out = tmp_path / "out"
    result = run_cli("optimize", dangerous_models["pyfunc_in_serving_body"], "-o", out, timeout=120)
    assert_clean_cli_error(result, "PyFunc", "--allow-ops PyFunc")
    assert not leftovers(out)
