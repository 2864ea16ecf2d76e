"""The README's commands and custom-pass example are real: run them."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphslim
from graphslim.testing import fixture_io, fixture_path, run_saved_model

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_cmd = commands[1].strip()
    assert "pytest" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_custom_pass_example(tmp_path):
    block = re.search(r"custom-pass-example:start -->\n```python\n(.*?)```", README, re.S).group(1)
    plugin = tmp_path / "my_passes.py"
    plugin.write_text(block)
    out = tmp_path / "logits"
    exe = Path(sys.executable).parent / "graphslim"
    proc = subprocess.run([str(exe), "optimize", str(fixture_path("vgg_digits")), "-o", str(out),
                           "--plugin", str(plugin), "--passes", "strip-softmax{output=output_0},dce"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    inputs, expected = fixture_io("vgg_digits")
    logits = run_saved_model(out, inputs)["output_0"]
    # the new output is the pre-softmax logits: softmax of it is the original output
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    np.testing.assert_allclose(soft, expected["output_0"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits, expected["output_0"])
    assert not graphslim.load(out).nodes(op="Softmax")


def test_pipelines_in_the_pass_table_parse():
    from graphslim.pipeline import parse_pipeline

    table = README.split("### Built-in passes", 1)[1].split("\n\n", 1)[0]
    examples = [e for e in re.findall(r"`([a-z-]+(?:\{[^`]*\})?)`", table)
                if e.split("{")[0] in ("dce", "fold-batchnorm", "subset", "extend", "truncate", "prune",
                                        "separable", "lowrank", "tucker", "shuffle", "distill")]
    assert len(examples) >= 10
    for text in examples:
        assert str(parse_pipeline(text)) == text


@pytest.mark.parametrize("recipe", ["finetune-keras", "finetune-tape"])
def test_fine_tuning_recipes(tmp_path, monkeypatch, recipe):
    """The README's fine-tuning recipes, verbatim, on a pruned digits model: the loss falls, the
    trainable weights move, and (GradientTape) the saved result loads and runs."""
    import tensorflow as tf

    from graphslim.testing import digits

    block = re.search(recipe + r":start -->\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    g = graphslim.load(fixture_path("vgg_digits"))
    graphslim.run_pipeline(g, "fold-batchnorm,prune{ratio=0.5},dce")
    graphslim.save(g, tmp_path / "model_slim")
    d = digits()
    before = {k: w.value.copy() for k, w in g.weights.items() if w.trainable}
    scope = {"x_train": d["x_train"][:512], "y_train": d["y_train"][:512].astype(np.int64)}
    exec(compile(block, f"README {recipe}", "exec"), scope)
    if recipe == "finetune-keras":
        losses = scope["history"].history["loss"]
        assert losses[-1] < losses[0] and len(scope["model"].trainable_weights) == len(before)
        tuned = scope["model"].predict(d["x_test"], verbose=0)
        original = run_saved_model(tmp_path / "model_slim", {"image": d["x_test"]})["output_0"]
        assert tuned.shape == original.shape and not np.allclose(tuned, original, atol=1e-3)
    else:
        tuned = tf.saved_model.load(str(tmp_path / "model_tuned"))
        out = tuned.signatures["serving_default"](image=tf.constant(d["x_test"]))["output_0"].numpy()
        assert out.shape == (len(d["x_test"]), 10)
        changed = [v for v in scope["slim"].trainable_variables
                   if not np.array_equal(v.numpy(), before[v.name.rsplit(":", 1)[0]])]
        assert len(scope["slim"].trainable_variables) == len(before) and changed
