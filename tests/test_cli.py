"""The ``graphslim`` command line, end to end on the fixture models.

Most tests run the click app in-process (CliRunner: TensorFlow is imported once); a few run the
installed console script in a subprocess to check real exit codes and clean stderr. Outputs that
several tests use are written once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import graphslim
from graphslim.cli import cli
from graphslim.testing import valid_conv_graph

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "fixtures" / "models"
VGG = MODELS / "vgg_digits"
RESNET = MODELS / "resnet_digits"
TF_MODULE = MODELS / "tf_module"
SCRIPT = ROOT / ".venv" / "bin" / "graphslim"


def run(*args):
    """Invoke the CLI in-process; stdout and stderr stay separate."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_script(*args, env_extra=None, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "GRAPHSLIM_DEBUG"}
    env.update(env_extra or {})
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def assert_clean_error(result, *fragments):
    """Exit 2, an 'error:' line on stderr naming every fragment, no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, error_lines[0])
    assert result.stdout == ""


def write_inputs(tmp_path: Path, fixture: str) -> Path:
    """The fixture's expected.npz inputs, re-keyed by plain signature input name."""
    with np.load(MODELS / f"{fixture}.expected.npz") as data:
        arrays = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
    path = tmp_path / f"{fixture}_inputs.npz"
    np.savez(path, **arrays)
    return path


def verify_json(*args):
    result = run("verify", *args, "--json")
    return result, json.loads(result.stdout)


# ---------------------------------------------------------------------------------- shared outputs
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def vgg_roundtrip(work):
    """vgg_digits through an empty pipeline."""
    out = work / "vgg_roundtrip"
    result = run("optimize", VGG, "-o", out)
    return out, result


@pytest.fixture(scope="module")
def resnet_folded(work):
    """resnet_digits through fold-batchnorm,dce, with a JSON report."""
    out, report = work / "resnet_folded", work / "resnet_report.json"
    result = run("optimize", RESNET, "-o", out, "--passes", "fold-batchnorm, dce",
                 "--report", report)
    return out, report, result


# ---------------------------------------------------------------------------------- optimize
def test_optimize_without_pipeline_is_an_exact_round_trip(vgg_roundtrip, tmp_path):
    out, result = vgg_roundtrip
    assert result.exit_code == 0, result.stderr
    assert (out / "saved_model.pb").is_file() and (out / "variables").is_dir()
    assert "Traceback" not in result.stderr
    # the summary table: params / MACs / size rows, unchanged params and MACs
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert lines["params"][1:4] == ["8,506", "8,506", "1x"]
    assert lines["MACs"][1:4] == ["98,112", "98,112", "1x"]
    assert "size" in lines
    assert "pipeline: (empty: round trip)" in result.stdout
    # progress went to stderr, by step
    assert "loading" in result.stderr and "writing" in result.stderr

    inputs = write_inputs(tmp_path, "vgg_digits")
    verified, data = verify_json(VGG, out, "--inputs", inputs)
    assert verified.exit_code == 0, verified.stdout + verified.stderr
    [row] = data["outputs"]
    assert row["name"] == "output_0" and row["status"] == "ok"
    assert row["shape_a"] == row["shape_b"] == [4, 10]
    assert row["max_abs_error"] <= 1e-5
    assert row["top1_agreement"] == 1.0


def test_verify_table_on_random_inputs(vgg_roundtrip):
    out, _ = vgg_roundtrip
    result = run("verify", VGG, out, "-n", 3, "--seed", 7)
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("output_0"))
    cells = row.split()
    assert cells[1:5] == ["[3,", "10]", "[3,", "10]"]
    assert float(cells[5]) <= 1e-5 and cells[-2:] == ["100.0%", "ok"]
    assert "random (seed 7, batch 3)" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("OK: 1 output(s)")


def test_optimize_with_passes_writes_report(resnet_folded):
    out, report_path, result = resnet_folded
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["pipeline"] == "fold-batchnorm,dce"  # canonical text, not as typed
    assert [p["text"] for p in report["passes"]] == ["fold-batchnorm", "dce"]
    for record in report["passes"]:
        assert set(record) >= {"text", "seconds", "verify_seconds", "changed", "stats"}
        assert record["seconds"] >= 0 and record["verify_seconds"] >= 0
    assert report["passes"][0]["changed"] is True
    assert report["passes"][0]["stats"]["batchnorms_left"] == 0
    assert report["params"]["before"] > report["params"]["after"] > 0
    assert report["macs"]["before"] >= report["macs"]["after"] > 0
    assert report["size_bytes"]["before"] > 0 and report["size_bytes"]["after"] > 0
    assert set(report["seconds"]) >= {"load", "passes", "save", "total"}
    assert report["graphslim_version"] and report["input"] == str(RESNET)
    assert report["output"] == str(out)

    layers = {layer["name"]: layer for layer in report["layers"]}
    convs = [layer for layer in report["layers"] if layer["op"] == "Conv2D"]
    assert len(convs) == 6
    for conv in convs:  # kept layers: channels before and after, same (no pruning here)
        assert conv["output_channels"]["before"] == conv["output_channels"]["after"] in (16, 32)
        assert conv["macs"]["before"] == conv["macs"]["after"] > 0
    removed = [layer for layer in layers.values() if layer["params"]["after"] is None]
    assert removed, "folded batch-norm nodes should be listed with after = null"
    assert all(layer["macs"]["after"] is None for layer in removed)

    # the pass table on stdout
    assert "fold-batchnorm" in result.stdout and "batchnorms_left=0" in result.stdout

    verified, data = verify_json(RESNET, out, "--atol", "1e-4")
    assert verified.exit_code == 0, verified.stdout
    assert data["ok"] is True and data["outputs"][0]["max_abs_error"] <= 1e-4


def test_optimize_with_toml_config_and_plugin(work, tmp_path):
    plugin = tmp_path / "cli_test_plugin.py"
    plugin.write_text(textwrap.dedent('''
        from dataclasses import dataclass, field
        from graphslim.pipeline import PassResult, register_pass

        @dataclass(frozen=True)
        class Opts:
            tag: str = field(default="x", metadata={"help": "a label echoed into the stats"})

        @register_pass("cli-test-noop", options=Opts)
        def noop(graph, opts):
            """Do nothing (CLI test plugin)."""
            import numpy as np
            return PassResult(changed=False, stats={"tag": opts.tag, "n": np.int64(3),
                                                    "arr": np.arange(3)})
    '''))
    config = tmp_path / "slim.toml"
    config.write_text('[[pass]]\nname = "cli-test-noop"\ntag = "hello"\n[[pass]]\nname = "dce"\n')
    out, report_path = tmp_path / "out", tmp_path / "r.json"
    try:
        result = run("optimize", TF_MODULE, "-o", out, "--config", config, "--plugin", plugin,
                     "--report", report_path)
        assert result.exit_code == 0, result.stderr
        report = json.loads(report_path.read_text())
        assert report["pipeline"] == "cli-test-noop{tag=hello},dce"
        assert report["passes"][0]["stats"] == {"tag": "hello", "n": 3, "arr": [0, 1, 2]}
        assert report["plugins"][0] == str(plugin)
        listing = run("passes", "--plugin", plugin)
        assert "cli-test-noop" in listing.stdout
        assert "tag (string, default x): a label echoed into the stats" in listing.stdout
    finally:
        from graphslim.pipeline import unregister_pass

        unregister_pass("cli-test-noop")


def test_optimize_warns_that_other_signatures_are_not_written(tmp_path):
    result = run("optimize", TF_MODULE, "-o", tmp_path / "out", "--passes", "dce", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["signatures_not_written"] == ["embed"]
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("warning: ")]
    assert "also has signature(s) 'embed'" in line and "writes only 'serving_default'" in line
    assert "--signature NAME" in line
    import tensorflow as tf

    assert list(tf.saved_model.load(str(tmp_path / "out")).signatures) == ["serving_default"]
    single = run("optimize", RESNET, "-o", tmp_path / "single")
    assert single.exit_code == 0 and "warning:" not in single.stderr


def test_quiet_optimize_prints_nothing(tmp_path):
    out = tmp_path / "out"
    result = run("-q", "optimize", TF_MODULE, "-o", out, "--passes", "dce")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert (out / "saved_model.pb").is_file()


def test_force_replaces_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = run("-q", "optimize", TF_MODULE, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert (out / "saved_model.pb").is_file() and not (out / "stale.txt").exists()


def test_optimize_jit_compile_writes_an_xla_model_that_verifies(tmp_path):
    out, report_path = tmp_path / "out", tmp_path / "r.json"
    result = run("-q", "optimize", RESNET, "-o", out, "--passes", "prune{ratio=0.5}", "--jit-compile",
                 "--report", report_path)
    assert result.exit_code == 0, result.stderr
    assert json.loads(report_path.read_text())["jit_compile"] is True
    text = (out / "saved_model.pb").read_bytes()
    assert b"_XlaMustCompile" in text
    pruned = tmp_path / "pruned"  # the same pipeline without XLA: the two agree
    assert run("-q", "optimize", RESNET, "-o", pruned, "--passes", "prune{ratio=0.5}").exit_code == 0
    assert b"_XlaMustCompile" not in (pruned / "saved_model.pb").read_bytes()
    verified, data = verify_json(pruned, out, "--atol", "1e-5")
    assert verified.exit_code == 0 and data["ok"] is True, verified.stdout
    assert "warning:" not in result.stderr  # no depthwise convolutions here


def test_optimize_jit_compile_warns_about_depthwise_convolutions_on_cpu(tmp_path):
    result = run("optimize", MODELS / "mobilenet_tiny", "-o", tmp_path / "out", "--jit-compile")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: --jit-compile")]
    assert len(warnings) == 1 and "depthwise convolution" in warnings[0], result.stderr
    assert (tmp_path / "out" / "saved_model.pb").is_file()
    quiet = run("-q", "optimize", MODELS / "mobilenet_tiny", "-o", tmp_path / "q", "--jit-compile")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_optimize_prune_suggests_fusing_elementwise_batch_norms(tmp_path):
    def warned(passes):
        result = run("optimize", RESNET, "-o", tmp_path / passes.split("{")[0], "--passes", passes)
        assert result.exit_code == 0, result.stderr
        return [line for line in result.stderr.splitlines() if line.startswith("warning: prune{")]

    hint = warned("prune{ratio=0.5}")
    assert len(hint) == 1 and "batch norm(s)" in hint[0] and "fuse-batchnorm" in hint[0], hint
    assert warned("fuse-batchnorm,prune{ratio=0.5}") == []
    assert warned("fold-batchnorm") == []  # no prune, no hint


def test_optimize_jit_compile_warns_when_assumed_shapes_cannot_be_checked(tmp_path):
    # A 300x300 VALID conv over [?, ?, ?, 1]: the XLA check's assumed sizes (32, 256) are too small,
    # which says nothing about real inputs: a warning, not a refusal, and the model is written.
    g = valid_conv_graph(300, scale=1.0)
    src = graphslim.save(g, tmp_path / "src")
    result = run("optimize", src, "-o", tmp_path / "out", "--jit-compile")
    assert result.exit_code == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: jit_compile:")]
    assert len(warned) == 1 and "could not be checked for XLA" in warned[0], result.stderr
    assert (tmp_path / "out" / "saved_model.pb").is_file()


def test_bench_times_models_side_by_side_with_and_without_xla(resnet_folded):
    out, _, result = resnet_folded
    assert result.exit_code == 0, result.stderr
    bench = run("bench", RESNET, out, "--xla", "--rounds", "3", "--calls", "2", "-n", "4", "--json")
    assert bench.exit_code == 0, bench.stderr
    data = json.loads(bench.stdout)
    assert data["input_shapes"] == {"image": [4, 8, 8, 1]} and data["rounds"] == 3
    rows = data["models"]
    assert [(r["model"], r["runtime"]) for r in rows] == [
        (str(RESNET), "graph"), (str(RESNET), "xla"), (str(out), "graph"), (str(out), "xla")]
    for r in rows:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    by = {(r["model"], r["runtime"]): r for r in rows}
    for runtime in ("graph", "xla"):  # speedup: the first model's median over this one's, same runtime
        first, second = by[(str(RESNET), runtime)], by[(str(out), runtime)]
        assert first["speedup"] == 1.0
        assert abs(second["speedup"] - first["median_ms"] / second["median_ms"]) < 1e-9
    for model in (RESNET, out):
        graph, xla = by[(str(model), "graph")], by[(str(model), "xla")]
        assert graph["xla_gain"] is None
        assert abs(xla["xla_gain"] - graph["median_ms"] / xla["median_ms"]) < 1e-9

    # a model written with --jit-compile runs through XLA as saved, and is compared with the others
    jit = out.parent / "resnet_jit"
    assert run("-q", "optimize", RESNET, "-o", jit, "--jit-compile").exit_code == 0
    mixed = json.loads(run("bench", RESNET, jit, "--rounds", "2", "--json").stdout)["models"]
    assert [r["runtime"] for r in mixed] == ["graph", "xla (saved)"]
    assert abs(mixed[1]["speedup"] - mixed[0]["median_ms"] / mixed[1]["median_ms"]) < 1e-9

    table = run("-q", "bench", RESNET, "--rounds", "2")
    assert table.exit_code == 0, table.stderr
    assert "image [1, 8, 8, 1]" in table.stdout and "median of 2 rounds x 3 calls" in table.stdout
    assert "XLA vs graph" not in table.stdout


def test_bench_errors(tmp_path):
    assert_clean_error(run("bench", tmp_path / "missing"), "no such file or directory", "bench runs")
    assert_clean_error(run("bench", RESNET, MODELS / "frozen_vgg.pb"), "frozen_vgg.pb is a file",
                       "bench runs SavedModels only", "graphslim optimize")
    assert_clean_error(run("bench", RESNET, MODELS / "mobilenet_tiny", "--rounds", "1"),
                       "input 'image'", "mobilenet_tiny")


# ---------------------------------------------------------------------------------- errors
def test_error_missing_model(tmp_path):
    out = tmp_path / "out"
    result = run("optimize", tmp_path / "nosuch", "-o", out)
    assert_clean_error(result, str(tmp_path / "nosuch"), "no such file")
    assert not out.exists()


def test_error_directory_without_saved_model(tmp_path):
    model, out = tmp_path / "empty", tmp_path / "out"
    model.mkdir()
    result = run("optimize", model, "-o", out)
    assert_clean_error(result, str(model), "saved_model.pb")
    assert not out.exists()


def test_error_corrupt_saved_model(tmp_path):
    model, out = tmp_path / "corrupt", tmp_path / "out"
    shutil.copytree(VGG, model)
    (model / "saved_model.pb").write_bytes(np.random.default_rng(0).bytes(4096))
    result = run("optimize", model, "-o", out)
    assert_clean_error(result, str(model / "saved_model.pb"), "corrupt")
    assert not out.exists()


def test_error_unknown_pass_lists_known_passes(tmp_path):
    out = tmp_path / "out"
    result = run("optimize", VGG, "-o", out, "--passes", "nosuch")
    assert_clean_error(result, "unknown pass 'nosuch'", "dce", "fold-batchnorm")
    assert not out.exists()


def test_error_unknown_option(tmp_path):
    out = tmp_path / "out"
    result = run("optimize", VGG, "-o", out, "--passes", "dce{foo=1}")
    assert_clean_error(result, "'dce'", "foo")
    assert not out.exists()


def test_error_wrong_signature_lists_available(tmp_path):
    out = tmp_path / "out"
    result = run("optimize", TF_MODULE, "-o", out, "--signature", "nope")
    assert_clean_error(result, "'nope'", "'embed'", "'serving_default'")
    assert not out.exists()


def test_error_existing_output_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("optimize", VGG, "-o", out)
    assert_clean_error(result, str(out), "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_error_passes_and_config_together(tmp_path):
    config, out = tmp_path / "p.toml", tmp_path / "out"
    config.write_text('pipeline = "dce"\n')
    result = run("optimize", VGG, "-o", out, "--passes", "dce", "--config", config)
    assert result.exit_code == 2
    assert "--passes and --config" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_error_output_inside_input(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TF_MODULE, model)
    result = run("optimize", model, "-o", model / "slim", "--force")
    assert_clean_error(result, "inside")
    assert not (model / "slim").exists()


def test_pass_interrupted_exits_130_and_plugin_bug_is_internal_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHSLIM_DEBUG", raising=False)
    plugin = tmp_path / "cli_test_bad_plugin.py"
    plugin.write_text(textwrap.dedent('''
        from graphslim.pipeline import PassResult, register_pass

        class Unprintable:
            def __str__(self):
                raise ValueError("no text for you")

        @register_pass("cli-test-interrupt")
        def interrupt(graph, options):
            """Simulates Ctrl-C in the middle of a pass."""
            raise KeyboardInterrupt

        @register_pass("cli-test-bad-stats")
        def bad_stats(graph, options):
            """Returns stats the report cannot render."""
            return PassResult(changed=False, stats={"thing": Unprintable()})
    '''))
    try:
        out = tmp_path / "out"
        result = run("optimize", TF_MODULE, "-o", out, "--plugin", plugin,
                     "--passes", "cli-test-interrupt")
        assert result.exit_code == 130
        assert result.stderr.rstrip().endswith("interrupted") and "Traceback" not in result.stderr
        assert not out.exists()

        result = run("optimize", TF_MODULE, "-o", out, "--plugin", plugin,
                     "--passes", "cli-test-bad-stats")
        assert result.exit_code == 3
        assert "internal error: ValueError: no text for you" in result.stderr
        assert "GRAPHSLIM_DEBUG=1" in result.stderr and "Traceback" not in result.stderr
        assert not out.exists()  # the report is built before anything is written
    finally:
        from graphslim.pipeline import unregister_pass

        unregister_pass("cli-test-interrupt")
        unregister_pass("cli-test-bad-stats")


# ---------------------------------------------------------------------------------- inspect, passes
def test_inspect_lists_all_signatures_and_layers():
    result = run("inspect", TF_MODULE)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "serving_default" in text and "embed" in text
    assert "embedding" in text and "logits" in text  # outputs of both signatures
    assert "params 196" in text and "MACs 160" in text
    assert "MatMul" in text and "[?, 16]" in text


def test_inspect_json():
    result = run("inspect", VGG, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["signatures"]["serving_default"]["inputs"]["image"] == {
        "dtype": "float32", "shape": [None, 8, 8, 1]}
    assert data["params"] == 8506 and data["macs"] == 98112
    assert data["ops"]["Conv2D"] == 3 and data["ops"]["MatMul"] == 2
    convs = [layer for layer in data["layers"] if layer["op"] == "Conv2D"]
    assert [c["shape"][-1] for c in convs] == [16, 16, 32]
    assert sum(layer["macs"] for layer in data["layers"]) == data["macs"]


def test_inspect_groups_is_clear_when_unavailable_or_prints_groups():
    result = run("inspect", VGG, "--groups")
    try:
        from graphslim.analysis import channels
        available = hasattr(channels, "channel_groups") and hasattr(channels, "format_groups")
    except ImportError:
        available = False
    if available:
        assert result.exit_code == 0, result.stderr
        assert "channel groups:" in result.stdout
    else:
        assert_clean_error(result, "graphslim.analysis.channels", "without --groups")


def test_passes_lists_builtins_with_help():
    result = run("passes")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("dce", "fold-batchnorm"):
        i = lines.index(name)
        assert lines[i + 1].strip(), f"no help line for {name}"
        assert lines[i + 2].strip().startswith("options")
    assert "Remove nodes (and weights) that no signature output needs." in result.stdout


# ---------------------------------------------------------------------------------- verify
def test_verify_different_models_exit_1():
    result = run("verify", RESNET, VGG)
    assert result.exit_code == 1
    assert "MISMATCH" in result.stdout and "FAIL" in result.stdout
    assert "Traceback" not in result.stderr


def test_verify_no_common_output_exit_1():
    result, data = verify_json(TF_MODULE, VGG)
    assert result.exit_code == 1
    assert data["compared"] == 0 and data["ok"] is False
    assert {r["name"]: r["status"] for r in data["outputs"]} == {
        "logits": "only in A", "output_0": "only in B"}


def test_verify_signature_and_inputs_errors(tmp_path):
    result = run("verify", TF_MODULE, TF_MODULE, "--signature", "nope")
    assert_clean_error(result, "'nope'", "'embed'", "'serving_default'")

    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=np.zeros((2, 6), np.float32))
    result = run("verify", TF_MODULE, TF_MODULE, "--inputs", bad)
    assert_clean_error(result, "'x'", "'wrong'")

    result = run("verify", MODELS / "frozen_vgg.pb", VGG)
    assert_clean_error(result, "frozen_vgg.pb", "SavedModel")


def test_verify_second_signature():
    result, data = verify_json(TF_MODULE, TF_MODULE, "--signature", "embed", "-n", 2)
    assert result.exit_code == 0
    assert data["outputs"][0]["name"] == "embedding" and data["outputs"][0]["shape_a"] == [2, 16]


# ---------------------------------------------------------------------------------- real processes
def test_console_script_exit_codes_and_clean_stderr(vgg_roundtrip, tmp_path):
    assert SCRIPT.exists(), "graphslim is not installed in .venv"
    out, _ = vgg_roundtrip
    inputs = write_inputs(tmp_path, "vgg_digits")
    ok = run_script("verify", VGG, out, "--inputs", inputs)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr and "output_0" in ok.stdout
    # TensorFlow's C++ and Python logging stay quiet: only our progress lines on stderr
    assert all(line.endswith(" ...") for line in ok.stderr.splitlines()), ok.stderr

    missing = run_script("optimize", tmp_path / "nosuch", "-o", tmp_path / "out")
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert missing.stderr.splitlines()[-1].startswith(f"error: {tmp_path / 'nosuch'}")
    assert not (tmp_path / "out").exists()


_STARTUP_WRITER = textwrap.dedent(r'''
    import os, sys
    from graphslim.cli import _startup_log_pattern, _startup_logs_dropped

    with _startup_logs_dropped(_startup_log_pattern(sys.argv[1])):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1795984843.019860    8136 port.cc:153] oneDNN custom operations are on.\n")
        os.write(2, b"W0000 00:00:1795984843.019880    8136 port.cc:148] a warning\n")
        os.write(2, b"E0000 00:00:1795984843.019890    8136 x.cc:1] an error\n")
        print("from python", file=sys.stderr)
    print("after", file=sys.stderr)
''')


@pytest.mark.parametrize("level,kept", [("2", ["E0000", "from python", "after"]),
                                        ("1", ["W0000", "E0000", "from python", "after"])])
def test_tensorflow_startup_logs_below_the_level_are_dropped(level, kept):
    """TensorFlow logs while its libraries load, before TF_CPP_MIN_LOG_LEVEL applies (absl's notice,
    the oneDNN banner): the CLI drops those lines itself, and keeps everything else written meanwhile."""
    from graphslim.cli import _startup_log_pattern

    result = subprocess.run([sys.executable, "-c", _STARTUP_WRITER, level], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert [line.split(" ")[0] if line[0] in "IWE" else line for line in result.stderr.splitlines()] == kept
    assert _startup_log_pattern("0") is None and _startup_log_pattern("") is None  # the user asked for all


def test_console_script_debug_shows_traceback(tmp_path):
    plugin = tmp_path / "debug_plugin.py"
    plugin.write_text(textwrap.dedent('''
        from graphslim.pipeline import PassResult, register_pass

        class Unprintable:
            def __str__(self):
                raise ValueError("no text for you")

        @register_pass("debug-bad-stats")
        def bad_stats(graph, options):
            """Returns stats the report cannot render."""
            return PassResult(changed=False, stats={"thing": Unprintable()})
    '''))
    args = ("optimize", TF_MODULE, "-o", tmp_path / "out", "--plugin", plugin,
            "--passes", "debug-bad-stats")
    result = run_script(*args, env_extra={"GRAPHSLIM_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ValueError: no text for you" in result.stderr
    assert not (tmp_path / "out").exists()


def test_version_and_python_m():
    result = subprocess.run([sys.executable, "-m", "graphslim", "--version"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    import graphslim

    assert result.returncode == 0 and result.stdout.strip() == f"graphslim {graphslim.__version__}"
    assert run("--version").stdout.strip() == f"graphslim {graphslim.__version__}"
