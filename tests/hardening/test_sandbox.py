"""Contained execution (issue 13, item 3): every run of a model happens in a child process with
Landlock file-system rules, resource limits and a wall-clock timeout; a crash, an abort, a timeout
or a limit is a clear error (exit 2) naming the model and the signal, never exit 0, never a hang.

The models are built with TensorFlow itself (tf.function + tf.saved_model.save); the ops that the
allow-list refuses are accepted knowingly with ``--allow-ops`` so that the containment is what is
tested.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from graphslim import landlock
from graphslim.errors import GraphslimError
from graphslim.sandbox import Child, ExecutionError, Limits

ROOT = Path(__file__).resolve().parents[2]
LANDLOCK = landlock.abi_version() > 0


def _save(path: Path, fn, spec=tf.TensorSpec([None, 4], tf.float32)) -> Path:
    module = tf.Module()
    module.f = tf.function(fn, input_signature=[spec])
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.f})
    return path


def _cli(*args, timeout=120, **kw):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "graphslim", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    outside = root / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("the user's private file")
    marker = outside / "marker.txt"

    def reads(x):
        return {"y": x * tf.cast(tf.strings.length(tf.io.read_file(str(secret))), tf.float32)}

    def writes(x):  # DebugIdentityV2 writes debug event files under debug_urls, on the data path
        return {"y": tf.raw_ops.DebugIdentityV2(
            input=x * 2.0, tfdbg_context_id="c", op_name="op", output_slot=0, tensor_debug_mode=2,
            debug_urls=[f"file://{marker}"], circular_buffer_size=0, tfdbg_run_id="r")}

    def loops(x):
        i = tf.while_loop(lambda i: tf.constant(True), lambda i: i + 1, [tf.constant(0)])
        return {"y": x + tf.cast(i, tf.float32)}

    def aborts(x):
        with tf.control_dependencies([tf.raw_ops.Abort(error_msg="model abort")]):
            return {"y": x * 2.0}

    def clean(x):
        return {"y": tf.nn.relu(x) * 2.0}

    return {"root": root, "secret": secret, "marker": marker,
            "reads": _save(root / "reads", reads), "writes": _save(root / "writes", writes),
            "loops": _save(root / "loops", loops), "aborts": _save(root / "aborts", aborts),
            "clean": _save(root / "clean", clean)}


@pytest.mark.skipif(not LANDLOCK, reason="this kernel has no Landlock")
def test_a_model_that_passes_the_scan_cannot_read_outside_its_directory(models):
    r = _cli("verify", models["reads"], models["reads"], "--allow-ops", "ReadFile")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Permission denied" in r.stderr and "ReadFile" in r.stderr, r.stderr
    assert "private" not in r.stdout + r.stderr


@pytest.mark.skipif(not LANDLOCK, reason="this kernel has no Landlock")
def test_a_model_that_passes_the_scan_cannot_write_outside(models):
    r = _cli("verify", models["writes"], models["writes"], "--allow-ops", "DebugIdentityV2")
    # TensorFlow's debug writer may fail the run (exit 2) or only log its failure: either way,
    # nothing exists outside the model afterwards
    assert r.returncode in (0, 2), r.stdout + r.stderr
    assert not models["marker"].exists(), r.stdout + r.stderr
    assert sorted(p.name for p in models["marker"].parent.iterdir()) == ["secret.txt"]


def test_reading_files_is_refused_by_the_scan_without_allow_ops(models):
    r = _cli("verify", models["reads"], models["reads"])
    assert r.returncode == 2 and "ReadFile" in r.stderr, r.stderr


def test_an_endless_loop_is_killed_at_the_timeout(models):
    start = time.monotonic()
    r = _cli("verify", models["loops"], models["loops"], "--timeout", "3")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "did not finish within 3 s" in r.stderr and "SIGKILL" in r.stderr, r.stderr
    assert time.monotonic() - start < 60


def test_sigterm_ends_a_run_within_five_seconds(models):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    p = subprocess.Popen([sys.executable, "-m", "graphslim", "verify", str(models["loops"]), str(models["loops"])],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(12)  # loading and starting the child take a few seconds; then the loop spins
        assert p.poll() is None
        sent = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
        assert time.monotonic() - sent < 5
        assert p.returncode == 128 + signal.SIGTERM
        assert "terminated" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigint_ends_a_run_within_five_seconds(models):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # SIGINT at its default in the run, as in a terminal's foreground job (the suite may itself be a
    # background job of a non-interactive shell, which starts with SIGINT ignored)
    p = subprocess.Popen([sys.executable, "-m", "graphslim", "verify", str(models["loops"]), str(models["loops"])],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(12)
        assert p.poll() is None
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
        assert time.monotonic() - sent < 5
        assert p.returncode == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_an_abort_is_an_error_naming_the_signal(models):
    # graphslim's reading of a model is its dataflow: an Abort reached only by a control edge is not
    # part of it and never runs
    r = _cli("verify", models["aborts"], models["aborts"], "--allow-ops", "Abort")
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    # TensorFlow's own loader runs it (--trusted): the child ends, and the verdict says so
    r = _cli("verify", models["aborts"], models["aborts"], "--allow-ops", "Abort", "--trusted")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "SIGABRT" in r.stderr or "without an answer" in r.stderr, r.stderr
    assert "OK" not in r.stdout


def test_a_crash_of_the_child_is_an_error_naming_the_signal(models):
    import graphslim

    g = graphslim.load(models["clean"])
    with Child(Limits(timeout=60), label="the clean model") as child:
        h = child.load_graph(g)
        x = np.ones((2, 4), np.float32)
        np.testing.assert_allclose(child.run(h, {"x": x})["y"], 2 * x)
        os.kill(child._proc.pid, signal.SIGSEGV)
        with pytest.raises(ExecutionError, match="the clean model was killed by SIGSEGV"):
            child.run(h, {"x": x})
        with pytest.raises(ExecutionError, match="no longer usable"):
            child.run(h, {"x": x})


def test_the_memory_limit_is_a_clear_error(tmp_path):
    def big(x):
        n = tf.cast(tf.reduce_sum(x), tf.int64) * 1024 * 1024 * 1024
        return {"y": tf.reduce_sum(tf.ones(tf.stack([n]), tf.float32)) + x}

    model = _save(tmp_path / "big", big)
    import graphslim

    g = graphslim.load(model)
    with Child(Limits(timeout=120, memory=3 << 30), label="the greedy model") as child:
        h = child.load_graph(g)
        with pytest.raises(ExecutionError, match="greedy model") as err:
            child.run(h, {"x": np.full((1, 4), 1.0, np.float32)})  # 4 Gi floats: 16 GiB
    text = str(err.value)
    assert "OOM" in text or "SIGABRT" in text or "memory" in text.lower(), text


def test_the_child_starts_in_an_empty_scratch_directory_that_is_removed():
    with Child(Limits(timeout=60)) as child:
        scratch = child.scratch
        assert scratch.is_dir()
        assert scratch.name.startswith("graphslim-exec-")
        assert child.landlock == landlock.abi_version()
    assert not scratch.exists()


def test_a_tensorflow_error_in_the_child_is_a_clean_error(models):
    import graphslim

    g = graphslim.load(models["clean"])
    with Child(Limits(timeout=60), label="the clean model") as child:
        h = child.load_graph(g)
        with pytest.raises(GraphslimError, match="running the clean model"):
            child.run(h, {"x": np.ones((2, 5), np.float32)})  # wrong width
        np.testing.assert_allclose(child.run(h, {"x": np.ones((1, 4), np.float32)})["y"], 2.0)


def test_verify_trusted_runs_tensorflow_loader_in_the_child(models):
    r = _cli("verify", models["clean"], models["clean"], "--trusted")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
