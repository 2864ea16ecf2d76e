"""lowrank on transformer weights (issue 18, item 4): keras-hub's BERT writes its attention projections as
Einsum with a weight operand (``abc,cde->abde``, ``abcd,cde->abe``), keras-hub's ViT (Keras's EinsumDense on
TensorFlow) as BatchMatMulV2 of a reshaped kernel. Both are exact at full rank through save and load, the
error falls as the rank grows, calibration lowers the output error, and equations a two-factor split
cannot take are per-layer skips naming the equation."""

from __future__ import annotations

import numpy as np
import pytest

import graphslim
from graphslim.runtime import run
from graphslim.testing import digits, fixture_path

from graphslim.passes.lowrank import einsum_kernel

FULL = "lowrank{rank=100000 min_macs_saving=none}"
VOCAB, SEQ = 300, 16


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """keras-hub's BertTextClassifier (2 layers, 2 heads of 32, hidden 64, FFN 128) from constructor
    arguments, random weights, exported and loaded; with a batch of random token ids."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=64,
                                             intermediate_dim=128, max_sequence_length=SEQ)
    path = tmp_path_factory.mktemp("bert") / "bert"
    keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None).export(str(path), verbose=False)
    keras.backend.clear_session()
    g = graphslim.load(path)
    rng = np.random.default_rng(0)
    values = {"token_ids": rng.integers(1, VOCAB, (6, SEQ)), "segment_ids": rng.integers(0, 2, (6, SEQ)),
              "padding_mask": np.ones((6, SEQ))}
    return g, {a.name: values[a.name].astype(g.dtype(a.tensor).as_numpy_dtype) for a in g.inputs}


@pytest.fixture(scope="module")
def vit():
    return graphslim.load(fixture_path("vit_digits")), {"images": digits()["x_test"][:64]}


def _rel(a: dict, b: dict) -> float:
    k = next(iter(a))
    return float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max())


@pytest.mark.parametrize("which,ops", [("bert", {"Einsum", "MatMul"}), ("vit", {"BatchMatMulV2", "MatMul"})])
def test_full_rank_is_exact_through_save_and_load(request, tmp_path, which, ops):
    g0, feed = request.getfixturevalue(which)
    ref = run(g0, feed)
    g = g0.copy()
    st = graphslim.run_pipeline(g, FULL).passes[-1]["stats"]
    done = [r for r in st["layers"] if r["action"] == "factorized"]
    assert {r["op"] for r in done} == ops
    # every attention projection (query, key, value, output) of both layers is factorized
    assert sum(r["op"] in ("Einsum", "BatchMatMulV2") for r in done) == 8
    assert _rel(run(g, feed), ref) < 1e-5
    out = tmp_path / which
    graphslim.save(g, out)
    assert _rel(run(graphslim.load(out), feed), ref) < 1e-5


def test_error_falls_with_rank_on_bert_einsums(bert):
    """Measured on the encoder's output (the classifier's logits of a random-weight head hardly move)."""
    g0, feed = bert
    head = next(n for n in g0.nodes(op="MatMul") if "pooled_dense" in n.name)
    encoded = str(g0.input(head, 0))
    ref = run(g0, feed, fetch=[encoded])
    errors = []
    for rank in (4, 16, 32):
        g = g0.copy()
        st = graphslim.run_pipeline(g, f"lowrank{{rank={rank} min_macs_saving=none layers=*attention*}}")
        einsums = [r for r in st.passes[-1]["stats"]["layers"] if r["op"] == "Einsum" and r["action"] == "factorized"]
        assert len(einsums) == 8
        errors.append(_rel(run(g, feed, fetch=[encoded]), ref))
    assert errors[0] > errors[1] > errors[2] > 0


def test_calibration_lowers_the_vit_output_error(vit, tmp_path):
    g0, feed = vit
    ref = run(g0, feed)
    calib = tmp_path / "calib.npz"
    np.savez(calib, images=digits()["x_train"][:256])
    errs, accs = {}, {}
    labels = digits()["y_test"][:64]
    for data in ("", f" calib={calib}"):
        g = g0.copy()
        st = graphslim.run_pipeline(g, f"lowrank{{rank=32 min_macs_saving=none{data}}}").passes[-1]["stats"]
        layers = [r for r in st["layers"] if r["action"] == "factorized"]
        if data:
            assert all(r.get("calibrated") for r in layers)
            assert all(r["output_error"] <= r["output_error_before_refit"] + 1e-9 for r in layers
                       if "output_error_before_refit" in r)
        out = run(g, feed)
        errs[bool(data)] = _rel(out, ref)
        accs[bool(data)] = float((next(iter(out.values())).argmax(1) == labels).mean())
    assert errs[True] < 0.7 * errs[False] and accs[True] >= accs[False]


def test_macs_budget_counts_every_token_of_a_dense_under_tensordot(vit):
    """Keras's Dense on [batch, tokens, features] is a MatMul of the rows reshaped to [batch·tokens,
    features]: its MACs count every token (17 here), in the budget as in ``graph.cost()`` (they were counted
    once, so macs=0.5 cut every layer to rank 1 and kept 9% of the MACs)."""
    g0, _ = vit
    g = g0.copy()
    st = graphslim.run_pipeline(g, "lowrank{macs=0.5}").passes[-1]["stats"]
    ratio = g.cost().macs / g0.cost().macs
    assert 0.4 < ratio <= 0.52 and abs(ratio - st["macs_planned"]) < 0.03, (ratio, st["macs_planned"])
    dense = [r for r in st["layers"] if r["op"] == "MatMul" and r["action"] == "factorized"]
    assert dense and all(r["macs_before"] == 17 * 64 * 128 for r in dense if "mlp" in r["layer"])


@pytest.mark.parametrize("equation,shapes,reason", [
    ("ab...,bc->ac", (2, (4, 5)), "has an ellipsis"),
    ("abb,bc->ac", (3, (4, 5)), "repeats a label within an operand"),
    ("abc,acd->abd", (3, (2, 4, 5)), "weight axis 'a' is batched with the input"),
    ("abc,cde->ab", (3, (4, 5, 6)), "weight axis 'd' is summed away"),
    ("abc,cd->abd", (2, (4, 5)), "does not match the operands' ranks"),
])
def test_einsums_a_split_cannot_take_are_named(equation, shapes, reason):
    spec, why = einsum_kernel(equation, *shapes)
    assert spec is None and reason in why and repr(equation) in why


def test_einsum_split_reads_the_weight_as_contracted_by_free():
    spec, why = einsum_kernel("btnh,nhd->btd", 4, (2, 3, 5))
    assert why is None and spec["k"] == "nh" and spec["f"] == "d" and spec["k_dims"] == [2, 3]
    spec, _ = einsum_kernel("abc,cde->abde", 3, (4, 2, 3))
    assert spec["k"] == "c" and spec["f"] == "de" and spec["f_dims"] == [2, 3] and spec["perm"] == [0, 1, 2]
