"""The per-op facts table (graphslim/ir/ops.py): every entry is consistent with TensorFlow's own op
definitions and with what the op computes, and the queries that replaced the scattered op lists see the
same entries."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

import graphslim.analysis.channels  # noqa: F401 - registers the channel hooks
import graphslim.analysis.constants  # noqa: F401 - registers the evaluation hooks
import graphslim.analysis.cost  # noqa: F401 - registers the MAC hooks
from graphslim.ir import ops
from graphslim.ir.graph import Node

ROOT = Path(__file__).resolve().parents[2]
ENTRIES = ops.all_facts()
KERNEL_ENTRIES = [e for e in ENTRIES if e.kernel_port is not None]


def _node(op: str, **attrs) -> Node:
    n = Node(name="n", op=op)
    for k, v in attrs.items():
        n.set_attr(k, v)
    return n


def _attr_variants(op: str) -> list[dict]:
    """The attribute settings that change an op's kernel axes."""
    if op == "MatMul":
        return [{}, {"transpose_b": True}]
    if op.startswith("BatchMatMul"):
        return [{}, {"adj_y": True}]
    if op == "Einsum":
        return [{"equation": "ab,bc->ac"}]
    return [{}]


def _rank(entry) -> int:
    return len(entry.kernel_layout.split()[0].lstrip("."))


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.op)
def test_every_entry_is_a_tensorflow_op_with_those_ports(entry):
    op_def = op_def_registry.get(entry.op)
    assert op_def is not None, f"facts for unknown op type {entry.op!r}"
    n_inputs = len(op_def.input_arg)
    if any(a.number_attr for a in op_def.input_arg):  # a list input (Einsum's N operands): any port
        n_inputs = 1 << 30
    for port in entry.data_ports + ((entry.kernel_port,) if entry.kernel_port is not None else ()):
        assert 0 <= port < n_inputs, f"{entry.op}: port {port} but the op has {n_inputs} inputs"
    if entry.kernel_port is not None:
        assert entry.kernel_port not in entry.data_ports
    assert set(entry.hooks) <= set(ops.HOOKS)


@pytest.mark.parametrize("entry", KERNEL_ENTRIES, ids=lambda e: e.op)
def test_kernel_axes_match_the_stated_layout(entry):
    """The layout letters say where I and O (or the depthwise channel C) sit; the axes agree, for every
    attribute setting that moves them (the parenthesised layout)."""
    rank = _rank(entry)
    layouts = re.findall(r"[.A-Z]+", entry.kernel_layout.replace("with", ""))
    for attrs, layout in zip(_attr_variants(entry.op), layouts):
        layout = layout.lstrip(".")
        i, o = ops.kernel_axes(_node(entry.op, **attrs), rank)
        if "C" in layout:
            assert i == o == layout.index("C")
        else:
            assert (i, o) == (layout.index("I") + rank - len(layout), layout.index("O") + rank - len(layout))


def test_the_seed_ops_are_kernel_ops_with_channel_and_mac_hooks():
    assert ops.seed_ops() <= ops.kernel_ops()
    for op in ops.seed_ops():
        assert ops.hook(op, "channel") and ops.hook(op, "macs"), op
    # what the scattered lists had drifted on: every BatchMatMul version seeds a group
    assert {"BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"} <= ops.seed_ops()
    assert "DepthwiseConv2dNative" not in ops.seed_ops()  # its channels are its input's


def test_refit_ops_are_linear():
    assert ops.ops_where(refit=True) <= ops.ops_where(linear=True)


def _run(op: str, x, w, attrs):
    if op == "Conv2D":
        return tf.raw_ops.Conv2D(input=x, filter=w, strides=[1, 1, 1, 1], padding="VALID").numpy()
    if op == "DepthwiseConv2dNative":
        return tf.raw_ops.DepthwiseConv2dNative(input=x, filter=w, strides=[1, 1, 1, 1], padding="VALID").numpy()
    if op == "MatMul":
        return tf.raw_ops.MatMul(a=x, b=w, transpose_b=attrs.get("transpose_b", False)).numpy()
    raise AssertionError(f"no test harness for linear op {op}: add one here")


@pytest.mark.parametrize("op,attrs", [(op, a) for op in sorted(ops.ops_where(linear=True)) for a in _attr_variants(op)])
def test_linear_ops_kernel_matrix_columns_are_output_channels(op, attrs):
    """``linear=True`` is a claim about the computation: scaling kernel-matrix column j scales output
    channel j and nothing else (what folding a batch norm relies on); the matrix round-trips."""
    rng = np.random.default_rng(0)
    node = _node(op, **attrs)
    if op == "MatMul":
        x = rng.normal(size=(3, 5)).astype(np.float32)
        w = rng.normal(size=(4, 5) if attrs.get("transpose_b") else (5, 4)).astype(np.float32)
    else:
        x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
        w = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    m = ops.kernel_matrix(node, w)
    np.testing.assert_array_equal(ops.matrix_to_kernel(node, m, w.shape), w)
    y = _run(op, x, w, attrs)
    scale = rng.uniform(0.5, 2.0, size=m.shape[1]).astype(np.float32)
    y2 = _run(op, x, ops.matrix_to_kernel(node, m * scale, w.shape), attrs)
    assert y.shape[-1] == m.shape[1]
    np.testing.assert_allclose(y2, y * scale, rtol=1e-5, atol=1e-5 * float(np.abs(y).max()))


def test_every_hook_names_a_real_tensorflow_op():
    for kind in ops.HOOKS:
        for op in ops.hooks(kind):
            assert op_def_registry.get(op) is not None, f"{kind} hook for unknown op type {op!r}"


def test_define_op_refuses_unknown_facts_and_amends_entries():
    saved = ops.snapshot()
    try:
        with pytest.raises(TypeError, match="unknown fact or hook.*kernel_prot"):
            ops.define_op("Atan", kernel_prot=1)
        ops.define_op("Atan", evaluate=lambda node, a: np.arctan(a[0]))
        ops.define_op("Atan", broadcasting=False)
        assert ops.hook("Atan", "evaluate") is not None  # amending a fact keeps the hooks
    finally:
        ops.restore(saved)
    assert ops.facts("Atan") is None


# ------------------------------------------------------------- docs/ARCHITECTURE.md: teach a new op
def _doc_example() -> str:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Teach graphslim a new op", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _atan_model(path):
    """x → conv1 (8 filters) → Atan → conv2 → y, as a SavedModel."""
    rng = np.random.default_rng(1)

    class M(tf.Module):
        def __init__(self):
            self.k1 = tf.Variable(rng.normal(size=(3, 3, 3, 8)).astype(np.float32), name="conv1/kernel")
            self.k2 = tf.Variable(rng.normal(size=(1, 1, 8, 4)).astype(np.float32), name="conv2/kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
        def __call__(self, x):
            h = tf.math.atan(tf.nn.conv2d(x, self.k1, 1, "SAME"))
            return {"y": tf.nn.conv2d(h, self.k2, 1, "SAME")}

    m = M()
    tf.saved_model.save(m, str(path), signatures=m.__call__)


def test_the_teach_a_new_op_section_works(tmp_path):
    """The documented example, run as written: before the entry, conv1's channels are blocked at Atan;
    after it, they prune, and the pruned model computes what the original does with those channels
    zeroed."""
    import graphslim
    from graphslim.analysis.channels import channel_groups
    from graphslim.testing import assert_graph_matches, zero_produced_channels
    from graphslim.runtime import run

    _atan_model(tmp_path / "m")
    saved = ops.snapshot()
    try:
        scope = {"model_dir": str(tmp_path / "m")}
        exec(compile(_doc_example(), "ARCHITECTURE.md", "exec"), scope)
        before, after, g = scope["before"], scope["after"], scope["g"]
        assert before is False and after is True
        x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)
        ref = graphslim.load(tmp_path / "m")
        grp = channel_groups(ref)[0]
        kept = scope["keep"]
        zero_produced_channels(ref, grp, [c for c in range(grp.size) if c not in kept])
        expected = run(ref, {"x": x})
        assert g.weights["conv1/kernel"].value.shape[3] == len(kept)
        assert_graph_matches(g, {"x": x}, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected["y"]).max()))
    finally:
        ops.restore(saved)
    assert ops.hook("Atan", "channel") is None
