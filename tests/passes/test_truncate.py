import numpy as np
import pytest

import graphslim
from graphslim.errors import PipelineError
from graphslim.runtime import run
from graphslim.testing import assert_close, fixture_io, fixture_path, run_saved_model


def test_truncate_at_keras_layer_equals_intermediate_tensor(tmp_path):
    g = graphslim.load(fixture_path("resnet_digits"))
    original = g.copy()
    inputs, _ = fixture_io("resnet_digits")
    rep = graphslim.run_pipeline(g, "truncate{at=global_average_pooling2d}")
    tensor = rep.passes[0]["stats"]["outputs"]["global_average_pooling2d"]
    assert g.nodes(op="MatMul") == [] and g.nodes(op="Softmax") == []
    assert [o.name for o in g.outputs] == ["global_average_pooling2d"]
    want = run(original, inputs, fetch=[tensor])[tensor]
    # same runtime: bit-identical
    np.testing.assert_array_equal(run(g, inputs)["global_average_pooling2d"], want)
    # the emitted SavedModel (TF may pick other kernels there): equal within float rounding
    out = graphslim.save(g, tmp_path / "features")
    got = run_saved_model(out, inputs)["global_average_pooling2d"]
    assert got.shape == (4, 32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_truncate_two_tensors_with_names():
    g = graphslim.load(fixture_path("inception_tiny"))
    original = g.copy()
    inputs, _ = fixture_io("inception_tiny")
    concat = g.nodes(op="ConcatV2")[0].name
    relu = g.nodes(op="Relu")[0].name
    graphslim.run_pipeline(g, f"truncate{{at={concat}:0,{relu} names=mixed,stem}}")
    want = run(original, inputs, fetch=[f"{concat}:0", f"{relu}:0"])
    got = run(g, inputs)
    np.testing.assert_array_equal(got["mixed"], want[f"{concat}:0"])
    np.testing.assert_array_equal(got["stem"], want[f"{relu}:0"])


def test_truncate_keep_outputs_adds():
    g = graphslim.load(fixture_path("vgg_digits"))
    graphslim.run_pipeline(g, "truncate{at=dense keep_outputs=true}")
    assert sorted(o.name for o in g.outputs) == ["dense", "output_0"]
    inputs, expected = fixture_io("vgg_digits")
    assert_close({"output_0": run(g, inputs)["output_0"]}, expected)


def test_truncate_unknown_layer_names_it():
    g = graphslim.load(fixture_path("vgg_digits"))
    with pytest.raises(PipelineError, match=r"no tensor, node or layer named 'conv2d_9'.*Similar layer scopes: conv2d"):
        graphslim.run_pipeline(g, "truncate{at=conv2d_9}")
