"""separable: exact at full rank (fixtures, inline graphs for every conv geometry, an emitted SavedModel),
error falls with rank, energy=/max_error= give the rank they promise, every Conv2D is reported, the
data-aware and latency-aware variants, fine-tunable output."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.analysis.factorize import kept_energy
from graphslim.errors import OptionError
from graphslim.ir.graph import SignatureArg, Tensor
from graphslim.runtime import run
from graphslim.testing import assert_close, conv_graph, digits, fixture_io, fixture_path, run_saved_model
from graphslim.testing import layer_stats as layer
from graphslim.testing import pass_stats as stats_of

TOL = dict(rtol=1e-4, atol=1e-4)
FULL = "separable{rank=1000 min_macs_saving=none}"
CONV_FIXTURES = ["vgg_digits", "resnet_digits", "fcn_tiny", "ssd_tiny", "inception_tiny", "mobilenet_tiny",
                 "multi_io", "legacy_slots", "frozen_vgg"]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.mark.parametrize("name", CONV_FIXTURES)
def test_full_rank_is_exact_on_fixtures(name):
    g = graphslim.load(fixture_path(name))
    inputs, expected = fixture_io(name)
    n_convs = len(g.nodes(op="Conv2D"))
    report = graphslim.run_pipeline(g, FULL)
    st = stats_of(report)
    assert len(st["layers"]) == n_convs  # every Conv2D has a record
    assert st["factorized"] >= 1
    for rec in st["layers"]:
        if rec["action"] == "factorized":
            assert rec["rank"] == rec["full_rank"] and rec["weight_error"] < 1e-6
        else:
            assert rec["reason"].startswith("kernel 1×1")
    assert len(g.nodes(op="DepthwiseConv2dNative")) >= st["factorized"]
    assert [o.name for o in g.outputs] == list(expected) or sorted(o.name for o in g.outputs) == sorted(expected)
    assert_close(run(g, inputs), expected, **TOL)


def test_emitted_model_exact_named_and_fine_tunable(tmp_path):
    g = graphslim.load(fixture_path("vgg_digits"))
    sig_in = [(a.name, g.shape(a.tensor), g.dtype(a.tensor)) for a in g.inputs]
    sig_out = [(a.name, g.shape(a.tensor), g.dtype(a.tensor)) for a in g.outputs]
    graphslim.run_pipeline(g, FULL + ",dce")
    assert [(a.name, g.shape(a.tensor), g.dtype(a.tensor)) for a in g.inputs] == sig_in
    assert [(a.name, g.shape(a.tensor), g.dtype(a.tensor)) for a in g.outputs] == sig_out
    for layer_name in ("conv2d", "conv2d_1", "conv2d_2"):
        assert f"{layer_name}/kernel" not in g.weights
        assert g.weights[f"{layer_name}/depthwise_kernel"].trainable
        assert g.weights[f"{layer_name}/pointwise_kernel"].value.shape[:2] == (1, 1)
        assert f"{layer_name}/bias" in g.weights  # the bias stays on the BiasAdd after the pointwise conv
    path = graphslim.save(g, tmp_path / "sep")
    inputs, expected = fixture_io("vgg_digits")
    assert_close(run_saved_model(path, inputs), expected, **TOL)

    loaded = tf.saved_model.load(str(path))
    names = {v.name[:-2] for v in loaded.trainable_variables}
    assert {"conv2d_1/depthwise_kernel", "conv2d_1/pointwise_kernel"} <= names
    x = tf.constant(inputs["image"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(loaded.serve(x)["output_0"]))
    grads = tape.gradient(loss, loaded.trainable_variables)
    for v, grad in zip(loaded.trainable_variables, grads):
        if v.name.startswith("conv2d_1/"):
            before = v.numpy().copy()
            v.assign_sub(0.1 * grad)
            assert np.abs(v.numpy() - before).max() > 0, v.name


# ------------------------------------------------------------------------------------------ geometry
GEOMETRIES = {
    "same": dict(),
    "valid": dict(padding="VALID"),
    "stride2_same": dict(strides=(2, 2)),
    "stride2_valid": dict(strides=(2, 2), padding="VALID"),
    "dilation2_same": dict(dilations=(2, 2)),
    "dilation2_valid": dict(dilations=(2, 2), padding="VALID"),
    "dilation_2x1_stride2": dict(dilations=(2, 1), strides=(2, 2)),
    "unequal_strides": dict(strides=(1, 2)),
    "explicit": dict(padding="EXPLICIT", explicit=(1, 2, 0, 1)),
    "explicit_stride2": dict(padding="EXPLICIT", explicit=(2, 0, 1, 1), strides=(2, 2)),
    "no_bias": dict(bias=False),
    "kernel_5x3_cout_lt_k2": dict(k=(5, 3), cout=6),
    "kernel_1x3": dict(k=(1, 3)),
}


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_full_rank_exact_for_each_geometry(case):
    g = conv_graph(**GEOMETRIES[case])
    x = np.random.default_rng(1).normal(size=(2, 9, 10, 4)).astype(np.float32)
    before = run(g, {"x": x})
    report = graphslim.run_pipeline(g, FULL)
    rec = layer(report)
    assert rec["action"] == "factorized", rec
    kh, kw = GEOMETRIES[case].get("k", (3, 3))
    assert rec["rank"] == min(kh * kw, 6)
    ops = [n.op for n in g.nodes()]
    assert ops.count("DepthwiseConv2dNative") == 1 and ops.count("Conv2D") == 1
    pw = g.node("net/layer/Conv2D")  # the original node keeps its name and is now the pointwise conv
    assert g.shape(g.input(pw, 1))[:2] == (1, 1) and pw.attr("padding") == "VALID"
    if GEOMETRIES[case].get("dilations", (1, 1)) != (1, 1):
        assert "SpaceToBatchND" in ops and "BatchToSpaceND" in ops
    assert_close(run(g, {"x": x}), before, **TOL)


@pytest.mark.parametrize("case", ["same", "stride2_valid", "explicit"])
def test_nchw_structure_and_math(case):
    """NCHW Conv2D does not run on CPU: check the emitted structure, and the math through NHWC ops."""
    spec = GEOMETRIES[case]
    g = conv_graph(fmt="NCHW", **spec)
    w = g.weights["layer/kernel"].value
    graphslim.run_pipeline(g, "separable{rank=1000 min_macs_saving=none}")
    dw_node = g.nodes(op="DepthwiseConv2dNative")[0]
    pw = g.node("net/layer/Conv2D")
    assert dw_node.attr("data_format") == "NCHW" and pw.attr("data_format") == "NCHW"
    s = spec.get("strides", (1, 1))
    assert dw_node.attr("strides") == [1, 1, *s] and pw.attr("strides") == [1, 1, 1, 1]
    assert g.nodes(op="BiasAdd")[0].attr("data_format") == "NCHW"
    dwk = g.weights["layer/depthwise_kernel"].value
    pwk = g.weights["layer/pointwise_kernel"].value
    x = np.random.default_rng(2).normal(size=(2, 9, 10, 4)).astype(np.float32)
    pad = spec.get("padding", "SAME")
    if pad == "EXPLICIT":
        t, b, l, r = spec["explicit"]
        pad = [[0, 0], [t, b], [l, r], [0, 0]]
        assert dw_node.attr("explicit_paddings") == [0, 0, 0, 0, t, b, l, r]
    ref = tf.nn.conv2d(x, w, strides=[1, *s, 1], padding=pad)
    got = tf.nn.conv2d(tf.nn.depthwise_conv2d(x, dwk, strides=[1, *s, 1], padding=pad), pwk, 1, "VALID")
    np.testing.assert_allclose(got.numpy(), ref.numpy(), **TOL)
    assert [n.op for n in g.nodes(op="Conv2D")] == ["Conv2D"]


def test_dilated_nchw_is_reported_not_rewritten():
    g = conv_graph(fmt="NCHW", dilations=(2, 2))
    rec = layer(graphslim.run_pipeline(g, FULL))
    assert rec["action"] == "skipped" and "NCHW" in rec["reason"]
    assert not g.nodes(op="DepthwiseConv2dNative")


def test_depthwise_channel_order_is_c_times_m_plus_j():
    g = conv_graph(cin=3, cout=8, bias=False)
    w = g.weights["layer/kernel"].value.astype(np.float64)
    graphslim.run_pipeline(g, "separable{rank=2}")
    dw = g.weights["layer/depthwise_kernel"].value.astype(np.float64)
    pw = g.weights["layer/pointwise_kernel"].value.astype(np.float64)[0, 0]
    assert dw.shape == (3, 3, 3, 2) and pw.shape == (6, 8)
    for c in range(3):  # channel c's rank-2 SVD truncation is dw[..., c, :] @ pw[c*2:(c+1)*2]
        approx = dw[:, :, c, :].reshape(9, 2) @ pw[2 * c: 2 * c + 2]
        u, s, vt = np.linalg.svd(w[:, :, c, :].reshape(9, 8), full_matrices=False)
        np.testing.assert_allclose(approx, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)


# ------------------------------------------------------------------------------------------ rank choice
def test_error_falls_as_rank_grows():
    x = np.random.default_rng(3).normal(size=(2, 9, 10, 4)).astype(np.float32)
    g0 = conv_graph(cout=12, bias=False)
    ref = run(g0, {"x": x})["y"]
    weight_errs, out_errs = [], []
    for m in range(1, 10):
        g = g0.copy()
        rec = layer(graphslim.run_pipeline(g, f"separable{{rank={m} min_macs_saving=none}}"))
        assert rec["rank"] == m
        weight_errs.append(rec["weight_error"])
        out_errs.append(float(np.linalg.norm(run(g, {"x": x})["y"] - ref)))
    assert all(a > b for a, b in zip(weight_errs, weight_errs[1:])), weight_errs
    assert all(a >= b - 1e-6 for a, b in zip(out_errs, out_errs[1:])), out_errs
    assert weight_errs[-1] < 1e-6 and out_errs[-1] < 1e-3


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_energy_gives_the_rank_it_promises(energy):
    g = graphslim.load(fixture_path("ssd_tiny"))
    kernels = {n.name: g.weight_of(n, 1).value for n in g.nodes(op="Conv2D")}
    st = stats_of(graphslim.run_pipeline(g, f"separable{{energy={energy} min_macs_saving=none}}"))
    for rec in st["layers"]:
        w = kernels[rec["layer"]].astype(np.float64)
        kh, kw, c, cout = w.shape
        s = np.linalg.svd(w.transpose(2, 0, 1, 3).reshape(c, kh * kw, cout), compute_uv=False)
        kept = kept_energy(s)
        m = rec["rank"]
        assert kept[m] >= energy - 1e-9 and (m == 1 or kept[m - 1] < energy), (rec, kept)
        assert rec["energy_kept"] == pytest.approx(kept[m], rel=1e-5)
        assert rec["weight_error"] == pytest.approx(np.sqrt(1 - kept[m]), rel=1e-3, abs=1e-6)


def test_max_error_bounds_the_weight_error():
    g = graphslim.load(fixture_path("ssd_tiny"))
    st = stats_of(graphslim.run_pipeline(g, "separable{max_error=0.3 min_macs_saving=none}"))
    for rec in st["layers"]:
        assert rec["weight_error"] <= 0.3 + 1e-6
        assert rec["energy_kept"] >= 1 - 0.3 ** 2 - 1e-6


# ------------------------------------------------------------------------------------------ reporting
def test_every_conv_reported_with_reason():
    g = graphslim.load(fixture_path("resnet_digits"))
    st = stats_of(graphslim.run_pipeline(g, "separable{rank=3 exclude=conv2d_5}"))
    by_kernel = {r.get("kernel"): r for r in st["layers"]}
    one = next(r for r in st["layers"] if r["kernel_shape"][:2] == [1, 1])
    assert one["action"] == "skipped" and one["reason"] == "kernel 1×1 (already pointwise)"
    assert by_kernel["conv2d_5/kernel"]["reason"] == "excluded (exclude=conv2d_5)"
    done = by_kernel["conv2d_1/kernel"]
    assert done["action"] == "factorized" and done["rank"] == 3
    assert done["macs_after"] < done["macs_before"] and 0 < done["weight_error"] < 1
    assert done["new_weights"] == ["conv2d_1/depthwise_kernel", "conv2d_1/pointwise_kernel"]
    assert st["macs_after"] < st["macs_before"] and st["factorized"] == 4 and st["skipped"] == 2


def test_rank_not_saving_macs_is_reported():
    g = conv_graph()
    rec = layer(graphslim.run_pipeline(g, "separable{rank=6}"))  # 6·(9+6) > 9·6
    assert rec["action"] == "skipped" and "does not save MACs" in rec["reason"]
    assert not g.nodes(op="DepthwiseConv2dNative")
    rec = layer(graphslim.run_pipeline(g, "separable{rank=2 min_macs_saving=0.5}"))  # saves 44%
    assert rec["action"] == "skipped" and "min_macs_saving=0.5" in rec["reason"]


def test_grouped_and_shared_kernels_are_reported():
    g = conv_graph(cin=4)
    conv = g.node("net/layer/Conv2D")
    g.set_weight("layer/kernel", g.weights["layer/kernel"].value[:, :, :2])  # 2 groups of 2 channels
    g.infer_shapes()
    assert layer(graphslim.run_pipeline(g, "separable{rank=1}"))["reason"].startswith("grouped conv")
    g = conv_graph()
    g.add_node("other", "Conv2D", ["x", "layer/kernel"], attrs=dict(conv.attrs))
    g.outputs.append(SignatureArg("z", Tensor("other", 0)))
    recs = stats_of(graphslim.run_pipeline(g, "separable{rank=1}"))["layers"]
    assert all("shared" in r["reason"] for r in recs)


def test_layers_selects_and_unknown_pattern_fails():
    g = graphslim.load(fixture_path("vgg_digits"))
    st = stats_of(graphslim.run_pipeline(g, "separable{rank=2 layers=conv2d_1}"))
    assert [r["kernel"] for r in st["layers"] if r["action"] == "factorized"] == ["conv2d_1/kernel"]
    assert {r["reason"] for r in st["layers"] if r["action"] != "factorized"} == {"not selected by layers="}
    with pytest.raises(graphslim.PipelineError, match="matches no candidate"):
        graphslim.run_pipeline(g, "separable{rank=2 layers=block9_conv*}")


def test_options_take_at_most_one_rank_criterion_default_energy():
    for text in ("separable{rank=2 energy=0.9}", "separable{energy=1.5}", "separable{rank=0}"):
        with pytest.raises(OptionError):
            graphslim.PassManager(text)
    g = graphslim.load(fixture_path("ssd_tiny"))
    st = stats_of(graphslim.run_pipeline(g, "separable{min_macs_saving=none}"))
    assert all(r["energy_kept"] >= 0.9 for r in st["layers"])
    assert any(r["energy_kept"] < 0.9999 for r in st["layers"])


# ------------------------------------------------------------------------------------------ data-aware, latency
@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, image=digits()["x_train"][:128])
    return path


def test_calibrated_reports_both_errors_and_beats_weights_on_output(calib_file):
    d = digits()
    x, y = d["x_test"][:200], d["y_test"][:200]
    g0 = graphslim.load(fixture_path("vgg_digits"))
    ref = run(g0, {"image": x})["output_0"]
    errs, recs = {}, {}
    for mode in ("weights", "calib"):
        g = g0.copy()
        text = "separable{rank=2" + (f' calib="{calib_file}"' if mode == "calib" else "") + "}"
        st = stats_of(graphslim.run_pipeline(g, text))
        recs[mode] = st["layers"]
        out = run(g, {"image": x})["output_0"]
        errs[mode] = float(np.linalg.norm(out - ref))
        if mode == "calib":
            assert st["calibrated"] and (out.argmax(1) == y).mean() > 0.85
    assert errs["calib"] < errs["weights"]
    for rec in recs["calib"]:
        assert rec["calibrated"] and rec["weight_error"] > 0 and 0 <= rec["output_error"] < 1
        if "output_error_before_refit" in rec:
            assert rec["output_error"] < rec["output_error_before_refit"]
    assert all("output_error" not in r for r in recs["weights"])


def test_calibrated_full_rank_stays_exact(calib_file):
    g = graphslim.load(fixture_path("vgg_digits"))
    inputs, expected = fixture_io("vgg_digits")
    st = stats_of(graphslim.run_pipeline(g, f'separable{{rank=9 min_macs_saving=none calib="{calib_file}"}}'))
    assert all(r["output_error"] < 1e-5 for r in st["layers"])
    assert_close(run(g, inputs), expected, **TOL)


def test_bad_calibration_file_names_the_inputs(tmp_path):
    g = graphslim.load(fixture_path("vgg_digits"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(graphslim.PipelineError, match=r"image: \[N, 8, 8, 1\] float32"):
        graphslim.run_pipeline(g, f'separable{{rank=2 calib="{bad}"}}')


@pytest.mark.parametrize("runtime", ["tf", "litert"])
def test_latency_cost_applies_only_layers_faster_on_the_runtime(runtime):
    """cost=latency runtime=R: the original and factorized layers are timed on R (LiteRT: converted and
    run on XNNPACK); the decision follows those figures and the model stays exact when a layer is kept."""
    g = conv_graph(cin=32, cout=32, hw=(32, 32), seed=5)
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 32)).astype(np.float32)
    before = run(g, {"x": x})["y"]
    st = stats_of(graphslim.run_pipeline(g, f"separable{{rank=1 cost=latency runtime={runtime} latency_runs=3}}"))
    rec = st["layers"][0]
    assert rec["ms_before"] > 0 and rec["ms_after"] > 0
    if rec["action"] == "factorized":
        assert rec["ms_after"] < rec["ms_before"]
        assert g.nodes(op="DepthwiseConv2dNative")
    else:
        assert rec["reason"].startswith(f"slower when timed on {runtime}")
        np.testing.assert_array_equal(run(g, {"x": x})["y"], before)


def test_latency_untimeable_layer_is_reported():
    g = conv_graph(fmt="NCHW")
    rec = layer(graphslim.run_pipeline(g, "separable{rank=1 cost=latency}"))
    assert rec["action"] == "skipped" and "cannot be timed" in rec["reason"]


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_macs_budget_is_met_and_unspent_layers_reported(target):
    g = graphslim.load(fixture_path("resnet_digits"))
    st = stats_of(graphslim.run_pipeline(g, f"separable{{macs={target}}}"))
    assert st["macs_after"] <= target * st["macs_before"] and st["macs_target"] == target
    assert st["macs_planned"] == pytest.approx(st["macs_after"] / st["macs_before"], abs=1e-3)
    reasons = {r["reason"] for r in st["layers"] if r["action"] == "skipped"}
    assert reasons <= {"kernel 1×1 (already pointwise)", f"kept whole by the macs={target} budget"}
    assert st["factorized"] >= 1
