"""lowrank: dense layers (transpose_a/b), 1×1 and (spatial=true) K×K convs through rank r; exact at full
rank on fixtures, inline graphs and an emitted SavedModel; error falls with rank; energy= keeps its
promise; K×K convs reported unless spatial=true; data-aware refit; fine-tunable output."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.analysis.factorize import kept_energy
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.runtime import run
from graphslim.testing import assert_close, fixture_io, fixture_path, run_saved_model
from graphslim.testing import pass_stats as stats_of

TOL = dict(rtol=1e-4, atol=1e-4)
FULL = "lowrank{rank=100000 min_macs_saving=none spatial=true}"
FIXTURES = ["vgg_digits", "resnet_digits", "fcn_tiny", "ssd_tiny", "inception_tiny", "mobilenet_tiny",
            "multi_io", "legacy_slots", "frozen_vgg", "tf_module", "tf1_model"]


def dense_graph(*, n_in=12, n_out=9, transpose_a=False, transpose_b=False, bias=True, seed=0) -> Graph:
    """x → MatMul(dense/kernel) [→ BiasAdd(dense/bias)] → "y"."""
    rng = np.random.default_rng(seed)
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (n_in, None) if transpose_a else (None, n_in)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    k = g.add_weight("dense/kernel", w.T.copy() if transpose_b else w)
    y = g.add_node("model/dense/MatMul", "MatMul", ["x", k],
                   attrs={"T": tf.float32, "transpose_a": transpose_a, "transpose_b": transpose_b})
    if bias:
        b = g.add_weight("dense/bias", rng.normal(size=(n_out,)).astype(np.float32))
        y = g.add_node("model/dense/BiasAdd", "BiasAdd", [y, b], attrs={"T": tf.float32})
    g.outputs.append(SignatureArg("y", y.output(0)))
    g.infer_shapes()
    return g


def conv1x1_graph(*, cin=10, cout=7, strides=(1, 1), padding="VALID", fmt="NHWC", k=(1, 1), seed=0) -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32,
                                          "shape": (None, 6, 7, cin) if fmt == "NHWC" else (None, cin, 6, 7)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    kern = g.add_weight("proj/kernel", rng.normal(size=(*k, cin, cout)).astype(np.float32))
    s = [1, *strides, 1] if fmt == "NHWC" else [1, 1, *strides]
    y = g.add_node("model/proj/Conv2D", "Conv2D", ["x", kern],
                   attrs={"T": tf.float32, "strides": s, "padding": padding, "data_format": fmt})
    g.outputs.append(SignatureArg("y", y.output(0)))
    g.infer_shapes()
    return g


@pytest.mark.parametrize("name", FIXTURES)
def test_full_rank_is_exact_on_fixtures(name):
    g = graphslim.load(fixture_path(name))
    inputs, expected = fixture_io(name)
    n = len(g.nodes(op=("MatMul", "Conv2D")))
    st = stats_of(graphslim.run_pipeline(g, FULL))
    assert len(st["layers"]) == n and st["factorized"] == n
    assert all(r["rank"] == r["full_rank"] for r in st["layers"])
    assert sorted(o.name for o in g.outputs) == sorted(expected)
    assert_close(run(g, inputs), expected, **TOL)


def test_emitted_model_exact_named_and_fine_tunable(tmp_path):
    g = graphslim.load(fixture_path("tf_module"))
    graphslim.run_pipeline(g, "lowrank{rank=100 min_macs_saving=none},dce")
    assert {"dense_a/kernel_u", "dense_a/kernel_v", "dense_b/kernel_u", "dense_b/kernel_v"} <= set(g.weights)
    assert "dense_a/kernel" not in g.weights and not g.weights["norm/scale"].trainable
    path = graphslim.save(g, tmp_path / "lr")
    inputs, expected = fixture_io("tf_module")
    assert_close(run_saved_model(path, inputs), expected, **TOL)
    loaded = tf.saved_model.load(str(path))
    x = tf.constant(inputs["x"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(loaded.serve(x)["logits"]))
    grads = tape.gradient(loss, loaded.trainable_variables)
    changed = set()
    for v, grad in zip(loaded.trainable_variables, grads):
        before = v.numpy().copy()
        v.assign_sub(0.1 * grad)
        if np.abs(v.numpy() - before).max() > 0:
            changed.add(v.name[:-2])
    assert {"dense_a/kernel_u", "dense_a/kernel_v", "dense_b/kernel_u", "dense_b/kernel_v"} <= changed


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_dense_transposes_full_rank_exact(ta, tb):
    g = dense_graph(transpose_a=ta, transpose_b=tb)
    x = np.random.default_rng(1).normal(size=(12, 5) if ta else (5, 12)).astype(np.float32)
    before = run(g, {"x": x})
    st = stats_of(graphslim.run_pipeline(g, "lowrank{rank=9 min_macs_saving=none}"))
    assert st["layers"][0]["rank"] == 9
    first = g.node("model/dense/MatMul_u")
    second = g.node("model/dense/MatMul")  # keeps its name, computes the second factor
    assert g.input(second, 0) == first.output(0)
    assert first.attr("transpose_a") == ta and not second.attr("transpose_a")
    assert first.attr("transpose_b") == tb and second.attr("transpose_b") == tb
    u, v = g.weights["dense/kernel_u"].value, g.weights["dense/kernel_v"].value
    assert u.shape == ((9, 12) if tb else (12, 9)) and v.shape == ((9, 9))
    assert_close(run(g, {"x": x}), before, **TOL)


@pytest.mark.parametrize("spec", [dict(), dict(strides=(2, 2)), dict(strides=(2, 1), padding="SAME"),
                                  dict(k=(3, 3), padding="SAME"), dict(k=(3, 3), strides=(2, 2))])
def test_conv_full_rank_exact(spec):
    g = conv1x1_graph(**spec)
    x = np.random.default_rng(2).normal(size=(2, 6, 7, 10)).astype(np.float32)
    before = run(g, {"x": x})
    st = stats_of(graphslim.run_pipeline(g, FULL))
    assert st["factorized"] == 1
    second = g.node("model/proj/Conv2D")
    assert second.attr("strides") == [1, 1, 1, 1] and g.shape(g.input(second, 1)) == (1, 1, 7, 7)
    assert_close(run(g, {"x": x}), before, **TOL)


def test_nchw_conv_structure_and_math():
    g = conv1x1_graph(fmt="NCHW", strides=(2, 2))
    w = g.weights["proj/kernel"].value
    graphslim.run_pipeline(g, "lowrank{rank=3}")
    first = g.node("model/proj/Conv2D_u")
    second = g.node("model/proj/Conv2D")
    assert first.attr("data_format") == second.attr("data_format") == "NCHW"
    assert first.attr("strides") == [1, 1, 2, 2] and second.attr("strides") == [1, 1, 1, 1]
    u, v = g.weights["proj/kernel_u"].value, g.weights["proj/kernel_v"].value
    w2 = w.reshape(10, 7).astype(np.float64)
    uu, s, vt = np.linalg.svd(w2, full_matrices=False)
    np.testing.assert_allclose(u[0, 0] @ v[0, 0], (uu[:, :3] * s[:3]) @ vt[:3], atol=1e-5)


def test_spatial_conv_reported_unless_enabled():
    g = graphslim.load(fixture_path("resnet_digits"))
    st = stats_of(graphslim.run_pipeline(g, "lowrank{rank=4}"))
    recs = {r["kernel"]: r for r in st["layers"]}
    assert recs["conv2d_1/kernel"]["reason"] == "kernel 3×3 is spatial (use separable, or lowrank{spatial=true})"
    assert recs["conv2d_3/kernel"]["action"] == "factorized"  # the 1×1 projection shortcut
    assert recs["dense/kernel"]["action"] == "factorized"


def test_error_falls_as_rank_grows():
    g0 = dense_graph(n_in=16, n_out=12, bias=False)
    x = np.random.default_rng(3).normal(size=(20, 16)).astype(np.float32)
    ref = run(g0, {"x": x})["y"]
    werr, oerr = [], []
    for r in range(1, 13):
        g = g0.copy()
        rec = stats_of(graphslim.run_pipeline(g, f"lowrank{{rank={r} min_macs_saving=none}}"))["layers"][0]
        werr.append(rec["weight_error"])
        oerr.append(float(np.linalg.norm(run(g, {"x": x})["y"] - ref)))
    assert all(a > b for a, b in zip(werr, werr[1:])) and werr[-1] < 1e-6
    assert all(a >= b - 1e-5 for a, b in zip(oerr, oerr[1:])) and oerr[-1] < 1e-3


@pytest.mark.parametrize("energy", [0.6, 0.9])
def test_energy_gives_the_rank_it_promises(energy):
    g = graphslim.load(fixture_path("multi_io"))
    kernels = {n.name: g.weight_of(n, 1).value for n in g.nodes(op=("MatMul", "Conv2D"))}
    st = stats_of(graphslim.run_pipeline(g, f"lowrank{{energy={energy} min_macs_saving=none spatial=true}}"))
    for rec in st["layers"]:
        w = kernels[rec["layer"]]
        kept = kept_energy(np.linalg.svd(w.reshape(-1, w.shape[-1]).astype(np.float64), compute_uv=False))
        m = rec["rank"]
        assert kept[m] >= energy - 1e-9 and (m == 1 or kept[m - 1] < energy)
        assert rec["weight_error"] == pytest.approx(np.sqrt(1 - kept[m]), rel=1e-3, abs=1e-6)


def test_rank_not_saving_macs_is_reported():
    g = dense_graph(n_in=12, n_out=9)
    rec = stats_of(graphslim.run_pipeline(g, "lowrank{rank=6}"))["layers"][0]  # 6·21 > 12·9
    assert rec["action"] == "skipped" and "does not save MACs" in rec["reason"]
    assert not g.has_node("model/dense/MatMul_u")


def test_calibrated_refit_lowers_output_error_and_corrects_bias(tmp_path):
    rng = np.random.default_rng(4)
    g0 = dense_graph(n_in=16, n_out=12)
    # correlated, non-centred inputs: the data-aware factorization should beat the weight-based one
    mix = rng.normal(size=(16, 16)) * np.geomspace(3, 0.01, 16)[:, None]
    x = (rng.normal(size=(400, 16)) @ mix + 2.0).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:300])
    ref = run(g0, {"x": x[300:]})["y"]
    errs = {}
    for mode in ("weights", "calib"):
        g = g0.copy()
        text = "lowrank{rank=3" + (f' calib="{tmp_path / "calib.npz"}"' if mode == "calib" else "") + "}"
        rec = stats_of(graphslim.run_pipeline(g, text))["layers"][0]
        errs[mode] = float(np.linalg.norm(run(g, {"x": x[300:]})["y"] - ref) / np.linalg.norm(ref))
        if mode == "calib":
            assert rec["calibrated"] and rec["output_error"] <= rec["output_error_before_refit"]
            assert "dense/bias" in g.weights
            assert not np.allclose(g.weights["dense/bias"].value, g0.weights["dense/bias"].value)
    assert errs["calib"] < 0.5 * errs["weights"], errs


def test_latency_cost_reports_times():
    g = conv1x1_graph(cin=64, cout=64)
    st = stats_of(graphslim.run_pipeline(g, "lowrank{rank=4 cost=latency latency_runs=3}"))
    rec = st["layers"][0]
    assert rec["ms_before"] > 0 and rec["ms_after"] > 0
    assert rec["action"] == "factorized" or rec["reason"].startswith("slower when timed")


def test_macs_budget_is_met():
    g = graphslim.load(fixture_path("vgg_digits"))
    st = stats_of(graphslim.run_pipeline(g, "lowrank{macs=0.6 spatial=true}"))
    assert st["macs_after"] <= 0.6 * st["macs_before"] and st["factorized"] >= 1


@pytest.fixture
def randomized_above_100(monkeypatch):
    """The streamed (randomized) SVD for every matrix of at least 100 entries."""
    from graphslim.analysis import randomized

    monkeypatch.setattr(randomized, "RANDOMIZED_MIN_ENTRIES", 100)


def test_randomized_path_only_above_the_threshold(monkeypatch):
    from graphslim.analysis import randomized

    g = dense_graph(n_in=40, n_out=30)
    st = stats_of(graphslim.run_pipeline(g, "lowrank{rank=4}"))
    assert "svd" not in st["layers"][0]  # 1200 entries: below the threshold, the exact SVD
    monkeypatch.setattr(randomized, "RANDOMIZED_MIN_ENTRIES", 1200)
    g = dense_graph(n_in=40, n_out=30)
    st = stats_of(graphslim.run_pipeline(g, "lowrank{rank=4}"))
    assert st["layers"][0]["svd"] == "randomized (rank 4)"
    assert g.weights["dense/kernel_u"].value.dtype == np.float32


@pytest.mark.parametrize("ta,tb", [(False, False), (True, True)])
def test_randomized_full_rank_reproduces_outputs(randomized_above_100, ta, tb):
    g = dense_graph(n_in=60, n_out=25, transpose_a=ta, transpose_b=tb)
    x = np.random.default_rng(1).normal(size=(60, 5) if ta else (5, 60)).astype(np.float32)
    before = run(g, {"x": x})
    st = stats_of(graphslim.run_pipeline(g, "lowrank{rank=25 min_macs_saving=none}"))
    rec = st["layers"][0]
    assert rec["svd"] == "exact (Gram)" and rec["rank"] == rec["full_rank"] == 25
    assert_close(run(g, {"x": x}), before, **TOL)


def test_randomized_energy_rank_matches_exact(monkeypatch):
    from graphslim.analysis import randomized

    rng = np.random.default_rng(3)
    a, b = np.linalg.qr(rng.normal(size=(300, 80)))[0], np.linalg.qr(rng.normal(size=(80, 80)))[0]
    w = ((a * np.exp(-np.arange(80) / 6)) @ b.T).astype(np.float32)
    ranks = {}
    for lowered in (True, False):
        g = dense_graph(n_in=300, n_out=80)
        g.set_weight("dense/kernel", w)
        monkeypatch.setattr(randomized, "RANDOMIZED_MIN_ENTRIES", 100 if lowered else 1 << 40)
        rec = stats_of(graphslim.run_pipeline(g, "lowrank{energy=0.99}"))["layers"][0]
        ranks[lowered] = (rec["rank"], rec["weight_error"], rec.get("svd"))
    assert ranks[True][2].startswith("randomized") and ranks[False][2] is None
    assert abs(ranks[True][0] - ranks[False][0]) <= 1
    assert ranks[True][1] <= 1.05 * ranks[False][1] + 1e-4 and ranks[True][1] <= 0.1


def test_large_dense_input_is_not_whitened(tmp_path, monkeypatch):
    import graphslim.passes.lowrank as lowrank_pass

    monkeypatch.setattr(lowrank_pass, "FULL_FEATURE_LIMIT", 8)
    g = dense_graph()
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(16, 12)).astype(np.float32))
    rec = stats_of(graphslim.run_pipeline(g, f"lowrank{{rank=3 calib={tmp_path / 'calib.npz'}}}"))["layers"][0]
    assert "12 features > 8" in rec["calibration_note"] and not rec.get("calibrated")
