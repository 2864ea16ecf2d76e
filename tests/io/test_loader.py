"""Loader: every fixture format loads into the IR and computes exactly what the original computes."""

import shutil

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.errors import LoadError
from graphslim.testing import assert_graph_matches, fixture_index, fixture_io, fixture_path

ALL = [fx["name"] for fx in fixture_index()]


@pytest.mark.parametrize("name", ALL)
def test_fixture_loads_and_matches_original(name):
    g = graphslim.load(fixture_path(name))
    inputs, expected = fixture_io(name)
    assert sorted(a.name for a in g.inputs) == sorted(inputs)
    assert sorted(a.name for a in g.outputs) == sorted(expected)
    assert_graph_matches(g, inputs, expected, rtol=1e-5, atol=1e-5)
    # flattened: no function calls left, variables became weights
    ops = {n.op for n in g.nodes()}
    assert not ops & {"StatefulPartitionedCall", "PartitionedCall", "ReadVariableOp", "VarHandleOp", "VariableV2"}


def test_second_signature_by_name():
    g = graphslim.load(fixture_path("tf_module"), signature="embed")
    inputs, expected = fixture_io("tf_module", "embed")
    assert [a.name for a in g.outputs] == ["embedding"]
    assert_graph_matches(g, inputs, expected)


def test_wrong_signature_lists_available():
    with pytest.raises(LoadError, match=r"no signature named 'nope'.*'embed', 'serving_default'"):
        graphslim.load(fixture_path("tf_module"), signature="nope")


def test_wrong_tags_lists_available():
    with pytest.raises(LoadError, match=r"no MetaGraphDef with tags \['gpu'\].*\['serve'\]"):
        graphslim.load(fixture_path("vgg_digits"), tags=("gpu",))


def test_tf2_weight_names_and_trainable_flags():
    g = graphslim.load(fixture_path("tf_module"))
    assert {"dense_a/kernel", "dense_a/bias", "dense_b/kernel", "dense_b/bias", "norm/scale"} <= set(g.weights)
    assert g.weights["dense_a/kernel"].trainable and not g.weights["norm/scale"].trainable
    assert g.weights["dense_a/kernel"].value.shape == (6, 16)


def test_keras_weight_names():
    g = graphslim.load(fixture_path("vgg_digits"))
    assert "conv2d/kernel" in g.weights and g.weights["conv2d/kernel"].value.shape == (3, 3, 1, 16)
    assert g.assets["labels.txt"].decode().split()[:2] == ["zero", "one"]


def test_tf1_variables_and_trainable_collection():
    g = graphslim.load(fixture_path("tf1_model"))
    assert {"dense_1/kernel", "dense_1/bias", "dense_2/kernel", "dense_2/bias"} == set(g.weights)
    assert all(w.trainable for w in g.weights.values())


def test_legacy_model_refused_by_tf_is_read():
    path = fixture_path("legacy_slots")
    with pytest.raises(AttributeError, match="add_slot"):
        tf.saved_model.load(str(path))
    g = graphslim.load(path)
    inputs, expected = fixture_io("legacy_slots")
    assert_graph_matches(g, inputs, expected)
    assert not any("slot" in w or "optimizer" in w for w in g.weights)  # only what serving reads


def test_frozen_graph_consts_become_weights():
    g = graphslim.load(fixture_path("frozen_vgg"))
    kernels = [w for w in g.weights.values() if w.value.ndim == 4]
    assert len(kernels) == 3 and g.meta["format"] == "frozen_graphdef"


def test_load_does_not_touch_input(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(fixture_path("resnet_digits"), src)
    before = {p.name: p.stat().st_mtime_ns for p in src.rglob("*")}
    graphslim.load(src)
    assert {p.name: p.stat().st_mtime_ns for p in src.rglob("*")} == before


# ------------------------------------------------------------------ bad inputs
def test_missing_directory(tmp_path):
    with pytest.raises(LoadError, match="no such file or directory"):
        graphslim.load(tmp_path / "nope")


def test_directory_without_saved_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(LoadError, match="no saved_model.pb.*readme.txt"):
        graphslim.load(tmp_path)


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_corrupt_saved_model_pb(tmp_path, damage):
    src = tmp_path / "m"
    shutil.copytree(fixture_path("vgg_digits"), src)
    pb = src / "saved_model.pb"
    data = pb.read_bytes()
    if damage == "random":
        pb.write_bytes(np.random.RandomState(0).bytes(4096))
    elif damage == "truncated":
        pb.write_bytes(data[: len(data) // 3])
    else:
        pb.write_bytes(b"")
    with pytest.raises(LoadError, match=str(src)):
        graphslim.load(src)


def test_missing_variables(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(fixture_path("vgg_digits"), src)
    shutil.rmtree(src / "variables")
    with pytest.raises(LoadError, match=r"variables.index is missing"):
        graphslim.load(src)


def test_truncated_variables_data(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(fixture_path("vgg_digits"), src)
    data = next((src / "variables").glob("variables.data-*"))
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(LoadError, match=r"cannot read|truncated"):
        graphslim.load(src)


def test_variables_from_another_model(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(fixture_path("vgg_digits"), src)
    shutil.rmtree(src / "variables")
    shutil.copytree(fixture_path("resnet_digits") / "variables", src / "variables")
    with pytest.raises(LoadError):
        graphslim.load(src)


def test_corrupt_frozen_graph(tmp_path):
    f = tmp_path / "model.pb"
    f.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(LoadError, match="model.pb"):
        graphslim.load(f)
