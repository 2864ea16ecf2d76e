"""IR ↔ ``GraphDef`` conversion and static shape inference.

Shape inference imports the IR, with every weight as a Placeholder of its shape, into a scratch
``tf.Graph``: TensorFlow's own C++ shape functions then give every output's dtype and static shape.
Nothing is executed. A shape conflict (e.g. a kernel sliced to 20 output channels feeding a bias of
64) surfaces as a :class:`VerificationError` naming the node.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2, function_pb2

from graphslim.errors import VerificationError
from graphslim.ir import attrs as _attrs
from graphslim.ir.node import WEIGHT_OP, Node, Tensor

if TYPE_CHECKING:  # annotations only: Graph.infer_shapes() delegates here, so this never imports graph.py
    from graphslim.ir.graph import Graph

# Attributes that describe a node's placement or cached shapes rather than its computation; they go
# stale under rewriting, so the loader drops them and shapes live in ``Node.shapes`` instead.
# ``_gradient_op_type`` names a Python custom gradient that only exists in the exporting process.
STALE_ATTRS = ("_output_shapes", "_class", "_read_only_resource_inputs", "_has_manual_control_dependencies",
               "_gradient_op_type")


def parse_input(text: str) -> tuple[str, int, bool]:
    """``"a:1"`` → ("a", 1, False); ``"^a"`` → ("a", 0, True); ``"a"`` → ("a", 0, False)."""
    if text.startswith("^"):
        return text[1:], 0, True
    name, sep, port = text.rpartition(":")
    if sep and port.isascii() and port.isdigit():
        return name, int(port), False
    return text, 0, False


#: output indices above this are refused (TensorFlow's importer crashes on one that overflows int32)
MAX_OUTPUT_INDEX = 1 << 24


def graph_from_node_defs(node_defs, graph: Graph) -> Graph:
    """Add IR nodes and edges from NodeDefs (GraphDef input-string syntax) to ``graph`` (usually a new,
    empty ``Graph()``) and return it.

    Raises VerificationError naming the node when an input refers to a node that does not exist, or
    when names repeat.
    """
    g = graph
    nd_list = list(node_defs)
    for nd in nd_list:
        if g.has_node(nd.name):
            raise VerificationError(f"two nodes are named {nd.name!r}; node names must be unique")
        attrs = {k: v for k, v in nd.attr.items() if k not in STALE_ATTRS}
        g.add_node(nd.name, nd.op, attrs=attrs, device=nd.device)
    for nd in nd_list:
        data = []
        for text in nd.input:
            src, src_port, control = parse_input(text)
            if not g.has_node(src):
                raise VerificationError(
                    f"node {nd.name!r} ({nd.op}) reads {text!r}, but no node {src!r} exists")
            if src_port >= MAX_OUTPUT_INDEX:
                raise VerificationError(
                    f"node {nd.name!r} ({nd.op}) reads {text!r}: output index {src_port} is out of range")
            if control:
                g.add_control_input(nd.name, src)
            else:
                data.append(Tensor(src, src_port))
        if data:
            g.set_inputs(nd.name, data)
    return g


def _tensor_name(t: Tensor) -> str:
    return t.node if t.port == 0 else f"{t.node}:{t.port}"


def node_to_node_def(graph: Graph, node: Node) -> node_def_pb2.NodeDef:
    nd = node_def_pb2.NodeDef(name=node.name, op=node.op, device=node.device)
    for k, v in node.attrs.items():
        nd.attr[k].CopyFrom(v)
    nd.input.extend(_tensor_name(t) for t in graph.inputs_of(node))
    nd.input.extend("^" + c for c in graph.control_inputs_of(node))
    return nd


def weight_placeholder(name: str, value) -> node_def_pb2.NodeDef:
    nd = node_def_pb2.NodeDef(name=name, op="Placeholder")
    nd.attr["dtype"].CopyFrom(_attrs.to_attr(tf.as_dtype(value.dtype)))
    nd.attr["shape"].shape.CopyFrom(_attrs.shape_to_proto(tuple(value.shape)))
    return nd


def graph_to_graph_def(graph: Graph, order=None) -> graph_pb2.GraphDef:
    """The IR as a GraphDef in topological order; each Weight becomes a Placeholder of its shape
    (the emitter maps those Placeholders onto ``tf.Variable`` reads)."""
    gd = graph_pb2.GraphDef()
    from tensorflow.python.framework import versions

    gd.versions.producer = versions.GRAPH_DEF_VERSION
    for node in order if order is not None else graph.topo_order():
        if node.op == WEIGHT_OP:
            gd.node.append(weight_placeholder(node.name, graph.weights[node.name].value))
        else:
            gd.node.append(node_to_node_def(graph, node))
    if graph.functions:
        from graphslim.ir.functions import graph_closure

        used, _ = graph_closure(graph)
        if used:
            lib = function_pb2.FunctionDefLibrary()
            lib.function.extend(used.values())
            gd.library.CopyFrom(lib)
    return gd


_NODE_IN_ERROR = re.compile(r"node ([^\s,{}()']+)")


def infer_shapes(graph: Graph) -> None:
    """Fill every node's output dtypes and static shapes using TensorFlow's shape functions."""
    order = graph.topo_order()
    gd = graph_to_graph_def(graph, order)
    tfg = tf.Graph()
    try:
        with tfg.as_default():
            tf.graph_util.import_graph_def(gd, name="")
    except (ValueError, TypeError, tf.errors.OpError) as exc:
        msg = str(exc).strip().splitlines()
        first = msg[0] if msg else repr(exc)
        m = _NODE_IN_ERROR.search(str(exc))
        where = ""
        if m and graph.has_node(m.group(1)):
            n = graph.node(m.group(1))
            ins = ", ".join(f"{t} {graph.shape(t) if graph.node(t.node).shapes else '?'}"
                            for t in graph.inputs_of(n))
            where = f" at node {n.name!r} ({n.op}; inputs: {ins})"
        raise VerificationError(f"shapes do not re-infer{where}: {first}") from None
    for node in order:
        op = tfg.get_operation_by_name(node.name)
        node.dtypes = [o.dtype for o in op.outputs]
        shapes = []
        for o in op.outputs:
            s = o.shape
            shapes.append(None if s.rank is None else tuple(s.as_list()))
        node.shapes = shapes
        if node.op == WEIGHT_OP:
            node.dtypes = [tf.as_dtype(graph.weights[node.name].value.dtype)]
