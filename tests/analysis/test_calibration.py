"""Calibration data loading (formats, checks, messages) and batched statistics (patches match TF's own
convolution for every geometry, moments match numpy regardless of batching and memory budget,
regression against a reference model)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.analysis.calibration import (CalibrationError, ChannelMoments, ConvGeometry, FeatureMoments,
                                            PatchMoments, Regression, collect, extract_patches,
                                            load_calibration)
from graphslim.errors import GraphslimError
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.testing import fixture_path


@pytest.fixture(scope="module")
def vgg():
    return graphslim.load(fixture_path("vgg_digits"))


@pytest.fixture(scope="module")
def multi():
    return graphslim.load(fixture_path("multi_io"))


# ------------------------------------------------------------------------------------------ loading
def test_load_npz_dir_npy_and_mapping(vgg, tmp_path):
    x = np.random.default_rng(0).random((10, 8, 8, 1))  # float64: cast to the input's float32
    np.savez(tmp_path / "c.npz", image=x, labels=np.arange(10))  # extra arrays are ignored
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "image.npy", x)
    np.save(tmp_path / "single.npy", x)
    for spec in (tmp_path / "c.npz", str(tmp_path / "dir"), tmp_path / "single.npy", {"image": x}):
        data = load_calibration(spec, vgg)
        assert list(data) == ["image"] and data["image"].dtype == np.float32
        np.testing.assert_allclose(data["image"], x, rtol=1e-6)
    assert load_calibration(tmp_path / "c.npz", vgg, max_examples=4)["image"].shape == (4, 8, 8, 1)


def test_single_input_accepts_one_array_under_any_name(vgg, tmp_path):
    np.savez(tmp_path / "c.npz", x_train=np.zeros((3, 8, 8, 1), np.float32))
    assert load_calibration(tmp_path / "c.npz", vgg)["image"].shape == (3, 8, 8, 1)


def test_multi_input(multi, tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", image=rng.random((5, 8, 8, 1), np.float32), meta=rng.random((5, 4), np.float32))
    data = load_calibration(tmp_path / "c.npz", multi)
    assert sorted(data) == ["image", "meta"]
    np.savez(tmp_path / "bad.npz", image=rng.random((5, 8, 8, 1), np.float32))
    with pytest.raises(CalibrationError, match=r"no array for input\(s\) meta.*image: \[N, 8, 8, 1\] float32; "
                                               r"meta: \[N, 4\] float32.*holds image \[5, 8, 8, 1\]"):
        load_calibration(tmp_path / "bad.npz", multi)
    np.savez(tmp_path / "count.npz", image=rng.random((5, 8, 8, 1), np.float32), meta=rng.random((4, 4), np.float32))
    with pytest.raises(CalibrationError, match="different numbers of examples"):
        load_calibration(tmp_path / "count.npz", multi)


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ({"image": np.zeros((2, 8, 8, 3), np.float32)}, r"shape \[2, 8, 8, 3\].*image: \[N, 8, 8, 1\] float32"),
    ({"image": np.zeros((8, 8, 1), np.float32)}, r"shape \[8, 8, 1\]"),
    ({"image": np.full((2, 8, 8, 1), "a")}, "dtype <U1, not castable"),
    ({"image": np.zeros((0, 8, 8, 1), np.float32)}, "no examples"),
])
def test_bad_data_errors_name_the_file_and_the_inputs(vgg, tmp_path, content, match):
    path = tmp_path / "calib.npz"
    if content is not None:
        np.savez(path, **content)
    with pytest.raises(CalibrationError, match=match) as err:
        load_calibration(path, vgg)
    assert isinstance(err.value, GraphslimError)
    assert str(path) in str(err.value)


def test_empty_directory_and_corrupt_file(vgg, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match=r"no \.npy files; expected image\.npy"):
        load_calibration(tmp_path / "empty", vgg)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="cannot read calibration data"):
        load_calibration(tmp_path / "junk.npz", vgg)


# ------------------------------------------------------------------------------------------ patches
GEOS = [dict(), dict(padding="VALID"), dict(strides=(2, 2)), dict(strides=(2, 3), padding="VALID"),
        dict(dilations=(2, 2)), dict(dilations=(1, 2), strides=(2, 2)), dict(padding="EXPLICIT", explicit=(1, 0, 2, 1)),
        dict(kh=1, kw=1, strides=(2, 2)), dict(kh=5, kw=3)]


@pytest.mark.parametrize("spec", GEOS)
@pytest.mark.parametrize("nchw", [False, True])
def test_patches_reproduce_tf_conv(spec, nchw):
    spec = dict(spec)
    kh, kw = spec.pop("kh", 3), spec.pop("kw", 3)
    geo = ConvGeometry(kh, kw, nchw=nchw, **{"padding": "SAME", **spec})
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
    w = rng.normal(size=(kh, kw, 3, 5)).astype(np.float32)
    pad = geo.padding
    if pad == "EXPLICIT":
        t, b, l, r = geo.explicit
        pad = [[0, 0], [t, b], [l, r], [0, 0]]
    ref = tf.nn.conv2d(x, w, strides=[1, *geo.strides, 1], padding=pad, dilations=[1, *geo.dilations, 1]).numpy()
    assert geo.out_size(9, 11) == ref.shape[1:3]
    p = extract_patches(np.transpose(x, (0, 3, 1, 2)) if nchw else x, geo)
    out = p.reshape(len(p), -1) @ w.reshape(-1, 5)
    np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4)


def test_geometry_of_node_reads_attrs():
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 3, 9, 9)})
    k = g.add_weight("k", np.zeros((3, 5, 3, 4), np.float32))
    node = g.add_node("c", "Conv2D", ["x", k], attrs={
        "T": tf.float32, "strides": [1, 1, 2, 1], "dilations": [1, 1, 1, 3], "padding": "EXPLICIT",
        "explicit_paddings": [0, 0, 0, 0, 1, 2, 3, 4], "data_format": "NCHW"})
    geo = ConvGeometry.of(g, node)
    assert geo == ConvGeometry(3, 5, (2, 1), (1, 3), "EXPLICIT", (1, 2, 3, 4), True)


# ------------------------------------------------------------------------------------------ collect
def small_graph() -> Graph:
    """x [N, 6, 6, 2] → Relu → "r"; x → Mean(H, W) → "m"."""
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 6, 6, 2)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    g.add_node("r", "Relu", ["x"], attrs={"T": tf.float32})
    g.add_node("axes", "Const", attrs={"dtype": tf.int32, "value": np.array([1, 2], np.int32)})
    g.add_node("m", "Mean", ["x", "axes"], attrs={"T": tf.float32, "Tidx": tf.int32, "keep_dims": False})
    g.outputs += [SignatureArg("r", Tensor("r", 0)), SignatureArg("m", Tensor("m", 0))]
    g.infer_shapes()
    return g


@pytest.mark.parametrize("batch,max_bytes", [(7, 256 << 20), (64, 256 << 20), (5, 600)])
def test_moments_match_numpy_for_any_batching(batch, max_bytes):
    g = small_graph()
    x = np.random.default_rng(3).normal(size=(23, 6, 6, 2)).astype(np.float32)
    geo = ConvGeometry(3, 3, padding="SAME")
    stats = collect(g, {"x": x}, {
        "relu": ("r:0", ChannelMoments()),
        "mean": ("m", FeatureMoments()),
        "patch": ("x:0", PatchMoments(geo, positions=None, full=True)),
    }, batch_size=batch, max_bytes=max_bytes)
    r = np.maximum(x, 0).reshape(-1, 2).astype(np.float64)
    cm = stats["relu"]
    assert cm.count == 23 * 36
    np.testing.assert_allclose(cm.mean, r.mean(0), rtol=1e-6)
    np.testing.assert_allclose(cm.variance, r.var(0), rtol=1e-5)
    np.testing.assert_allclose(cm.zero_fraction, (r == 0).mean(0))
    np.testing.assert_allclose(cm.mean_abs, np.abs(r).mean(0), rtol=1e-6)
    m = x.mean((1, 2)).astype(np.float64)
    np.testing.assert_allclose(stats["mean"].covariance, np.cov(m.T, bias=True), rtol=1e-4, atol=1e-7)
    p = extract_patches(x, geo).reshape(23 * 36, -1).astype(np.float64)
    pm = stats["patch"]
    np.testing.assert_allclose(pm.second_moment, p.T @ p / len(p), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(pm.mean, p.mean(0), rtol=1e-5, atol=1e-8)
    blocks = p.reshape(-1, 9, 2)
    np.testing.assert_allclose(pm.channel_second_moments[1], blocks[:, :, 1].T @ blocks[:, :, 1] / len(p), rtol=1e-5)


def test_sampled_positions_bound_the_work():
    g = small_graph()
    x = np.random.default_rng(4).normal(size=(10, 6, 6, 2)).astype(np.float32)
    acc = collect(g, {"x": x}, {0: ("x", PatchMoments(ConvGeometry(3, 3, padding="SAME"), positions=5))},
                  batch_size=4)[0]
    assert acc.count == 10 * 5 and acc.blocks.shape == (2, 9, 9) and acc.xx is None


def test_regression_against_a_reference_graph():
    """Features from the graph being rewritten, targets from the original, at the same positions."""
    g = small_graph()
    ref = small_graph()
    x = np.random.default_rng(5).normal(size=(9, 6, 6, 2)).astype(np.float32)
    w = np.random.default_rng(6).normal(size=(18, 3))
    geo = ConvGeometry(3, 3, padding="SAME")
    acc = collect(g, {"x": x}, {0: ("r", "x", Regression(lambda p: p, lambda p: p @ w, geo, positions=7))},
                  reference=ref, batch_size=4)[0]
    assert acc.count == 63
    b = np.linalg.solve(acc.ff + 1e-9 * np.eye(18), acc.ft)
    assert acc.residual(b) < acc.residual(w) and acc.residual(np.zeros_like(w)) == pytest.approx(acc.target_power)
    # dense rows: one row per example
    acc = collect(g, {"x": x}, {0: ("m", "m", Regression(lambda f: f, lambda f: f))}, reference=ref)[0]
    assert acc.count == 9 and acc.residual(np.eye(2)) == pytest.approx(0, abs=1e-9)
