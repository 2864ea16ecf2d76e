"""The README's commands and custom-pass example are real: run them."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

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
                                        "separable", "lowrank")]
    assert len(examples) >= 10
    for text in examples:
        assert str(parse_pipeline(text)) == text
