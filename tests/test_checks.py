"""graphslim.compare and graphslim.bench: verify and bench as library calls (issue 14, item 6); the
CLI only formats what they return."""

from __future__ import annotations

import numpy as np
import pytest

import graphslim
from graphslim.errors import GraphslimError
from graphslim.testing import fixture_path

VGG = fixture_path("vgg_digits")


def test_compare_a_model_with_itself_is_exact():
    result = graphslim.compare(VGG, VGG, batch=4, seed=3)
    assert result["ok"] and result["compared"] == len(result["outputs"]) >= 1
    assert all(r["max_abs_error"] == 0.0 for r in result["outputs"])
    assert result["inputs"] == "random (seed 3, batch 4)"


def test_compare_with_given_arrays(tmp_path):
    expected = np.load(VGG.parent / "vgg_digits.expected.npz")
    inputs = {k[len("input:"):]: expected[k] for k in expected.files if k.startswith("input:")}
    steps = []
    result = graphslim.compare(VGG, VGG, inputs=inputs, progress=steps.append)
    assert result["ok"] and result["inputs"] == "given arrays"
    assert steps[:2] == [f"loading A {VGG}", f"loading B {VGG}"] and "running B" in steps
    shapes = {k: list(v.shape) for k, v in inputs.items()}
    assert result["input_shapes"] == shapes


def test_compare_refuses_inputs_that_are_not_the_signature_s():
    with pytest.raises(GraphslimError, match="no values for inputs"):
        graphslim.compare(VGG, VGG, inputs={"nope": np.zeros(3)})


def test_compare_trusted_runs_tensorflow_loader_and_agrees():
    ours = graphslim.compare(VGG, VGG, batch=2)
    theirs = graphslim.compare(VGG, VGG, batch=2, trusted=True)
    assert theirs["trusted"] and theirs["ok"]
    assert [r["name"] for r in ours["outputs"]] == [r["name"] for r in theirs["outputs"]]


def test_bench_times_models_side_by_side():
    data = graphslim.bench([VGG, VGG], rounds=3, calls=2, threads=1)
    rows = data["models"]
    assert [r["model"] for r in rows] == [str(VGG), str(VGG)]
    assert all(r["runtime"] == "graph" and r["median_ms"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0
    assert 0.2 < rows[1]["speedup"] < 5  # the same model: about 1 on a quiet machine
