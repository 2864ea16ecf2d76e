"""load → (pipeline) → save, then the emitted SavedModel run by TensorFlow itself matches the original."""

import numpy as np
import pytest

import graphslim
from graphslim.testing import assert_close, fixture_index, fixture_io, fixture_path, run_saved_model

ALL = [fx["name"] for fx in fixture_index()]


@pytest.mark.parametrize("pipeline", ["", "dce", "fold-batchnorm,dce", "fuse-batchnorm", "positions"])
@pytest.mark.parametrize("name", ALL)
def test_roundtrip_exact(tmp_path, name, pipeline):
    g = graphslim.load(fixture_path(name))
    if pipeline:
        graphslim.run_pipeline(g, pipeline)
    out = graphslim.save(g, tmp_path / "out")
    inputs, expected = fixture_io(name)
    assert_close(run_saved_model(out, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_roundtrip_for_xla(tmp_path, name):
    """Every fixture written with jit_compile=True runs through XLA (frozen, TF1, multi-input,
    fully convolutional with unknown spatial size, detection heads) and matches the original to float32
    rounding (XLA reorders arithmetic)."""
    g = graphslim.load(fixture_path(name))
    out = graphslim.save(g, tmp_path / "out", jit_compile=True)
    assert b"_XlaMustCompile" in (out / "saved_model.pb").read_bytes()
    inputs, expected = fixture_io(name)
    assert_close(run_saved_model(out, inputs), expected, rtol=1e-5, atol=1e-5)


def test_roundtrip_keeps_names_and_assets(tmp_path):
    g = graphslim.load(fixture_path("vgg_digits"))
    out = graphslim.save(g, tmp_path / "out")
    g2 = graphslim.load(out)
    assert set(g2.weights) == set(g.weights)
    assert [a.name for a in g2.inputs] == [a.name for a in g.inputs]
    assert [a.name for a in g2.outputs] == [a.name for a in g.outputs]
    assert g2.assets == g.assets and (out / "assets" / "labels.txt").exists()
    assert {n.name for n in g2.nodes()} == {n.name for n in g.nodes()}


def test_roundtrip_second_signature(tmp_path):
    g = graphslim.load(fixture_path("tf_module"), signature="embed")
    out = graphslim.save(g, tmp_path / "out")
    inputs, expected = fixture_io("tf_module", "embed")
    assert_close(run_saved_model(out, inputs, signature="embed"), expected)


@pytest.fixture(scope="module")
def mobilenet_v2(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10)
    path = tmp_path_factory.mktemp("zoo") / "mobilenet_v2"
    model.export(str(path), verbose=False)
    return path


@pytest.mark.parametrize("pipeline", ["", "dce", "fold-batchnorm,dce", "fuse-batchnorm", "positions"])
def test_keras_applications_mobilenet_v2(tmp_path, mobilenet_v2, pipeline):
    g = graphslim.load(mobilenet_v2)
    name = g.inputs[0].name
    x = {name: np.random.RandomState(0).rand(2, 96, 96, 3).astype("float32")}
    expected = run_saved_model(mobilenet_v2, x)
    if pipeline:
        rep = graphslim.run_pipeline(g, pipeline)
        if "fold" in pipeline:
            assert rep.passes[0]["stats"]["folded_layers"] == 52
            assert not g.nodes(op="Rsqrt")
        if "fuse" in pipeline:
            assert rep.passes[0]["stats"]["fused"] == 52
            assert not g.nodes(op="Rsqrt") and len(g.nodes(op="FusedBatchNormV3")) == 52
    out = graphslim.save(g, tmp_path / "out")
    assert_close(run_saved_model(out, x), expected, rtol=1e-5, atol=1e-5)


def test_large_weights_are_mapped_and_written_blockwise(tmp_path, monkeypatch):
    """Weights over MAP_BYTES are read-only views of the checkpoint file; those over BLOCKWISE_BYTES
    become variables block by block (pages released as they go); the round trip stays exact."""
    from graphslim.io import emitter, variables
    from graphslim.ir import storage
    from graphslim.ir.storage import mapping_of

    monkeypatch.setattr(variables, "MAP_BYTES", 1024)
    monkeypatch.setattr(emitter, "BLOCKWISE_BYTES", 1024)
    monkeypatch.setattr(storage, "BLOCK_BYTES", 4096)
    g = graphslim.load(fixture_path("vgg_digits"))
    big = [w for w in g.weights.values() if w.value.nbytes >= 1024]
    assert big and all(mapping_of(w.value) is not None and not w.value.flags.writeable for w in big)
    assert all(mapping_of(w.value) is None for w in g.weights.values() if w.value.nbytes < 1024)
    with pytest.raises(ValueError):
        big[0].value[...] = 0  # a pass cannot change a loaded weight in place
    path = graphslim.save(g, tmp_path / "out")
    inputs, expected = fixture_io("vgg_digits")
    assert_close(run_saved_model(path, inputs), expected, rtol=1e-5, atol=1e-5)
