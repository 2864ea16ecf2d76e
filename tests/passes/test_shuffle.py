"""shuffle: a 1×1 conv becomes a grouped 1×1 conv between channel permutations. Exact at groups=1 (fixture)
and on a kernel that is block-diagonal after a random permutation (the grouping is found); error falls as
groups decrease; calib= beats weights-only; the pointwise half of separable is taken; layers the groups do
not fit are reported; the output saves, loads and runs in TFLite; cost=latency times the layers."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.errors import OptionError
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.runtime import run
from graphslim.testing import assert_close, conv_graph, digits, fixture_io, fixture_path, run_saved_model
from graphslim.testing import pass_stats as stats_of

TOL = dict(rtol=1e-4, atol=1e-4)
LAYER = "net/proj/Conv2D"


def conv1x1_graph(*, cin=16, cout=24, blocks=None, permute=True, bias=True, seed=0, hw=(5, 6), strides=(1, 1),
                  padding="VALID", fmt="NHWC") -> Graph:
    """x → Conv2D 1×1 (proj/kernel) [→ BiasAdd(proj/bias)] → Relu → "y". With ``blocks=g`` the kernel is
    block-diagonal with g blocks, its rows and columns randomly permuted when ``permute``."""
    rng = np.random.default_rng(seed)
    if blocks is None:
        w = rng.normal(size=(cin, cout))
    else:
        w = np.zeros((cin, cout))
        bi, bo = cin // blocks, cout // blocks
        for b in range(blocks):
            w[b * bi:(b + 1) * bi, b * bo:(b + 1) * bo] = rng.normal(size=(bi, bo))
        if permute:
            w = w[rng.permutation(cin)][:, rng.permutation(cout)]
    return conv_graph(k=(1, 1), cin=cin, cout=cout, hw=hw, strides=strides, padding=padding, bias=bias, fmt=fmt,
                      seed=seed + 1, name="proj", kernel=w.reshape(1, 1, cin, cout))


def by_kernel(stats):
    return {r.get("kernel"): r for r in stats["layers"]}


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def x_of(g, n=3, seed=1):
    shape = g.shape(g.inputs[0].tensor)
    return np.random.default_rng(seed).normal(size=(n, *shape[1:])).astype(np.float32)


@pytest.fixture(scope="module")
def separable_vgg():
    """vgg_digits with its 3×3 convs made separable (rank 1): pointwise kernels 16→16 and 16→32."""
    g = graphslim.load(fixture_path("vgg_digits"))
    graphslim.run_pipeline(g, "separable{rank=1 min_macs_saving=none}")
    return g


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, image=digits()["x_train"][:256])
    return path


# ------------------------------------------------------------------------------------------ exactness
def test_one_group_is_exact_on_a_fixture():
    g = graphslim.load(fixture_path("mobilenet_tiny"))
    inputs, expected = fixture_io("mobilenet_tiny")
    st = stats_of(graphslim.run_pipeline(g, "shuffle{groups=1 min_macs_saving=none}"))
    recs = by_kernel(st)
    assert recs["conv2d/kernel"]["reason"].startswith("kernel 3×3 is spatial")
    for k in ("conv2d_1/kernel", "conv2d_2/kernel"):
        assert recs[k]["action"] == "factorized" and recs[k]["groups"] == 1
        assert recs[k]["energy_kept"] == 1 and recs[k]["weight_error"] == 0
        assert recs[k]["input_shuffle"] == recs[k]["output_shuffle"] == "none"
    assert st["macs_after"] == st["macs_before"]
    assert not g.nodes(op=("GatherV2", "Split"))
    assert_close(run(g, inputs), expected, **TOL)


def test_permuted_block_diagonal_kernel_is_found_and_exact():
    g = conv1x1_graph(blocks=4)
    x = x_of(g)
    before = run(g, {"x": x})["y"]
    st = stats_of(graphslim.run_pipeline(g, "shuffle{groups=4}"))
    rec = st["layers"][0]
    assert rec["action"] == "factorized" and rec["groups"] == 4
    assert rec["energy_kept"] == pytest.approx(1.0, abs=1e-9) and rec["weight_error"] < 1e-6
    # x is the signature's input and y its output: neither permutation can be folded, each says why
    assert rec["input_shuffle"] == rec["output_shuffle"] == "gather"
    assert "input 'x' axis 3" in rec["input_shuffle_reason"] and "output 'y' axis 3" in rec["output_shuffle_reason"]
    assert rec["macs_after"] * 4 == rec["macs_before"]
    assert rel(run(g, {"x": x})["y"], before) < 1e-5
    # gather → split → 4 convs → concat → gather; the last keeps the layer's name, the BiasAdd reads it
    assert g.node(LAYER).op == "GatherV2"
    assert g.input(g.node("net/proj/BiasAdd"), 0) == g.node(LAYER).output(0)
    assert len(g.nodes(op="GatherV2")) == 2 and len(g.nodes(op="ConcatV2")) == 1
    assert len(g.nodes(op="Conv2D")) == 4 and len(g.nodes(op="Split")) == 2  # input and kernel
    assert g.weights["proj/grouped_kernel"].value.shape == (1, 1, 4, 24)
    assert "proj/kernel" not in g.weights and g.weights["proj/grouped_kernel"].trainable


def test_unpermuted_block_diagonal_emits_no_gather():
    g = conv1x1_graph(blocks=2, permute=False)
    x = x_of(g)
    before = run(g, {"x": x})["y"]
    rec = stats_of(graphslim.run_pipeline(g, "shuffle{groups=2}"))["layers"][0]
    assert rec["input_shuffle"] == rec["output_shuffle"] == "none" and "input_shuffle_reason" not in rec
    assert not g.nodes(op="GatherV2") and g.node(LAYER).op == "ConcatV2"
    assert rel(run(g, {"x": x})["y"], before) < 1e-5


@pytest.mark.parametrize("spec", [dict(strides=(2, 2)), dict(strides=(2, 1), padding="SAME")])
def test_strided_block_diagonal_exact(spec):
    g = conv1x1_graph(blocks=2, seed=5, hw=(7, 9), **spec)
    x = x_of(g)
    before = run(g, {"x": x})["y"]
    rec = stats_of(graphslim.run_pipeline(g, "shuffle{groups=2}"))["layers"][0]
    assert rec["action"] == "factorized" and rec["weight_error"] < 1e-6
    assert all(c.attr("strides") == [1, *spec["strides"], 1] for c in g.nodes(op="Conv2D"))
    assert rel(run(g, {"x": x})["y"], before) < 1e-5


def test_nchw_structure():
    """NCHW convs do not run on this CPU: the structure and shapes only (channel axis 1 throughout)."""
    g = conv1x1_graph(blocks=4, fmt="NCHW")
    graphslim.run_pipeline(g, "shuffle{groups=4}")
    for node in g.nodes(op=("GatherV2", "ConcatV2")):
        assert int(g.constant_value(g.input(node, len(g.inputs_of(node)) - 1))) == 1
    split = g.node(f"{LAYER}/groups")
    assert int(g.constant_value(g.input(split, 0))) == 1
    assert all(c.attr("data_format") == "NCHW" and g.shape(c.output(0)) == (None, 6, 5, 6)
               for c in g.nodes(op="Conv2D"))
    assert g.shape(g.node(LAYER).output(0)) == (None, 24, 5, 6)


# ------------------------------------------------------------------------------------------ accuracy
def test_error_falls_as_groups_decrease(separable_vgg):
    x = digits()["x_test"][:200]
    ref = run(separable_vgg, {"image": x})["output_0"]
    werr, oerr = {}, {}
    for groups in (8, 4, 2, 1):
        g = separable_vgg.copy()
        st = stats_of(graphslim.run_pipeline(g, f"shuffle{{groups={groups} min_macs_saving=none}}"))
        recs = by_kernel(st)
        assert recs["conv2d_1/pointwise_kernel"]["action"] == recs["conv2d_2/pointwise_kernel"]["action"] == "factorized"
        werr[groups] = recs["conv2d_1/pointwise_kernel"]["weight_error"]
        oerr[groups] = rel(run(g, {"image": x})["output_0"], ref)
    print("weight error", werr, "output error", oerr)
    assert werr[8] > werr[4] > werr[2] > werr[1] == 0
    assert oerr[8] > oerr[4] > oerr[2] > oerr[1] and oerr[1] < 1e-5


def test_calib_lowers_output_error(separable_vgg, calib_file):
    x = digits()["x_test"][:200]
    ref = run(separable_vgg, {"image": x})["output_0"]
    errs = {}
    for mode in ("weights", "calib"):
        g = separable_vgg.copy()
        text = "shuffle{groups=4" + (f' calib="{calib_file}"' if mode == "calib" else "") + "}"
        st = stats_of(graphslim.run_pipeline(g, text))
        errs[mode] = rel(run(g, {"image": x})["output_0"], ref)
        if mode == "calib":
            assert st["calibrated"]
            for k in ("conv2d_1/pointwise_kernel", "conv2d_2/pointwise_kernel"):
                rec = by_kernel(st)[k]
                assert rec["calibrated"] and rec["output_error"] <= rec["output_error_before_refit"] < 1
            assert not np.allclose(g.weights["conv2d_1/bias"].value, separable_vgg.weights["conv2d_1/bias"].value)
    print("output error at groups=4", errs)
    assert errs["calib"] < 0.7 * errs["weights"], errs


def test_pointwise_half_of_separable_is_taken():
    g = graphslim.load(fixture_path("vgg_digits"))
    report = graphslim.run_pipeline(g, "separable{rank=1 min_macs_saving=none},shuffle{groups=2},dce")
    recs = by_kernel(stats_of(report, 1))
    assert recs["conv2d_1/pointwise_kernel"]["action"] == "factorized"
    assert recs["conv2d_2/pointwise_kernel"]["action"] == "factorized"
    assert recs["conv2d/pointwise_kernel"]["reason"] == "groups=2 exceeds the 1 input channels"
    assert {"conv2d_1/pointwise_kernel_grouped", "conv2d_2/pointwise_kernel_grouped"} <= set(g.weights)
    assert "conv2d_1/pointwise_kernel" not in g.weights and "conv2d/pointwise_kernel" in g.weights
    inputs, expected = fixture_io("vgg_digits")
    out = run(g, inputs)["output_0"]
    assert out.shape == expected["output_0"].shape and np.isfinite(out).all()


# ------------------------------------------------------------------------------------------ options, reasons
def test_bad_groups_are_reported_or_refused():
    for groups, reason in ((5, "groups=5 does not divide the 16 input channels"),
                           (32, "groups=32 exceeds the 16 input channels"),
                           (16, "groups=16 does not divide the 24 output channels"),
                           (1, "groups=1 does not save MACs")):
        g = conv1x1_graph()
        rep = graphslim.run_pipeline(g, f"shuffle{{groups={groups}}}")
        rec = stats_of(rep)["layers"][0]
        assert rec["action"] == "skipped" and rec["reason"] == reason
        assert not rep.passes[0]["changed"] and g.node(LAYER).op == "Conv2D"
    rec = stats_of(graphslim.run_pipeline(conv1x1_graph(), "shuffle{groups=2 min_macs_saving=0.6}"))["layers"][0]
    assert rec["reason"] == "groups=2 saves 50.0% of MACs, not more than min_macs_saving=0.6"
    with pytest.raises(OptionError, match="groups must be >= 1, got 0"):
        graphslim.PassManager("shuffle{groups=0}")
    with pytest.raises(OptionError, match="groups"):
        graphslim.PassManager("shuffle{}")
    with pytest.raises(OptionError, match="rank"):
        graphslim.PassManager("shuffle{groups=2 rank=3}")
    with pytest.raises(graphslim.PipelineError, match="matches no candidate"):
        graphslim.run_pipeline(conv1x1_graph(), "shuffle{groups=2 layers=nothing*}")


# ------------------------------------------------------------------------------------------ folding
def block_kernel(rng, cin, cout, blocks, noise):
    """A [cin, cout] kernel block-diagonal (g = ``blocks``) up to a random permutation of both axes, plus noise."""
    w = np.zeros((cin, cout))
    bi, bo = cin // blocks, cout // blocks
    for b in range(blocks):
        w[b * bi:(b + 1) * bi, b * bo:(b + 1) * bo] = rng.normal(size=(bi, bo))
    return w[rng.permutation(cin)][:, rng.permutation(cout)] + noise * rng.normal(size=(cin, cout))


def chain_graph(*, cin=16, cout=24, blocks=4, noise=0.05, seed=0, x_input=False, head=None) -> Graph:
    """x → conv 3×3 (a: 16 filters) → BiasAdd → Relu → proj 1×1 (block-diagonal up to a permutation, plus
    noise) → BiasAdd → Relu → head 1×1 (10 outputs: groups=4 does not divide them) → "y". With
    ``x_input`` the 3×3 conv is left out: proj reads the signature input. ``head=n``: head has n outputs
    and is block-diagonal up to permutation too (a second candidate)."""
    rng = np.random.default_rng(seed)
    w = block_kernel(rng, cin, cout, blocks, noise)
    g = Graph()
    f32 = tf.float32
    g.add_node("x", "Placeholder", attrs={"dtype": f32, "shape": (None, 6, 7, cin if x_input else 3)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    conv = {"T": f32, "strides": [1, 1, 1, 1], "padding": "SAME", "data_format": "NHWC"}

    def layer(name, src, kernel, relu=True):
        k = g.add_weight(f"{name}/kernel", kernel.astype(np.float32))
        y = g.add_node(f"net/{name}/Conv2D", "Conv2D", [src, k], attrs=conv)
        b = g.add_weight(f"{name}/bias", rng.normal(size=(kernel.shape[-1],)).astype(np.float32))
        y = g.add_node(f"net/{name}/BiasAdd", "BiasAdd", [y, b], attrs={"T": f32, "data_format": "NHWC"})
        return g.add_node(f"net/{name}/Relu", "Relu", [y], attrs={"T": f32}) if relu else y

    src = "x" if x_input else layer("a", "x", rng.normal(size=(3, 3, 3, cin)))
    y = layer("proj", src, w.reshape(1, 1, cin, cout))
    hk = rng.normal(size=(cout, 10)) if head is None else block_kernel(rng, cout, head, blocks, noise)
    y = layer("head", y, hk.reshape(1, 1, cout, -1), relu=False)
    g.outputs.append(SignatureArg("y", y.output(0)))
    g.infer_shapes()
    return g


def test_folded_permutations_leave_no_gather_and_match_the_gather_form(tmp_path):
    """Both permutations fold (a's filters and bias reordered, head's input channels): no GatherV2, and
    the outputs are those of the gather form (fold=false) through save and load."""
    g, ref = chain_graph(), chain_graph()
    x = np.random.default_rng(1).normal(size=(3, 6, 7, 3)).astype(np.float32)
    a_before = g.weights["a/kernel"].value.copy()
    rec = by_kernel(stats_of(graphslim.run_pipeline(g, "shuffle{groups=4},dce")))["proj/kernel"]
    want = by_kernel(stats_of(graphslim.run_pipeline(ref, "shuffle{groups=4 fold=false},dce")))["proj/kernel"]
    assert rec["action"] == want["action"] == "factorized" and rec["weight_error"] == want["weight_error"] > 0.01
    assert rec["input_shuffle"] == rec["output_shuffle"] == "folded"
    assert want["input_shuffle"] == want["output_shuffle"] == "gather"
    assert want["input_shuffle_reason"] == want["output_shuffle_reason"] == "fold=false"
    assert not g.nodes(op="GatherV2") and len(ref.nodes(op="GatherV2")) == 2
    perm = [int(i) for i in np.argsort(np.argsort(g.weights["a/kernel"].value[0, 0, 0]))]  # a's filters moved
    assert sorted(perm) == list(range(16)) and perm != list(range(16))
    np.testing.assert_array_equal(np.sort(g.weights["a/kernel"].value, -1), np.sort(a_before, -1))
    want_y = run(ref, {"x": x})["y"]
    scale = float(np.abs(want_y).max())
    np.testing.assert_allclose(run(g, {"x": x})["y"], want_y, rtol=1e-5, atol=1e-5 * scale)
    path = graphslim.save(g, tmp_path / "folded")
    np.testing.assert_allclose(run_saved_model(path, {"x": x})["y"], want_y, rtol=1e-5, atol=1e-5 * scale)
    assert not graphslim.load(path).nodes(op="GatherV2")


def test_a_fold_into_a_later_candidate_is_exact():
    """proj's output permutation folds into head's input channels, head being grouped next: head's
    grouping is found on its reordered kernel, and with both kernels block-diagonal up to permutation the
    model stays exact. head's input is the grouped proj's Split/ConcatV2 (no channel rule across the
    Split: gather) and its output the signature's (gather)."""
    g = chain_graph(noise=0.0, head=8)
    x = np.random.default_rng(3).normal(size=(2, 6, 7, 3)).astype(np.float32)
    before = run(g, {"x": x})["y"]
    recs = by_kernel(stats_of(graphslim.run_pipeline(g, "shuffle{groups=4},dce")))
    proj, head = recs["proj/kernel"], recs["head/kernel"]
    assert proj["action"] == head["action"] == "factorized"
    assert proj["input_shuffle"] == proj["output_shuffle"] == "folded"
    assert head["input_shuffle"] == "gather" and "(Split)" in head["input_shuffle_reason"]
    assert head["output_shuffle"] == "gather" and "output 'y'" in head["output_shuffle_reason"]
    assert head["weight_error"] < 1e-6 and proj["weight_error"] < 1e-6
    assert rel(run(g, {"x": x})["y"], before) < 1e-5


def test_a_permutation_reaching_the_signature_input_keeps_its_gather():
    """proj reads the signature input: its input permutation cannot fold (the gather stays, the record says
    why); its output permutation still folds into head."""
    g, ref = chain_graph(x_input=True), chain_graph(x_input=True)
    x = np.random.default_rng(2).normal(size=(2, 6, 7, 16)).astype(np.float32)
    rec = by_kernel(stats_of(graphslim.run_pipeline(g, "shuffle{groups=4}")))["proj/kernel"]
    graphslim.run_pipeline(ref, "shuffle{groups=4 fold=false}")
    assert rec["input_shuffle"] == "gather" and rec["output_shuffle"] == "folded"
    assert rec["input_shuffle_reason"] == "its channel group cannot be reordered: input 'x' axis 3"
    assert [n.name for n in g.nodes(op="GatherV2")] == ["net/proj/Conv2D/input_shuffle"]
    want_y = run(ref, {"x": x})["y"]
    np.testing.assert_allclose(run(g, {"x": x})["y"], want_y, rtol=1e-5, atol=1e-5 * float(np.abs(want_y).max()))


# ------------------------------------------------------------------------------------------ output
def test_saves_loads_and_runs(tmp_path):
    g = conv1x1_graph(blocks=4, seed=3)
    x = x_of(g)
    before = run(g, {"x": x})
    graphslim.run_pipeline(g, "shuffle{groups=4},dce")
    path = graphslim.save(g, tmp_path / "shuffled")
    assert_close(run_saved_model(path, {"x": x}), before, **TOL)
    back = graphslim.load(path)
    assert len(back.nodes(op="GatherV2")) == 2 and len(back.nodes(op="Conv2D")) == 4
    assert_close(run(back, {"x": x}), before, **TOL)


def test_runs_in_tflite():
    if importlib.util.find_spec("ai_edge_litert") is not None:
        from ai_edge_litert.interpreter import Interpreter
    elif hasattr(tf.lite, "Interpreter"):
        Interpreter = tf.lite.Interpreter
    else:
        pytest.skip("no TFLite interpreter (neither ai_edge_litert nor tf.lite.Interpreter) is installed")
    g = conv1x1_graph(blocks=4, seed=4)
    x = x_of(g, n=1)
    before = run(g, {"x": x})
    graphslim.run_pipeline(g, "shuffle{groups=4}")
    assert g.nodes(op="GatherV2")
    runner = Interpreter(model_content=graphslim.to_tflite(g), num_threads=1).get_signature_runner("serving_default")
    got = runner(x=x)
    assert np.allclose(got["y"], before["y"], rtol=1e-4, atol=1e-4 * float(np.abs(before["y"]).max()))


def test_latency_cost_reports_times():
    g = conv1x1_graph(cin=64, cout=64, hw=(16, 16))
    rec = stats_of(graphslim.run_pipeline(g, "shuffle{groups=4 cost=latency latency_runs=3}"))["layers"][0]
    assert rec["ms_before"] > 0 and rec["ms_after"] > 0
    assert rec["action"] == "factorized" or rec["reason"].startswith("slower when timed")
