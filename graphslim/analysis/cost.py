"""Parameter and multiply-accumulate counts per node (per example: axis 0 is the batch).

``graph_cost(graph)`` (what ``graph.cost()`` returns) gives a :class:`Cost`: per-node :class:`NodeCost`
and totals. This module imports the IR's values (:mod:`graphslim.ir.node`), not :mod:`graphslim.ir.graph`,
which imports it lazily for ``Graph.cost()``.

MAC rules live in a registry keyed by op type, like every per-op rule in graphslim (Einsum: the product of
its labels' lengths); ops without a rule cost no MACs (element-wise ops are cheap next to convolutions and matmuls and are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

from graphslim.ir import ops
from graphslim.ir.node import WEIGHT_OP, Node

if TYPE_CHECKING:  # annotations only: graph.py delegates Graph.cost() here, so this never imports it
    from graphslim.ir.graph import Graph


@dataclass
class NodeCost:
    name: str
    op: str
    params: int
    macs: int


@dataclass
class Cost:
    """Parameters and multiply-accumulates (per example, batch 1) per node and in total."""

    nodes: list
    params: int
    macs: int

    def by_node(self) -> dict:
        return {c.name: c for c in self.nodes}


#: op type → ``(graph, node) -> MACs per example``: a live view of the ``macs`` hooks in the per-op
#: facts table (:mod:`graphslim.ir.ops`).
MAC_RULES = ops.hooks("macs")


def mac_rule(*op_types: str):
    """Register a function ``(graph, node) -> MACs per example`` for the given op types (the ``macs``
    hook of their entries in :mod:`graphslim.ir.ops`)."""
    return ops.register_hook("macs", *op_types)


def _per_example(shape) -> int | None:
    if shape is None or any(d is None for d in shape[1:]):
        return None
    return prod(shape[1:]) if len(shape) > 1 else 1


def _in_shape(graph: Graph, node: Node, port: int):
    try:
        return graph.shape(graph.input(node, port))
    except (KeyError, IndexError):
        return None


@mac_rule("Conv2D", "Conv3D")
def _conv(graph: Graph, node: Node) -> int:
    out = _per_example(node.shapes[0]) if node.shapes else None
    f = _in_shape(graph, node, 1)
    if out is None or f is None or None in f:
        return 0
    return out * prod(f[:-1])  # each output element: kh*kw*cin_per_group MACs


@mac_rule("DepthwiseConv2dNative")
def _depthwise(graph: Graph, node: Node) -> int:
    out = _per_example(node.shapes[0]) if node.shapes else None
    f = _in_shape(graph, node, 1)
    if out is None or f is None or None in f:
        return 0
    return out * f[0] * f[1]


@mac_rule("Conv2DBackpropInput")
def _deconv(graph: Graph, node: Node) -> int:
    x = _per_example(_in_shape(graph, node, 2))
    f = _in_shape(graph, node, 1)
    if x is None or f is None or None in f:
        return 0
    return x * f[0] * f[1] * f[2]


def _rows_per_example(graph: Graph, node: Node) -> int:
    """Rows of a 2-D MatMul's input per example: 1, or ``H·W`` when the input is a Reshape of
    ``[N, H, W, K]`` to ``[N·H·W, K]`` (``tf.tensordot``: Keras Dense on a 4-D input), whose leading
    dim is not the batch."""
    try:
        t = graph.input(node, 0)
    except (KeyError, IndexError):
        return 1
    src = graph.producer(t)
    out = graph.shape(t)
    if src.op != "Reshape" or out is None or len(out) != 2 or out[0] is not None or out[1] is None:
        return 1
    per = _per_example(_in_shape(graph, src, 0))
    if per is None or per % out[1]:
        return 1
    return per // out[1]


@mac_rule("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
def _matmul(graph: Graph, node: Node) -> int:
    out = _per_example(node.shapes[0]) if node.shapes else None
    a = _in_shape(graph, node, 0)
    if out is None or not a:
        return 0
    adj = node.attr("transpose_a", False) or node.attr("adj_x", False)
    k = a[-2] if adj else a[-1]
    rows = _rows_per_example(graph, node) if node.op == "MatMul" and not adj else 1
    return 0 if k is None else out * k * rows


@mac_rule("Einsum")
def _einsum(graph: Graph, node: Node) -> int:
    """The product of every label's length (each output element sums over the contracted labels),
    without the batch (the output's first label); a label of unknown length (a sequence of run-time
    length) counts 1: MACs per example and position, as a Dense on tokens counts per token."""
    try:
        operands, out = ops.einsum_labels(node)
    except ValueError:
        return 0
    sizes: dict = {}
    shapes = [_in_shape(graph, node, p) for p in range(len(operands))] + [node.shapes[0] if node.shapes else None]
    for labels, shape in zip(operands + [out], shapes):
        if shape is None or len(shape) != len(labels):
            return 0
        for c, d in zip(labels, shape):
            if d is not None:
                sizes[c] = d
    return prod(sizes.get(c, 1) for c in set("".join(operands)) if not out or c != out[0])


def _weights_read(graph: Graph, node: Node) -> int:
    total = 0
    for port in range(len(graph.inputs_of(node))):
        w = graph.weight_of(node, port)
        if w is not None:
            total += int(w.value.size)
    return total


def graph_cost(graph: Graph) -> Cost:
    """Per-node params (weights each node reads) and MACs; totals count each weight once."""
    nodes = []
    for node in graph.nodes():
        if node.op == WEIGHT_OP:
            continue
        rule = MAC_RULES.get(node.op)
        macs = rule(graph, node) if rule else 0
        params = _weights_read(graph, node)
        if macs or params:
            nodes.append(NodeCost(node.name, node.op, params, macs))
    params = sum(int(w.value.size) for w in graph.weights.values())
    return Cost(nodes=nodes, params=params, macs=sum(c.macs for c in nodes))
