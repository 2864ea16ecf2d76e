"""Transformer channel groups (Einsum and BatchMatMul rules, graphslim/analysis/channel_rules.py): keras-hub's
BertTextClassifier and ViTImageClassifier built from constructor arguments (random weights), exported and
loaded. Their groups (heads, head sizes, feed-forward widths, the hidden size), the numeric proof (removing
channels made all-zero leaves the outputs unchanged, through save and load), ``prune{ratio=0.3}`` and the
hidden size kept out of it unless ``hidden=true``, and an Einsum equation the rule does not follow.
"""

import numpy as np
import pytest
import tensorflow as tf

import graphslim
from graphslim.analysis.channels import apply_keeps, channel_groups, group_for, hidden_size
from graphslim.ir.graph import Graph, SignatureArg, Tensor
from graphslim.pipeline import PassManager
from graphslim.runtime import run
from graphslim.testing import keras_attention_graph, keras_hub_bert, keras_hub_vit, zero_produced_channels

keras_hub = pytest.importorskip("keras_hub")
keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    g = keras_hub_bert(tmp_path_factory.mktemp("bert") / "model")
    rng = np.random.RandomState(0)
    mask = np.ones((2, 16), "int32")
    mask[1, 11:] = 0
    inputs = {"token_ids": rng.randint(0, 500, (2, 16)).astype("int32"),
              "segment_ids": rng.randint(0, 2, (2, 16)).astype("int32"), "padding_mask": mask}
    return g, inputs


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    g = keras_hub_vit(tmp_path_factory.mktemp("vit") / "model")
    return g, {"images": np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")}


MODELS = ["bert", "vit"]


@pytest.fixture(params=MODELS)
def model(request):
    g, inputs = request.getfixturevalue(request.param)
    return request.param, g.copy(), inputs


def _by_sources(groups):
    return {tuple(sorted(m.name.rsplit("/", 2)[-2] for m in grp.sources)): grp for grp in groups}


# ------------------------------------------------------------------------------------------ the groups
def test_bert_groups_heads_head_sizes_ffn_and_hidden(bert):
    g, _ = bert
    groups = channel_groups(g)
    assert all(grp.prunable for grp in groups if grp.sources[0].name != "logits/kernel"), \
        [(grp.name, grp.why_not()) for grp in groups if not grp.prunable]
    heads = [grp for grp in groups if grp.size == 2 and len(grp.sources) == 3]
    assert len(heads) == 2  # one per layer: query, key and value kernels' heads axis
    for grp in heads:
        assert {(m.name.split("/")[-2], m.axis) for m in grp.sources} == {("query", 1), ("key", 1), ("value", 1)}
        assert [(m.name.split("/")[-2], m.axis) for m in grp.sinks] == [("attention_output", 0)]
        assert not hidden_size(g, grp)
    qk = [grp for grp in groups if {m.name.split("/")[-2] for m in grp.sources} == {"query", "key"}]
    v = [grp for grp in groups if {m.name.split("/")[-2] for m in grp.sources} == {"value"}]
    assert len(qk) == len(v) == 2 and all(grp.size == 64 for grp in qk + v)
    assert all({m.axis for m in grp.sources} == {2} for grp in qk + v)
    assert all([(m.name.split("/")[-2], m.axis) for m in grp.sinks] == [("attention_output", 1)] for grp in v)
    ffn = [grp for grp in groups if grp.size == 512]
    assert len(ffn) == 2 and all(not hidden_size(g, grp) for grp in ffn)
    hidden = [grp for grp in groups if hidden_size(g, grp)]
    assert len(hidden) == 1 and hidden[0].size == 128 and len(hidden[0].normalized_by) == 10
    names = {m.name for m in hidden[0].members_of("weight")}
    assert {"token_embedding/embeddings", "position_embedding/embeddings", "segment_embedding/embeddings",
            "pooled_dense/kernel"} <= names


def test_vit_groups_through_reshaped_kernels(vit):
    """Keras's MultiHeadAttention reads its [in, heads, head_dim] kernels reshaped to matrices
    (BatchMatMulV2); the scores and context are Einsums (BTNH,BSNH->BNTS, BNTS,BSNH->BTNH)."""
    g, _ = vit
    groups = channel_groups(g)
    assert [grp.why_not() for grp in groups if not grp.prunable] == ["output 'output_0' axis 1"]
    heads = [grp for grp in groups if grp.size == 3]
    assert len(heads) == 2
    for grp in heads:
        assert {(m.name.split("/")[-2], m.axis) for m in grp.sources} == {("query", 1), ("key", 1), ("value", 1)}
        assert [(m.name.split("/")[-2], m.axis) for m in grp.sinks] == [("attention_output", 0)]
    hidden = [grp for grp in groups if hidden_size(g, grp)]
    assert len(hidden) == 1 and hidden[0].size == 192
    names = {m.name for m in hidden[0].members_of("weight")}
    assert {"vit_patching_and_embedding/class_token", "vit_patching_and_embedding/position_embedding/embeddings",
            "predictions/kernel"} <= names


# ------------------------------------------------------------------------------------------ exactness
def _rel(got, ref):
    return max(float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref)


@pytest.mark.parametrize("kind", ["heads", "ffn", "hidden"])
def test_removing_zeroed_channels_is_exact_through_save_and_load(model, kind, tmp_path):
    name, g, inputs = model
    groups = [grp for grp in channel_groups(g) if grp.prunable]
    pick = {"heads": lambda grp: len(grp.sources) == 3 and grp.size <= 3,
            "ffn": lambda grp: grp.size in (512, 768),
            "hidden": lambda grp: hidden_size(g, grp)}[kind]
    chosen = [grp for grp in groups if pick(grp)]
    assert chosen
    changes = []
    for grp in chosen:
        removed = [0] if grp.size <= 3 else list(range(1, grp.size, 3))
        zero_produced_channels(g, grp, removed)
        changes.append((grp, [c for c in range(grp.size) if c not in removed]))
    ref = run(g, inputs)
    params = g.cost().params
    apply_keeps(g, changes)
    assert g.cost().params < params
    graphslim.save(g, tmp_path / "out")
    again = graphslim.load(tmp_path / "out")
    got = run(again, inputs)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    assert _rel(got, ref) < 1e-5, (name, kind, _rel(got, ref))


# ------------------------------------------------------------------------------------------ prune
def test_prune_ratio_cuts_a_quarter_of_the_parameters_hidden_size_opt_in(model, tmp_path):
    name, g, inputs = model
    h = [grp for grp in channel_groups(g) if hidden_size(g, grp)][0]
    hidden_kernel = h.sources[0].name
    st = PassManager("prune{ratio=0.3}").run(g).passes[-1]["stats"]
    assert st["params"]["ratio"] <= 0.75, st["params"]
    assert [e["by"] for e in st["excluded"]] == [["hidden=false"]]
    assert g.weight(hidden_kernel).value.shape[h.sources[0].axis] == h.size  # the hidden size stays
    graphslim.save(g, tmp_path / "out")
    out = run(graphslim.load(tmp_path / "out"), inputs)
    assert {k: v.shape for k, v in out.items()} == {"output_0": (2, 2 if name == "bert" else 10)}
    assert all(np.isfinite(v).all() for v in out.values())


def test_prune_hidden_true_prunes_the_residual_stream(model):
    name, g, inputs = model
    before = g.cost().params
    st = PassManager("prune{ratio=0.3 hidden=true}").run(g).passes[-1]["stats"]
    assert not st["excluded"]
    dim = 128 if name == "bert" else 192
    assert [r["channels"] for r in st["groups"] if r["channels"][0] == dim and len(r["sources"]) >= 4] == \
        [[dim, dim - round(0.3 * dim)]]
    assert g.cost().params < 0.6 * before
    assert run(g, inputs)["output_0"].shape == (2, 2 if name == "bert" else 10)


def test_macs_count_einsum_and_the_target_is_met(bert):
    g = bert[0].copy()
    q = next(n for n in g.nodes(op="Einsum") if n.name.endswith("query_1/einsum/Einsum"))
    assert g.cost().by_node()[q.name].macs == 128 * 2 * 64  # per token: input × heads × head size
    st = PassManager("prune{macs=0.6}").run(g).passes[-1]["stats"]
    assert abs(st["macs"]["ratio"] - 0.6) < 0.02


# ------------------------------------------------------------------------------------------ equations
def _einsum_graph(equation, x_shape, w_shape):
    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": x_shape})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    w = g.add_weight("dense/kernel", np.random.RandomState(0).randn(*w_shape).astype("f")).output(0)
    y = g.add_node("dense/Einsum", "Einsum", inputs=[Tensor("x", 0), w],
                   attrs={"T": tf.float32, "N": 2, "equation": equation}).output(0)
    w2 = g.add_weight("out/kernel", np.random.RandomState(1).randn(w_shape[-1], 3).astype("f")).output(0)
    z = g.add_node("out/MatMul", "MatMul", inputs=[y, w2], attrs={"T": tf.float32}).output(0)
    g.outputs.append(SignatureArg("y", z))
    g.infer_shapes()
    return g


def test_an_unsupported_einsum_equation_blocks_its_group_naming_it():
    g = _einsum_graph("ab...,bc->ac", (None, 4), (4, 5))
    grp = group_for(g, "dense/kernel", 1)
    assert not grp.prunable
    assert "Einsum equation 'ab...,bc->ac' (ellipsis) is not supported" in grp.why_not()


def test_a_plain_einsum_dense_is_a_matmul():
    g = _einsum_graph("ab,bc->ac", (None, 4), (4, 5))
    (grp,) = [grp for grp in channel_groups(g) if grp.sources and grp.sources[0].name == "dense/kernel"]
    assert grp.prunable and grp.size == 5 and [(m.name, m.axis) for m in grp.sinks] == [("out/kernel", 0)]
    x = {"x": np.random.RandomState(2).randn(3, 4).astype("f")}
    zero_produced_channels(g, grp, [1, 3])
    ref = run(g, x)
    apply_keeps(g, [(grp, [0, 2, 4])])
    assert _rel(run(g, x), ref) < 1e-6
    assert g.cost().by_node()["dense/Einsum"].macs == 4 * 3


def test_keras_attention_einsums_couple_heads_and_head_sizes():
    """Keras 3's MultiHeadAttention equations: projections ``abc,cde->abde``, scores ``aecd,abcd->acbe``,
    context ``acbe,aecd->abcd``, output ``abcd,cde->abe``. Heads: q, k, v kernels' axis 1 and the output
    kernel's axis 0; head size: q and k (contracted in the scores), v and the output kernel's axis 1."""
    rng = np.random.RandomState(1)
    g = keras_attention_graph(seed=0)
    groups = {tuple(sorted((m.name, m.axis) for m in grp.sources)): grp for grp in channel_groups(g)}
    heads = groups[(("k/kernel", 1), ("q/kernel", 1), ("v/kernel", 1))]
    assert heads.prunable and [(m.name, m.axis) for m in heads.sinks] == [("o/kernel", 0)]
    qk = groups[(("k/kernel", 2), ("q/kernel", 2))]
    vo = groups[(("v/kernel", 2),)]
    assert qk.prunable and not qk.sinks and [(m.name, m.axis) for m in vo.sinks] == [("o/kernel", 1)]
    inputs = {"x": rng.randn(2, 5, 8).astype("f")}
    for grp, removed in ((heads, [1]), (qk, [0, 3]), (vo, [2])):
        zero_produced_channels(g, grp, removed)
    ref = run(g, inputs)
    apply_keeps(g, [(heads, [0, 2]), (qk, [1, 2]), (vo, [0, 1, 3])])
    assert g.weight("q/kernel").value.shape == (8, 2, 2) and g.weight("o/kernel").value.shape == (2, 3, 8)
    assert _rel(run(g, inputs), ref) < 1e-5
