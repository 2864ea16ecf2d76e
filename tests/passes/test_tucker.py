"""tucker: K×K Conv2D → 1×1 (C→r1) → K×K (r1→r2) → 1×1 (r2→N) by HOSVD; exact at full rank (inline
graphs for the conv geometries, a fixture through save and load); error falls as ranks grow;
energy=/max_error= give the ranks they promise; the data-aware variant beats the weight-based one on the
digits; MACs fall as reported; macs= meets its budget; bad options and misfit layers are explained."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.analysis.factorize import kept_energy
from graphslim.errors import OptionError
from graphslim.runtime import run
from graphslim.testing import conv_graph as one_conv
from graphslim.testing import digits, fixture_io, fixture_path, run_saved_model
from graphslim.testing import layer_stats as layer
from graphslim.testing import pass_stats as stats_of

FULL = "tucker{ranks=100000,100000 min_macs_saving=none}"
conv_graph = partial(one_conv, cin=6, cout=8)  # 6 → 8 channels: both Tucker modes have room


def assert_outputs_close(got: dict, want: dict, rel: float = 1e-4):
    """allclose with rtol ``rel`` and atol ``rel`` × the output's largest magnitude."""
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        scale = float(np.abs(w).max()) or 1.0
        err = float(np.abs(got[k] - w).max())
        assert np.allclose(got[k], w, rtol=rel, atol=rel * scale), f"{k}: max abs error {err:.3g} (scale {scale:.3g})"


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------ exactness
def test_full_rank_exact_through_save_and_load(tmp_path):
    g = graphslim.load(fixture_path("vgg_digits"))
    inputs, expected = fixture_io("vgg_digits")
    st = stats_of(graphslim.run_pipeline(g, FULL + ",dce"))
    assert st["factorized"] == 3 and all(r["rank"] == r["full_rank"] for r in st["layers"])
    first = next(r for r in st["layers"] if r["kernel"] == "conv2d/kernel")  # 1 input channel, 16 outputs
    assert first["full_rank"] == (1, 9) and "clipped to (1, 9)" in first["note"]
    node = g.node("vgg_digits_1/conv2d_1_2/convolution")  # keeps its name, is the last 1×1 factor now
    core = g.node("vgg_digits_1/conv2d_1_2/convolution_tucker_core")
    assert g.input(node, 0) == core.output(0) and g.shape(g.input(node, 1)) == (1, 1, 16, 16)
    assert g.input_node(core, 0).name == "vgg_digits_1/conv2d_1_2/convolution_tucker_in"
    for name in ("conv2d", "conv2d_1", "conv2d_2"):
        assert f"{name}/kernel" not in g.weights and f"{name}/bias" in g.weights
        assert all(g.weights[f"{name}/kernel_{s}"].trainable for s in ("in", "core", "out"))
    path = graphslim.save(g, tmp_path / "tucker")
    assert_outputs_close(run_saved_model(path, inputs), expected)
    assert_outputs_close(run(graphslim.load(path), inputs), expected)


GEOMETRIES = {
    "same": dict(),
    "valid_stride2": dict(padding="VALID", strides=(2, 2)),
    "dilation2": dict(dilations=(2, 2)),
    "explicit_unequal_strides": dict(padding="EXPLICIT", explicit=(1, 2, 0, 1), strides=(1, 2)),
    "kernel_5x3_no_bias": dict(k=(5, 3), bias=False),
}


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_full_rank_exact_for_each_geometry(case):
    spec = GEOMETRIES[case]
    g = conv_graph(**spec)
    attrs = dict(g.node("net/layer/Conv2D").attrs)
    x = np.random.default_rng(1).normal(size=(2, 9, 10, 6)).astype(np.float32)
    before = run(g, {"x": x})
    rec = layer(graphslim.run_pipeline(g, FULL))
    assert rec["action"] == "factorized" and rec["rank"] == (6, 8) and rec["weight_error"] < 1e-6
    core = g.node("net/layer/Conv2D_tucker_core")  # original strides, padding, dilations
    assert {k: core.attrs[k] for k in attrs} == attrs
    assert [n.op for n in g.nodes(op="Conv2D")].count("Conv2D") == 3
    assert_outputs_close(run(g, {"x": x}), before)


def test_nchw_structure_and_math():
    """NCHW Conv2D does not run on CPU: check the emitted structure, and the factors through NHWC ops."""
    g = conv_graph(fmt="NCHW", strides=(2, 2), padding="VALID")
    w = g.weights["layer/kernel"].value
    graphslim.run_pipeline(g, "tucker{ranks=3,5}")
    k_in, k_core, k_out = (g.weights[f"layer/kernel_{s}"].value for s in ("in", "core", "out"))
    assert k_in.shape == (1, 1, 6, 3) and k_core.shape == (3, 3, 3, 5) and k_out.shape == (1, 1, 5, 8)
    core = g.node("net/layer/Conv2D_tucker_core")
    last = g.node("net/layer/Conv2D")
    assert core.attr("data_format") == last.attr("data_format") == "NCHW"
    assert core.attr("strides") == [1, 1, 2, 2] and last.attr("strides") == [1, 1, 1, 1]
    x = np.random.default_rng(2).normal(size=(2, 9, 10, 6)).astype(np.float32)
    got = tf.nn.conv2d(tf.nn.conv2d(tf.nn.conv2d(x, k_in, 1, "VALID"), k_core, 2, "VALID"), k_out, 1, "VALID")
    approx = np.einsum("ci,hwij,jn->hwcn", k_in[0, 0], k_core, k_out[0, 0])
    np.testing.assert_allclose(got.numpy(), tf.nn.conv2d(x, approx, 2, "VALID").numpy(), rtol=1e-4, atol=1e-4)
    # HOSVD: the input factor spans the leading left singular vectors of the mode-C unfolding
    u = np.linalg.svd(w.astype(np.float64).transpose(2, 0, 1, 3).reshape(6, -1), full_matrices=False)[0][:, :3]
    np.testing.assert_allclose(np.abs(u.T @ k_in[0, 0]), np.eye(3), atol=1e-5)


# ------------------------------------------------------------------------------------------ rank choice
def test_error_falls_as_ranks_grow():
    x = np.random.default_rng(3).normal(size=(2, 9, 10, 6)).astype(np.float32)
    g0 = conv_graph(cout=12, bias=False)
    ref = run(g0, {"x": x})["y"]
    weight_errs, out_errs = [], []
    for ranks in ((2, 3), (4, 6), (5, 9), (6, 12)):
        g = g0.copy()
        rec = layer(graphslim.run_pipeline(g, f"tucker{{ranks={ranks[0]},{ranks[1]} min_macs_saving=none}}"))
        assert rec["rank"] == ranks and rec["action"] == "factorized"
        weight_errs.append(rec["weight_error"])
        out_errs.append(rel_err(run(g, {"x": x})["y"], ref))
    assert all(a > b for a, b in zip(weight_errs, weight_errs[1:])), weight_errs
    assert all(a > b for a, b in zip(out_errs, out_errs[1:])), out_errs
    assert weight_errs[-1] < 1e-6 and out_errs[-1] < 1e-5


def test_model_output_error_falls_as_rank_grows():
    x = digits()["x_test"][:200]
    g0 = graphslim.load(fixture_path("vgg_digits"))
    ref = run(g0, {"image": x})["output_0"]
    errs, macs = [], []
    for r in (2, 6, 12):
        g = g0.copy()
        st = stats_of(graphslim.run_pipeline(g, f"tucker{{rank={r} min_macs_saving=none}}"))
        errs.append(rel_err(run(g, {"image": x})["output_0"], ref))
        macs.append(st["macs_after"])
    assert errs[0] > errs[1] > errs[2], errs
    assert macs[0] < macs[1] < macs[2]


def test_energy_gives_per_mode_ranks():
    g = graphslim.load(fixture_path("resnet_digits"))
    kernels = {n.name: g.weight_of(n, 1).value.astype(np.float64) for n in g.nodes(op="Conv2D")}
    st = stats_of(graphslim.run_pipeline(g, "tucker{energy=0.8 min_macs_saving=none}"))
    done = [r for r in st["layers"] if r["action"] == "factorized"]
    assert len(done) == 5
    for rec in done:
        w = kernels[rec["layer"]]
        kh, kw, c, n = w.shape
        for mode, (unfold, r) in enumerate(((w.transpose(2, 0, 1, 3).reshape(c, -1), rec["rank"][0]),
                                            (w.transpose(3, 0, 1, 2).reshape(n, -1), rec["rank"][1]))):
            kept = kept_energy(np.linalg.svd(unfold, compute_uv=False))
            assert kept[r] >= 0.8 - 1e-9 and (r == 1 or kept[r - 1] < 0.8), (rec, mode)
            assert rec["mode_energy"][mode] == pytest.approx(kept[r], rel=1e-5)
        assert rec["energy_kept"] == pytest.approx(min(rec["mode_energy"]), rel=1e-5)


def test_max_error_bounds_the_weight_error():
    g = graphslim.load(fixture_path("resnet_digits"))
    kernels = {n.name: g.weight_of(n, 1).value.astype(np.float64) for n in g.nodes(op="Conv2D")}
    st = stats_of(graphslim.run_pipeline(g, "tucker{max_error=0.5 min_macs_saving=none}"))
    done = [r for r in st["layers"] if r["action"] == "factorized"]
    assert len(done) == 5
    for rec in done:
        assert rec["weight_error"] <= 0.5 + 1e-6
        assert rec["energy_kept"] == pytest.approx(1 - rec["weight_error"] ** 2, abs=1e-5)
        assert rec["rank"] < rec["full_rank"]  # tuples: at least the input rank is below full
    # the weight error is the real one: recompose the factors
    w = kernels["resnet_digits_1/conv2d_5_1/convolution"]
    a, core, b = (g.weights[f"conv2d_5/kernel_{s}"].value.astype(np.float64) for s in ("in", "core", "out"))
    approx = np.einsum("ci,hwij,jn->hwcn", a[0, 0], core, b[0, 0])
    rec = next(r for r in done if r["kernel"] == "conv2d_5/kernel")
    assert rel_err(approx, w) == pytest.approx(rec["weight_error"], rel=1e-4)


def test_large_conv_takes_the_streamed_randomized_hosvd_and_full_rank_stays_exact():
    """A 3×3×768×768 conv (5.3M weights, over the streamed policy's 4M) of Tucker ranks (32, 32) plus
    noise: ranks=32,32 is sketched (randomized) and its error is within 1% of the exact HOSVD's; full rank goes through the exact Gram path and reproduces the layer's output."""
    from graphslim.analysis.tucker import hosvd
    rng = np.random.default_rng(0)
    c, r = 768, 32
    a = np.linalg.qr(rng.standard_normal((c, r)))[0]
    b = np.linalg.qr(rng.standard_normal((c, r)))[0]
    core = rng.standard_normal((3, 3, r, r)) * np.exp(-np.arange(r) / 8)[:, None]
    w = np.einsum("ci,hwij,nj->hwcn", a, core, b, optimize=True)
    w = (w + 0.02 * np.linalg.norm(w) / np.sqrt(w.size) * rng.standard_normal(w.shape)).astype(np.float32)
    best = float(np.sqrt(1 - hosvd(w.astype(np.float64)).kept_grid()[r, r]))
    x = rng.normal(size=(1, 5, 5, 768)).astype(np.float32)

    def build():
        g = conv_graph(cin=768, cout=768, hw=(5, 5))
        g.set_weight("layer/kernel", w)
        g.infer_shapes()
        return g

    g0 = build()
    before = run(g0, {"x": x})
    g = build()
    rec = layer(graphslim.run_pipeline(g, "tucker{ranks=32,32}"))
    assert rec["action"] == "factorized" and rec["svd"] == "randomized (ranks 32, 32)" and rec["rank"] == (32, 32)
    assert best <= rec["weight_error"] <= 1.01 * best + 1e-6
    assert all(g.weights[f"layer/kernel_{s}"].value.dtype == np.float32 for s in ("in", "core", "out"))
    g = build()
    rec = layer(graphslim.run_pipeline(g, FULL))
    assert rec["svd"] == "exact (Gram)" and rec["rank"] == (768, 768) and rec["weight_error"] < 1e-5
    assert_outputs_close(run(g, {"x": x}), before)


# ------------------------------------------------------------------------------------------ MACs
def test_macs_fall_as_reported():
    g = graphslim.load(fixture_path("resnet_digits"))
    st = stats_of(graphslim.run_pipeline(g, "tucker{ranks=4,8}"))
    assert st["macs_after"] == g.cost().macs < st["macs_before"]
    saved = sum(r["macs_before"] - r["macs_after"] for r in st["layers"] if r["action"] == "factorized")
    assert st["macs_before"] - st["macs_after"] == saved
    rec = next(r for r in st["layers"] if r["kernel"] == "conv2d_5/kernel")  # 3×3, 32→32 at 4×4
    assert rec["rank"] == (4, 8) and rec["macs_before"] == 16 * 9 * 32 * 32
    assert rec["macs_after"] == 16 * (32 * 4 + 9 * 4 * 8 + 8 * 32)


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_macs_budget_is_met(target):
    g = graphslim.load(fixture_path("resnet_digits"))
    st = stats_of(graphslim.run_pipeline(g, f"tucker{{macs={target}}}"))
    assert st["factorized"] >= 1 and st["macs_after"] == g.cost().macs
    assert st["macs_after"] <= target * st["macs_before"] + 1
    assert st["macs_planned"] == pytest.approx(st["macs_after"] / st["macs_before"], abs=1e-3)
    reasons = {r["reason"] for r in st["layers"] if r["action"] == "skipped"}
    assert reasons <= {"kernel 1×1 (one channel rank is enough: use lowrank)", f"kept whole by the macs={target} budget"}


# ------------------------------------------------------------------------------------------ data-aware
@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, image=digits()["x_train"][:256])
    return path


def test_calibrated_beats_weights_and_refit_lowers_output_error(calib_file):
    d = digits()
    x, y = d["x_test"][:300], d["y_test"][:300]
    g0 = graphslim.load(fixture_path("vgg_digits"))
    ref = run(g0, {"image": x})["output_0"]
    errs, recs, acc = {}, {}, {}
    for mode in ("weights", "calib"):
        g = g0.copy()
        text = "tucker{rank=4" + (f' calib="{calib_file}"' if mode == "calib" else "") + "}"
        st = stats_of(graphslim.run_pipeline(g, text))
        recs[mode] = {r["kernel"]: r for r in st["layers"]}
        out = run(g, {"image": x})["output_0"]
        errs[mode] = rel_err(out, ref)
        acc[mode] = float((out.argmax(1) == y).mean())
        assert st["calibrated"] == (mode == "calib")
    assert errs["calib"] < 0.8 * errs["weights"] and acc["calib"] > acc["weights"], (errs, acc)
    assert all("output_error" not in r for r in recs["weights"].values())
    for name in ("conv2d_1/kernel", "conv2d_2/kernel"):  # 16 → 16 and 16 → 32 at ranks (4, 4)
        rec = recs["calib"][name]
        assert rec["calibrated"] and rec["rank"] == (4, 4)
        assert rec["output_error"] < rec["output_error_before_refit"] < 1
        assert rec["weight_error"] > 0 and rec["weight_error_before_refit"] > 0


def test_calibrated_full_rank_stays_exact(calib_file):
    g = graphslim.load(fixture_path("vgg_digits"))
    inputs, expected = fixture_io("vgg_digits")
    st = stats_of(graphslim.run_pipeline(g, FULL[:-1] + f' calib="{calib_file}"}}'))
    assert st["factorized"] == 3 and all(r["output_error"] < 1e-5 for r in st["layers"])
    assert_outputs_close(run(g, inputs), expected)


def test_calibrated_macs_budget_is_met(calib_file):
    """With calib= the spectra change as upstream layers are rewritten; the budget's pairs are kept."""
    g = graphslim.load(fixture_path("vgg_digits"))
    st = stats_of(graphslim.run_pipeline(g, f'tucker{{macs=0.4 calib="{calib_file}"}}'))
    assert st["factorized"] >= 1 and st["macs_after"] == g.cost().macs
    assert st["macs_after"] <= 0.4 * st["macs_before"] + 1
    assert st["macs_planned"] == pytest.approx(st["macs_after"] / st["macs_before"], abs=1e-3)


# ------------------------------------------------------------------------------------------ options, reports
def test_pipeline_text_round_trips():
    from graphslim.pipeline import parse_pipeline

    for text in ("tucker{ranks=8,16}", "tucker{energy=0.8 layers=conv2d_1,conv2d_2}", "tucker{macs=0.5},dce"):
        assert str(parse_pipeline(text)) == text


@pytest.mark.parametrize("text,message", [
    ("tucker{ranks=8}", "ranks must be two positive integers r1,r2 (input-mode and output-mode ranks), "
                        "e.g. ranks=8,16; got 8"),
    ("tucker{ranks=0,4}", "ranks must be two positive integers r1,r2"),
    ("tucker{ranks=4,8,16}", "ranks must be two positive integers r1,r2"),
    ("tucker{ranks=8,16 energy=0.9}", "give at most one of ranks=, rank=, energy=, max_error=, macs= "
                                      "(got ranks= and energy=)"),
    ("tucker{rank=4 ranks=4,4}", "(got ranks= and rank=)"),
    ("tucker{rank=4 macs=0.5}", "(got rank= and macs=)"),
    ("tucker{rank=0}", "rank must be >= 1, got 0"),
    ("tucker{energy=1.5}", "energy must be in (0, 1], got 1.5"),
])
def test_bad_options_are_explained(text, message):
    with pytest.raises(OptionError) as info:
        graphslim.PassManager(text)
    assert message in str(info.value)


def test_misfit_layers_are_reported_with_reasons():
    g = graphslim.load(fixture_path("resnet_digits"))
    st = stats_of(graphslim.run_pipeline(g, "tucker{rank=4 exclude=conv2d_5}"))
    by_kernel = {r["kernel"]: r for r in st["layers"]}
    assert by_kernel["conv2d_3/kernel"]["reason"] == "kernel 1×1 (one channel rank is enough: use lowrank)"
    assert by_kernel["conv2d_5/kernel"]["reason"] == "excluded (exclude=conv2d_5)"
    assert "conv2d_3/kernel" in g.weights and "conv2d_5/kernel" in g.weights
    g = graphslim.load(fixture_path("mobilenet_tiny"))
    recs = stats_of(graphslim.run_pipeline(g, "tucker{rank=2}"))["layers"]
    dw = [r for r in recs if r["op"] == "DepthwiseConv2dNative"]
    assert dw and all(r["reason"] == "depthwise conv (no channel mixing to factorize)" for r in dw)


def test_ranks_not_saving_macs_and_grouped_convs_are_reported():
    g = conv_graph()
    rec = layer(graphslim.run_pipeline(g, "tucker{ranks=6,7}"))
    assert rec["action"] == "skipped" and rec["reason"].startswith("rank (6, 7) does not save MACs")
    assert not g.has_node("net/layer/Conv2D_tucker_in")
    g.set_weight("layer/kernel", g.weights["layer/kernel"].value[:, :, :3])  # 2 groups of 3 channels
    g.infer_shapes()
    assert layer(graphslim.run_pipeline(g, "tucker{rank=1}"))["reason"].startswith("grouped conv")


def test_latency_cost_reports_times():
    g = conv_graph(cin=32, cout=32, hw=(16, 16), seed=5)
    rec = layer(graphslim.run_pipeline(g, "tucker{rank=4 cost=latency latency_runs=3}"))
    assert rec["ms_before"] > 0 and rec["ms_after"] > 0
    if rec["action"] == "factorized":
        assert rec["ms_after"] < rec["ms_before"]
    else:
        assert rec["reason"].startswith("slower when timed on tf")
