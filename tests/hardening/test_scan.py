"""Safety scan (issue 6, item 1; issue 13, item 1): every op outside the allow-list anywhere in the graph
or its function library, and files leading outside the model, are refused with a message naming op,
node and function; the checkpoint machinery is recognised precisely (never a write on the restore
path); ``--allow-ops`` accepts named ops knowingly; loading never executes the model."""

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


def test_every_allowed_op_is_registered_in_tensorflow():
    """A misspelled name on the allow-list would allow nothing and hide a gap in the review; the
    internal ops on it (grappler's fusions) are registered too."""
    from tensorflow.python.framework import op_def_registry

    from graphslim.io import allowlist

    listed = allowlist.ALLOWED | allowlist.CHECKPOINT_OPS
    assert not [op for op in listed if op_def_registry.get(op) is None]
    assert {op for op in listed if op.startswith("_")} == allowlist.INTERNAL
    groups = [ops for _, _, ops in allowlist.CATEGORIES]
    assert sum(map(len, groups)) == len(frozenset().union(*groups))  # one category per op
    assert not allowlist.ALLOWED & allowlist.CHECKPOINT_OPS
    assert 900 <= len(allowlist.ALLOWED) < 1000


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
    assert result.exit_code == 0 and "OK: nothing outside the allow-list found" in result.stdout
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
    with pytest.raises(UnsafeModelError, match=r"op 'WriteFile' \(node '[^']+' in function '__inference"):
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
    with pytest.raises(UnsafeModelError, match=r"op 'PyFunc' \(node 'evil_py' in the graph\)"):
        check_safe(g)
    check_safe(g, allow_ops="PyFunc")
    with pytest.raises(UnsafeModelError, match="EagerPyFunc"):
        check_safe(dangerous_models["pyfunc_in_nested_function"])


def test_print_to_stderr_is_fine_but_print_to_a_file_is_not():
    from tensorflow.core.framework import attr_value_pb2

    def attrs(**kw):
        return {k: attr_value_pb2.AttrValue(**v) for k, v in kw.items()}

    assert scan._category("PrintV2", attrs(output_stream={"s": b"stderr"})) is None
    assert scan._category("PrintV2", {}) is None  # the default stream is stderr
    category, detail = scan._category("PrintV2", attrs(output_stream={"s": b"file:///tmp/x"}))
    assert category.startswith("is allowed only when it prints to stderr") and "file:///tmp/x" in detail
    assert scan._category("Copy", {}) is None
    assert "debug_ops_spec" in scan._category("Copy", attrs(debug_ops_spec={"list": {"s": [b"D;file:///x;0"]}}))[0]
    assert scan._category("DecodeProtoV2", attrs(descriptor_source={"s": b"local://"})) is None
    assert "/tmp/d.bin" in scan._category("EncodeProto", attrs(descriptor_source={"s": b"/tmp/d.bin"}))[1]
    assert scan._category("Conv2D", {}) is None
    for op in ("ParallelMapDatasetV2", "CollectiveReduceV2", "QueueDequeueV2", "DumpTensor", "SleepOp"):
        assert scan._category(op, {}) == (scan.NOT_ALLOWED, ""), op
    assert scan._category("SaveV2", {})[0] == scan.CHECKPOINT
    assert "does not register" in scan._category("NoSuchOpAnywhere", {})[1]


def test_console_script_refuses_in_a_subprocess(dangerous_models, tmp_path):
    out = tmp_path / "out"
    result = run_cli("optimize", dangerous_models["pyfunc_in_serving_body"], "-o", out, timeout=120)
    assert_clean_cli_error(result, "PyFunc", "--allow-ops PyFunc")
    assert not leftovers(out)


# ------------------------------------------------------------------------------------ second savers
def _restored_then_built(dst, resource: bool):
    """The issue's TF1 model: variables, a ``Saver`` whose checkpoint is saved and restored in the
    session, then ``SavedModelBuilder`` (which adds its own saver, ``save_1/``, declared in
    ``saver_def``; the first one, ``save/``, stays in the graph, reached by nothing)."""
    import numpy as np

    v1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        x = v1.placeholder(tf.float32, [None, 4], name="x")
        h = x
        for i, (n_in, n_out) in enumerate(((4, 6), (6, 3))):
            w = v1.get_variable(f"dense_{i}/kernel", [n_in, n_out], use_resource=resource,
                                initializer=v1.random_normal_initializer())
            b = v1.get_variable(f"dense_{i}/bias", [n_out], use_resource=resource,
                                initializer=v1.random_uniform_initializer(-1.0, 1.0))
            h = tf.nn.bias_add(tf.matmul(h, w), b)
            h = tf.nn.relu(h) if i == 0 else tf.identity(h, name="y")
        saver = v1.train.Saver()
        with v1.Session(graph=g) as sess:
            sess.run(v1.global_variables_initializer())
            prefix = saver.save(sess, str(dst.parent / f"{dst.name}_ckpt" / "model"))
            trained = sess.run(v1.global_variables())
            sess.run(v1.global_variables_initializer())  # other random values: restore brings them back
            saver.restore(sess, prefix)
            for before, after in zip(trained, sess.run(v1.global_variables())):
                np.testing.assert_array_equal(before, after)
            builder = v1.saved_model.Builder(str(dst))
            signature = v1.saved_model.predict_signature_def({"x": x}, {"y": h})
            builder.add_meta_graph_and_variables(sess, ["serve"],
                                                 signature_def_map={"serving_default": signature})
            builder.save()
    return dst


@pytest.fixture(scope="module")
def restored_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("restored")
    return {kind: _restored_then_built(root / kind, kind == "resource") for kind in ("ref", "resource")}


def _tf1_outputs(model, inputs):
    """What TensorFlow itself computes with the original TF1 SavedModel (its declared saver restores
    the variables)."""
    v1 = tf.compat.v1
    with tf.Graph().as_default() as g, v1.Session(graph=g) as sess:
        meta = v1.saved_model.loader.load(sess, ["serve"], str(model))
        sig = meta.signature_def["serving_default"]
        return sess.run(sig.outputs["y"].name, {sig.inputs["x"].name: inputs})


SECOND_SAVER_NOTE = "dropped a second saver 'save' (SaveV2 'save/SaveV2', RestoreV2 'save/RestoreV2')"


@pytest.mark.parametrize("kind", ["ref", "resource"])
def test_second_saver_left_by_a_restore_is_dropped_with_a_note(restored_models, tmp_path, kind):
    import numpy as np

    from graphslim.io.emitter import save

    model = restored_models[kind]
    sm = corpus.read_saved_model(model)
    assert sm.meta_graphs[0].saver_def.restore_op_name.startswith("save_1/")
    notes = []
    assert scan_path(model, notes=notes) == []
    [note] = notes
    assert note.startswith(SECOND_SAVER_NOTE)
    assert "the same 4 variable(s) as the MetaGraphDef's saver 'save_1'" in note
    report = scan.scan_report(model)
    assert report["safe"] and report["notes"] == [note]
    check_safe(model)

    with pytest.warns(scan.ScanNote, match="dropped a second saver 'save'"):
        g = load(model)
    assert not [n for n in g.nodes() if n.op in scan.CHECKPOINT_OPS or n.name.startswith("save")]
    out = tmp_path / "out"
    save(g, out)
    inputs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    expected = _tf1_outputs(model, inputs)
    got = tf.saved_model.load(str(out)).signatures["serving_default"](x=tf.constant(inputs))["y"].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(expected).max()))
    assert scan_path(out) == []


def test_cli_prints_the_second_saver_note(restored_models, tmp_path):
    model = restored_models["ref"]
    result = invoke("scan", model)
    assert result.exit_code == 0, result.output
    assert f"note: {SECOND_SAVER_NOTE}" in result.stdout and "OK: nothing outside the allow-list" in result.stdout
    assert json.loads(invoke("scan", model, "--json").stdout)["notes"][0].startswith(SECOND_SAVER_NOTE)
    out = tmp_path / "out"
    result = invoke("optimize", model, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert f"warning: {SECOND_SAVER_NOTE}" in result.stderr
    assert (out / "saved_model.pb").exists()
    result = invoke("-q", "optimize", model, "-o", tmp_path / "quiet")
    assert result.exit_code == 0 and "second saver" not in result.stderr


def _find(meta, name):
    return next(n for n in meta.graph_def.node if n.name == name)


def _reached_by_signature(meta):
    """A second signature returns what the second saver restores."""
    from tensorflow.core.protobuf import meta_graph_pb2

    sig = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    sig.outputs["restored"].name = "save/RestoreV2:0"
    sig.outputs["restored"].dtype = tf.float32.as_datatype_enum
    meta.signature_def["peek"].CopyFrom(sig)


def _saves_signature_input(meta):
    """The second saver's SaveV2 writes the signature's input instead of a variable."""
    save_op = _find(meta, "save/SaveV2")
    save_op.input[3] = "x"


def _filename_from_signature(meta):
    """The second saver's file name comes from a string input of the signature."""
    meta.graph_def.node.append(corpus.node_def("path", "Placeholder",
                                               dtype=corpus.attr(type=tf.string.as_datatype_enum)))
    sig = meta.signature_def["serving_default"]
    sig.inputs["path"].name = "path:0"
    sig.inputs["path"].dtype = tf.string.as_datatype_enum
    _find(meta, "save/Const").input[0] = "path"


def _restores_into_non_variable(meta):
    """The second saver's restore assigns into something that is not a variable."""
    _find(meta, "save/Assign").input[0] = "x"


def _restores_from_own_constant(meta):
    """The second saver's restore reads a constant of its own scope, not its file name input."""
    meta.graph_def.node.append(corpus.string_const("save/stolen", b"/etc/passwd"))
    _find(meta, "save/RestoreV2").input[0] = "save/stolen"


def _other_keys(meta):
    """The second saver saves and restores the variables under other checkpoint keys than the
    declared saver (a different variable set)."""
    for name in ("save/SaveV2/tensor_names", "save/RestoreV2/tensor_names"):
        values = _find(meta, name).attr["value"].tensor.string_val
        values[0] = b"elsewhere/" + values[0]


@pytest.mark.parametrize("edit_fn, node, why", [
    (_reached_by_signature, "save/RestoreV2", "a signature, init op or collection reaches it"),
    (_saves_signature_input, "save/SaveV2", "'save/SaveV2' reads 'x', outside the saver and not a variable"),
    (_filename_from_signature, "save/SaveV2", "'save/Const' reads 'path', outside the saver"),
    (_restores_into_non_variable, "save/RestoreV2", "'save/Assign' reads 'x', outside the saver"),
    (_restores_from_own_constant, "save/RestoreV2", "'save/RestoreV2' restores from 'save/stolen', not from "
                                                    "the saver's file name input 'save/Const:0'"),
    (_other_keys, "save/SaveV2", "its 4 checkpoint entries differ from the 4 of the MetaGraphDef's "
                                 "saver in 'dense_0/bias', 'elsewhere/dense_0/bias'"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_second_saver_that_does_not_match_is_refused(restored_models, tmp_path, edit_fn, node, why):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(restored_models["ref"], model)
    sm = corpus.read_saved_model(model)
    edit_fn(sm.meta_graphs[0])
    corpus.write_saved_model(model, sm)
    notes = []
    findings = scan_path(model, notes=notes)
    assert not notes
    assert {f.node for f in findings} >= {node} and {f.op for f in findings} <= {"SaveV2", "RestoreV2"}
    with pytest.raises(UnsafeModelError) as info:
        load(model)
    message = str(info.value)
    assert f"node '{node}' in the graph" in message and why in message, message
    assert "--allow-ops" in message


# ------------------------------------------------------------------------------------ allow-list (issue 13)
def _attr(**kw):
    return corpus.attr(**kw)


SERVING_BODY = "<serving body>"
# op -> (how it is injected into vgg_digits, the function it lands in). Each passed the deny-list scan.
INJECTED = {
    "DumpTensor": (corpus._in_serving_body("DumpTensor", name="dump", T=_attr(type=tf.string.as_datatype_enum),
                                           log_dir_path=_attr(s=b"/tmp/graphslim_dump"), file_name=_attr(s=b"x")),
                   SERVING_BODY),
    "Abort": (corpus._inject_function("Abort", exit_without_error=_attr(b=True)), "__inference_evil_helper_1"),
    "SleepOp": (corpus._inject_function("SleepOp"), "__inference_evil_helper_1"),
    "SleepIdentityOp": (corpus._in_serving_body("SleepIdentityOp", name="nap"), SERVING_BODY),
    "RecordInput": (corpus._inject_function("RecordInput", file_pattern=_attr(s=b"/etc/*")),
                    "__inference_evil_helper_1"),
    "FixedUnigramCandidateSampler": (corpus._inject_function("FixedUnigramCandidateSampler",
                                                             vocab_file=_attr(s=b"/etc/passwd")),
                                     "__inference_evil_helper_1"),
    "MutexLock": (corpus._inject_function("MutexLock"), "__inference_evil_helper_1"),
    "QueueEnqueueV2": (corpus._in_serving_body("QueueEnqueueV2", name="enqueue", timeout_ms=_attr(i=-1)),
                       SERVING_BODY),
    "Stage": (corpus._inject_function("Stage"), "__inference_evil_helper_1"),
    "Foo": (corpus._inject_function("Foo"), "__inference_evil_helper_1"),  # no such op in TensorFlow
}


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    root = tmp_path_factory.mktemp("injected")
    serving = corpus.serving_body(corpus.read_saved_model(fixture_path(corpus.VGG)).meta_graphs[0]).signature.name
    return {op: (corpus.edit(corpus.VGG, fn)(root / op), serving if where == SERVING_BODY else where)
            for op, (fn, where) in INJECTED.items()}


@pytest.mark.parametrize("op", sorted(INJECTED))
def test_op_outside_the_allow_list_is_refused_unless_allowed(injected, tmp_path, op):
    model, function = injected[op]
    result = invoke("scan", model)
    assert result.exit_code == 1, result.output
    assert op in result.stdout and "not on graphslim's allow-list of compute-only ops" in result.stdout
    assert f"REFUSED: 1 finding(s); accept knowingly with --allow-ops {op}" in result.stdout

    out = tmp_path / "out"
    result = invoke("optimize", model, "-o", out)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert f"op {op!r} (node " in line and f"in function {function!r}) is not on graphslim's allow-list" in line
    assert f"--allow-ops {op} " in line and "`graphslim scan --list-allowed`" in line, line
    assert not leftovers(out)

    result = invoke("scan", model, "--allow-ops", op)
    assert result.exit_code == 0 and "(1 finding(s) accepted with --allow-ops)" in result.stdout, result.output
    check_safe(model, allow_ops=[op])


def test_an_op_tensorflow_does_not_register_is_refused_by_name(injected):
    model, function = injected["Foo"]
    [finding] = scan_path(model)
    assert (finding.op, finding.node, finding.function) == ("Foo", "evil", function)
    assert finding.category == scan.NOT_ALLOWED and "TensorFlow does not register" in finding.detail
    with pytest.raises(UnsafeModelError, match=r"op 'Foo' \(node 'evil' in function '__inference_evil_helper_1'\) "
                                               r"is not on graphslim's allow-list"):
        load(model)


def test_a_node_calling_a_library_function_by_name_is_a_call_and_the_function_is_scanned():
    from tensorflow.core.framework import graph_pb2

    gd = graph_pb2.GraphDef()
    fn = gd.library.function.add()
    fn.signature.name = "helper_fn"
    fn.node_def.add(name="inner_call", op="helper_fn")
    fn.node_def.add(name="dump", op="DumpTensor")
    gd.node.add(name="call", op="helper_fn")
    gd.node.add(name="stray", op="helper_fn_missing")
    found = {(f.op, f.node, f.function) for f in scan.scan_graph_def(gd)}
    assert found == {("DumpTensor", "dump", "helper_fn"), ("helper_fn_missing", "stray", None)}


def test_list_allowed_prints_the_allow_list_by_category():
    from graphslim.io import allowlist

    result = invoke("scan", "--list-allowed")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"graphslim's allow-list: {len(allowlist.ALLOWED)} op types that only compute" in text
    for _, title, ops in allowlist.CATEGORIES:
        assert f"\n{title} ({len(ops)}):\n" in text
    words = set(text.split())
    assert {"Conv2D", "StatelessWhile", "TensorListReserve", "NonMaxSuppressionV5", "StridedSlice",
            "VarHandleOp", "_FusedConv2D"} <= words
    assert not {op for op, _ in INJECTED.items()} & words
    assert "PrintV2: is allowed only when it prints to stderr, stdout or the log" in text
    assert "checkpoint machinery" in text and "SaveV2" in words

    data = json.loads(invoke("scan", "--list-allowed", "--json").stdout)
    assert data == allowlist.describe()
    listed = {op for cat in data["categories"] for op in cat["ops"]} | set(data["conditional"])
    assert listed == allowlist.ALLOWED and data["count"] == len(listed)

    result = invoke("scan")
    assert result.exit_code == 2 and "Missing argument 'MODEL'" in result.stderr
    result = invoke("scan", "--list-allowed", fixture_path("vgg_digits"))
    assert result.exit_code == 2 and "takes no MODEL" in result.stderr


def test_scan_table_escapes_control_characters_in_model_names(tmp_path):
    """A node name holding an ESC sequence that erases the line and writes a verdict cannot forge an
    "OK" line in the table: it is printed escaped. JSON keeps the name (json.dumps escapes it)."""
    forged = "evil\x1b[2K\rOK: nothing outside the allow-list found\x1b[8m"
    model = corpus.edit(corpus.VGG, corpus._in_serving_body("DumpTensor", name=forged))(tmp_path)
    result = invoke("scan", model)
    assert result.exit_code == 1, result.output
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "evil\\x1b[2K\\rOK: nothing" in result.stdout
    assert not [ln for ln in result.stdout.splitlines() if ln.lstrip().startswith("OK")]
    assert result.stdout.rstrip().splitlines()[-1].startswith("REFUSED: 1 finding(s)")
    result = invoke("scan", model, "--json")
    assert "\x1b" not in result.stdout
    assert json.loads(result.stdout)["findings"][0]["node"] == forged


def test_hard_linked_asset_is_refused(tmp_path):
    import os

    outside = tmp_path / "outside.txt"
    outside.write_text("not the model's\n")
    model = corpus.copy_fixture(corpus.VGG, tmp_path / "m")
    asset = model / "assets" / "labels.txt"
    asset.unlink()
    os.link(outside, asset)
    [finding] = scan_path(model)
    assert finding.op == "<path>" and finding.node == str(asset)
    assert finding.describe() == (f"{asset}: has 2 hard links; a hard link can lead outside the model "
                                  "directory; copy the file instead")
    with pytest.raises(UnsafeModelError, match="copy the file instead"):
        load(model, allow_ops=["ReadFile"])  # files leading out cannot be allowed away
    out = tmp_path / "out"
    result = invoke("optimize", model, "-o", out)
    assert result.exit_code == 2 and "has 2 hard links" in result.stderr, result.output
    assert not leftovers(out)
    # a symlink inside the model to a hard-linked file is refused the same way
    asset.unlink()
    inner = model / "elsewhere.txt"
    os.link(outside, inner)
    os.symlink(inner, asset)
    assert "has 2 hard links" in scan_path(model)[0].describe()


# ------------------------------------------------------------------------------------ the restore path
SAVE_ON_RESTORE = "on the restore path: TensorFlow's loader runs"


def _save_nodes(prefix: str, sep: str = ":output:0"):
    """A SaveV2 of a string constant to /tmp (names ``prefix...``); ``sep`` "" for outer-graph inputs."""
    return [corpus.string_const(f"{prefix}path", b"/tmp/graphslim_stolen"),
            corpus.string_const(f"{prefix}names", b"x"),
            corpus.node_def(f"{prefix}SaveV2", "SaveV2", [f"{prefix}path{sep}"] + [f"{prefix}names{sep}"] * 3,
                            dtypes=_attr(list=corpus._type_list(tf.string)))]


def _tf1_save_before_restore(meta):
    """A SaveV2 in the saver's own scope that save/restore_all waits on: the TF1 loader runs it."""
    meta.graph_def.node.extend(_save_nodes("save/hook_", sep=""))
    _find(meta, meta.saver_def.restore_op_name).input.append("^save/hook_SaveV2")


def _tf2_save_in_traced_restore(meta):
    corpus.function(meta, "__inference__traced_restore_").node_def.extend(_save_nodes("hook_"))


def test_tf1_save_on_the_restore_path_is_refused(tmp_path):
    model = corpus.edit(corpus.TF1, _tf1_save_before_restore)(tmp_path)
    [finding] = scan_path(model)
    assert (finding.op, finding.node, finding.function) == ("SaveV2", "save/hook_SaveV2", None)
    assert SAVE_ON_RESTORE in finding.detail and "'save/restore_all'" in finding.detail
    with pytest.raises(UnsafeModelError, match=r"op 'SaveV2' \(node 'save/hook_SaveV2' in the graph\)"):
        load(model)
    load(model, allow_ops=["SaveV2"])  # knowingly


def test_tf2_save_in_the_traced_restore_function_is_refused(tmp_path):
    model = corpus.edit(corpus.VGG, _tf2_save_in_traced_restore)(tmp_path)
    [finding] = scan_path(model)
    assert finding.op == "SaveV2" and finding.node == "hook_SaveV2"
    assert finding.function.startswith("__inference__traced_restore_") and SAVE_ON_RESTORE in finding.detail
    result = invoke("optimize", model, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "hook_SaveV2" in result.stderr and "restore path" in result.stderr


def _hooked_table(tmp_path, nodes):
    """A tf.Module tracking a MutableHashTable (clean as TensorFlow writes it) whose restore function
    (object graph ``saveable_objects``, run by ``tf.saved_model.load``) gains ``nodes``: (model, function)."""

    class Table(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, -1)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="key")])
        def __call__(self, key):
            return {"value": self.table.lookup(key)}

    model = tmp_path / "table"
    m = Table()
    tf.saved_model.save(m, str(model), signatures=m.__call__)
    assert scan_path(model) == []
    sm = corpus.read_saved_model(model)
    meta = sm.meta_graphs[0]
    og = meta.object_graph_def
    [restore_fn] = [og.nodes[so.restore_function].bare_concrete_function.concrete_function_name
                    for obj in og.nodes for so in obj.saveable_objects.values()]
    next(f for f in meta.graph_def.library.function if f.signature.name == restore_fn).node_def.extend(nodes)
    corpus.write_saved_model(model, sm)
    return model, restore_fn


def test_save_in_a_tracked_resources_restore_function_is_refused(tmp_path):
    """A MutableHashTable's restore function is run by ``tf.saved_model.load``: refused with a SaveV2 in it."""
    model, restore_fn = _hooked_table(tmp_path, _save_nodes("hook_"))
    [finding] = scan_path(model)
    assert (finding.op, finding.node, finding.function) == ("SaveV2", "hook_SaveV2", restore_fn)
    assert SAVE_ON_RESTORE in finding.detail


# ------------------------------------------------------------------------------------ restore prefixes
ELSEWHERE = "would restore from a file other than the model's own checkpoint"


def _tf1_prefix(source: str):
    """save/RestoreV2 reads ``source``: a constant, the unfed default behind save/Const, or Identity(save/Const)."""
    def fn(meta):
        g = meta.graph_def
        if source == "const":
            g.node.append(corpus.string_const("stolen/prefix", b"/etc/passwd"))
            _find(meta, "save/RestoreV2").input[0] = "stolen/prefix"
        elif source == "default":
            _find(meta, "save/RestoreV2").input[0] = "save/filename"
        else:
            g.node.append(corpus.node_def("save/prefix_copy", "Identity", ["save/Const"],
                                          T=_attr(type=tf.string.as_datatype_enum)))
            _find(meta, "save/RestoreV2").input[0] = "save/prefix_copy"
    return fn


@pytest.mark.parametrize("source, where", [("const", "'stolen/prefix' (Const)"),
                                           ("default", "'save/filename' (PlaceholderWithDefault)"),
                                           ("identity", None)])
def test_tf1_restore_must_read_the_fed_file_name(tmp_path, source, where):
    model = corpus.edit(corpus.TF1, _tf1_prefix(source))(tmp_path)
    findings = scan_path(model)
    if where is None:  # Identity of the fed tensor is the fed tensor
        assert findings == []
        return
    [finding] = findings
    assert (finding.op, finding.node, finding.function, finding.category) == (
        "RestoreV2", "save/RestoreV2", None, ELSEWHERE)
    assert f"file prefix comes from {where}, not from the saver's file name input 'save/Const:0'" in finding.detail
    with pytest.raises(UnsafeModelError) as info:
        load(model)
    message = str(info.value)
    assert "\n" not in message and "op 'RestoreV2' (node 'save/RestoreV2' in the graph) " + ELSEWHERE in message
    assert "--allow-ops RestoreV2" in message
    load(model, allow_ops=["RestoreV2"])  # knowingly


def _tf2_const_prefix(meta):
    body = corpus.function(meta, "__inference__traced_restore_")
    body.node_def.append(corpus.string_const("stolen", b"../../other/variables"))
    next(n for n in body.node_def if n.op == "RestoreV2").input[0] = "stolen:output:0"


def _tf2_call_passes_a_constant(meta):
    meta.graph_def.node.append(corpus.string_const("stolen", b"../../other/variables"))
    _find(meta, meta.saver_def.restore_op_name).input[0] = "stolen"


def _tf2_second_call(meta):
    """A second call of the traced restore function, passing a constant, wired before the restore op."""
    call = type(_find(meta, meta.saver_def.restore_op_name))()
    call.CopyFrom(_find(meta, meta.saver_def.restore_op_name))
    call.name = "sneaky_restore"
    call.input[0] = "stolen"
    meta.graph_def.node.extend([corpus.string_const("stolen", b"/etc/passwd"), call])
    _find(meta, meta.saver_def.restore_op_name).input.append("^sneaky_restore")


@pytest.mark.parametrize("edit_fn, why", [
    (_tf2_const_prefix, "its file prefix is 'stolen' (Const) inside the function, not the saver's file name "
                        "input 'saver_filename:0'"),
    (_tf2_call_passes_a_constant, "its file prefix is argument 'file_prefix' of the function, and not every call "
                                  "of it passes the saver's file name input 'saver_filename:0'"),
    (_tf2_second_call, "argument 'file_prefix' of the function, and not every call"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_tf2_traced_restore_must_read_the_fed_file_name(tmp_path, edit_fn, why):
    model = corpus.edit(corpus.VGG, edit_fn)(tmp_path)
    [finding] = scan_path(model)
    assert finding.op == "RestoreV2" and finding.node == "RestoreV2" and finding.category == ELSEWHERE
    assert finding.function.startswith("__inference__traced_restore_") and why in finding.detail, finding.detail
    out = tmp_path / "out"
    result = invoke("optimize", model, "-o", out)
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert f"in function '{finding.function}') {ELSEWHERE}" in line and "--allow-ops RestoreV2" in line, line
    assert not leftovers(out)


def _prefix_graph(second_call_prefix: str | None):
    """saver_filename -> call(outer_fn) -> call(inner_fn) -> RestoreV2(Identity(arg)), the restore op
    ``restore``; ``second_call_prefix`` adds another call of inner_fn, from the outer graph, passing that
    tensor."""
    from tensorflow.core.framework import graph_pb2

    gd = graph_pb2.GraphDef()
    gd.node.add(name="saver_filename", op="Placeholder")
    gd.node.add(name="restore", op="StatefulPartitionedCall", input=["saver_filename"]).attr["f"].func.name = "outer_fn"
    outer = gd.library.function.add()
    outer.signature.name = "outer_fn"
    outer.signature.input_arg.add(name="prefix")
    outer.node_def.add(name="call", op="PartitionedCall", input=["prefix"]).attr["f"].func.name = "inner_fn"
    inner = gd.library.function.add()
    inner.signature.name = "inner_fn"
    inner.signature.input_arg.add(name="p")
    inner.node_def.add(name="copy", op="Identity", input=["p"])
    inner.node_def.add(name="read", op="RestoreV2", input=["copy:output:0", "names", "slices"])
    if second_call_prefix is not None:
        gd.node.add(name="other", op="Const")
        second = gd.node.add(name="restore_2", op="StatefulPartitionedCall", input=[second_call_prefix])
        second.attr["f"].func.name = "inner_fn"
        gd.node[1].input.append("^restore_2")
    return gd


@pytest.mark.parametrize("second", [None, "saver_filename", "other"])
def test_a_prefix_passed_through_nested_calls_must_be_the_fed_one_at_every_call(second):
    gd = _prefix_graph(second)
    found = scan.scan_graph_def(gd, saver_roots=["restore"], restore_roots=["restore"],
                                filename_tensor="saver_filename:0")
    if second in (None, "saver_filename"):
        assert found == []
    else:
        [finding] = found
        assert (finding.node, finding.function, finding.category) == ("read", "inner_fn", ELSEWHERE)
    # without a file name input declared, no prefix is the loader's
    [finding] = scan.scan_graph_def(_prefix_graph(None), saver_roots=["restore"], restore_roots=["restore"])
    assert "names none" in finding.detail


def test_restore_in_a_tracked_resources_restore_function_is_refused(tmp_path):
    """The object graph's restore functions are called by the loader with tensors: a RestoreV2 there
    has no file prefix the loader feeds."""
    model, restore_fn = _hooked_table(tmp_path, [
        corpus.string_const("stolen", b"/etc/passwd"), corpus.string_const("names", b"x"),
        corpus.node_def("hook_RestoreV2", "RestoreV2", ["stolen:output:0"] + ["names:output:0"] * 2,
                        dtypes=_attr(list=corpus._type_list(tf.string)))])
    [finding] = scan_path(model)
    assert (finding.op, finding.node, finding.function, finding.category) == (
        "RestoreV2", "hook_RestoreV2", restore_fn, ELSEWHERE)
    assert "'stolen' (Const) inside the function" in finding.detail


# ------------------------------------------------------------------------------------ allow-list review (issue 13)
def test_xla_compute_ops_are_allowed_and_xla_escapes_are_not():
    """XLA's compute ops (jax2tf and TPU exports) are on the list; modules, custom calls, host transfers,
    collectives and the compiler's own run-time ops are not."""
    for op in ("XlaConv", "XlaConvV2", "XlaDot", "XlaDotV2", "XlaReduce", "XlaGather", "XlaDynamicSlice",
               "XlaPad", "XlaSelectAndScatter", "XlaReduceWindow", "XlaSharding", "XlaWhile", "XlaIf"):
        assert scan._category(op, {}) is None, op
    for op in ("XlaCallModule", "XlaCustomCall", "XlaCustomCallV2", "XlaHostCompute", "XlaSendToHost",
               "XlaRecvFromHost", "XlaSend", "XlaRecv", "XlaAllReduce", "XlaReduceScatter", "XlaLaunch", "_XlaRun",
               "XlaRecvTPUEmbeddingActivations", "XlaSparseDenseMatmulWithCsrInput"):
        assert scan._category(op, {})[0] == scan.NOT_ALLOWED, op


def test_a_reducer_of_an_xla_op_is_scanned_like_any_function():
    """XlaReduce's reducer is a library function: an op in it is found."""
    from tensorflow.core.framework import graph_pb2

    gd = graph_pb2.GraphDef()
    reducer = gd.library.function.add()
    reducer.signature.name = "reducer_fn"
    reducer.node_def.add(name="leak", op="WriteFile")
    gd.node.add(name="reduce", op="XlaReduce").attr["reducer"].func.name = "reducer_fn"
    assert {(f.op, f.node, f.function) for f in scan.scan_graph_def(gd)} == {("WriteFile", "leak", "reducer_fn")}


def test_lookup_tables_compute_but_a_table_read_from_a_file_is_refused_with_a_reason(tmp_path):
    """HashTableV2, LookupTableFindV2, LookupTableImportV2 compute on tables in memory;
    InitializeTableFromTextFileV2 reads the file a tensor names: refused, saying why, unless allowed."""
    for op in ("HashTableV2", "LookupTableFindV2", "LookupTableImportV2"):
        assert scan._category(op, {}) is None, op
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\nc\n")

    class Vocab(tf.Module):
        def __init__(self):
            self.table = tf.lookup.StaticHashTable(tf.lookup.TextFileInitializer(
                str(vocab), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64,
                tf.lookup.TextFileIndex.LINE_NUMBER), -1)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="key")])
        def __call__(self, key):
            return {"id": self.table.lookup(key)}

    model = tmp_path / "vocab_model"
    m = Vocab()
    tf.saved_model.save(m, str(model), signatures=m.__call__)
    [finding] = scan_path(model)
    assert finding.op == "InitializeTableFromTextFileV2" and finding.function.startswith("__inference__initializer")
    assert "not check that the name is one of the model's assets" in finding.detail
    with pytest.raises(UnsafeModelError, match="--allow-ops InitializeTableFromTextFileV2"):
        check_safe(model)
    check_safe(model, allow_ops=["InitializeTableFromTextFileV2"])
