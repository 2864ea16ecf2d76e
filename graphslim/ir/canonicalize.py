"""Exact simplifications the loader applies so that passes see one shape of each pattern.

* ``Identity`` nodes (function-boundary leftovers) are bypassed, and so is ``IdentityN`` (Keras wraps
  swish and friends in one to attach a Python custom gradient, which cannot travel in a SavedModel; the
  forward math lives in ordinary ops, whose registered gradients are exact).
* ``Squeeze(Reshape(x))`` whose result has exactly ``x``'s static shape is bypassed (Keras 3 reshapes a
  conv bias to ``[1, 1, 1, C]`` and squeezes it back before ``BiasAdd``).

* Grouped ``Conv2D`` (Keras ``Conv2D(groups=G)``, e.g. ConvNeXt's depthwise convs) runs on TensorFlow's
  CPU kernels only under XLA, which the export requests on a function call that inlining removes. It
  becomes ``DepthwiseConv2dNative`` over a Reshape of the same kernel when every group is one input
  channel, else ``Split`` → one Conv2D per group → ``ConcatV2``. The kernel weight keeps its name and
  shape.

* A ``Reshape`` whose target shape is computed at run time from ``Shape`` (``ConcatV2`` / ``Pack`` of
  ``Shape``, ``GatherV2``-of-``Shape``, ``Prod`` and constants: ``tf.tensordot``, which Keras 3's ``Dense``
  uses on a 4-D input, writes two) gets a constant target when every dimension but one is static (that
  one becomes ``-1``), so that shape inference and the channel analysis see through it; a ``Transpose``
  whose computed permutation is constant gets it as a constant, and is bypassed when it is the identity
  (``tf.tensordot`` writes one).

All rewrites compute the same values.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphslim.ir.graph import Graph


def ungroup_convs(graph: Graph) -> int:
    """Rewrite grouped Conv2D nodes (see the module docstring); returns how many."""
    count = 0
    for node in graph.nodes(op="Conv2D"):
        x, w = graph.input(node, 0), graph.input(node, 1)
        xs, ws = graph.shape(x), graph.shape(w)
        fmt = node.attr("data_format", "NHWC")
        cax = 1 if fmt.startswith("NC") else 3
        if not xs or not ws or xs[cax] is None or None in ws or xs[cax] == ws[2]:
            continue
        cin, (kh, kw, fin, cout) = xs[cax], ws
        if cin % fin or cout % (cin // fin):
            continue
        groups = cin // fin
        name, attrs, dtype = node.name, dict(node.attrs), node.attr("T")
        users = graph.consumers(node.output(0))
        outs = [o.name for o in graph.outputs if o.tensor == node.output(0)]
        strides = node.attr("strides")
        graph.remove_node(node, safe=False)
        if fin == 1 and fmt == "NHWC" and strides[1] == strides[2]:
            shape = graph.add_const(f"{name}/depthwise_shape", np.array([kh, kw, cin, cout // cin], np.int32),
                                    unique=True)
            r = graph.add_node(f"{name}/depthwise_kernel", "Reshape", inputs=[w, shape],
                               attrs={"T": dtype, "Tshape": tf.int32}, unique=True)
            keep = {k: v for k, v in attrs.items() if k in ("T", "strides", "padding", "explicit_paddings",
                                                             "data_format", "dilations")}
            new = graph.add_node(name, "DepthwiseConv2dNative", inputs=[x, r], attrs=keep)
        else:
            ax = graph.add_const(f"{name}/group_axis", np.array(cax, np.int32), unique=True)
            wax = graph.add_const(f"{name}/group_kernel_axis", np.array(3, np.int32), unique=True)
            xsplit = graph.add_node(f"{name}/groups", "Split", inputs=[ax, x],
                                    attrs={"T": dtype, "num_split": groups}, unique=True)
            wsplit = graph.add_node(f"{name}/group_kernels", "Split", inputs=[wax, w],
                                    attrs={"T": dtype, "num_split": groups}, unique=True)
            convs = [graph.add_node(f"{name}/group_{i}", "Conv2D", inputs=[xsplit.output(i), wsplit.output(i)],
                                    attrs=attrs, unique=True).output(0) for i in range(groups)]
            cat_ax = graph.add_const(f"{name}/concat_axis", np.array(cax, np.int32), unique=True)
            new = graph.add_node(name, "ConcatV2", inputs=convs + [cat_ax],
                                 attrs={"T": dtype, "N": groups, "Tidx": tf.int32})
        for user, port in users:
            graph.set_input(user, port, new.output(0))
        for o in outs:
            graph.set_output(o, new.output(0))
        count += 1
    return count


_SHAPE_OPS = ("Shape", "GatherV2", "Prod", "Pack", "ConcatV2", "Const", "StridedSlice", "Cast")


def _static_value(graph: Graph, tensor, depth: int = 0):
    """The value of a shape-computing int tensor as a list (vector) or int (scalar), with None for the
    dimensions that are not static; None when it is not such a computation."""
    node = graph.producer(tensor)
    if depth > 8:
        return None
    if node.op == "Const":
        v = graph.constant_value(tensor)
        if v is None or v.dtype.kind not in "iu" or v.ndim > 1:
            return None
        return [int(x) for x in v] if v.ndim else int(v)
    if node.op == "Shape":
        shape = graph.shape(graph.input(node, 0))
        return None if shape is None else [None if d is None else int(d) for d in shape]
    if node.op == "GatherV2":
        params = _static_value(graph, graph.input(node, 0), depth + 1)
        idx = _static_value(graph, graph.input(node, 1), depth + 1)
        axis = _static_value(graph, graph.input(node, 2), depth + 1)
        if not isinstance(params, list) or axis != 0 or idx is None or node.attr("batch_dims", 0):
            return None
        # (GatherV2 on CPU rejects negative or out-of-range indices at run time: keep such a graph as is)
        if isinstance(idx, int):
            return params[idx] if 0 <= idx < len(params) else None
        if any(i is None or not 0 <= i < len(params) for i in idx):
            return None
        return [params[i] for i in idx]
    if node.op == "Prod":
        v = _static_value(graph, graph.input(node, 0), depth + 1)
        axis = _static_value(graph, graph.input(node, 1), depth + 1)
        if not isinstance(v, list) or axis not in (0, [0]) or node.attr("keep_dims", False):
            return None
        return None if any(d is None for d in v) else int(np.prod(v, dtype=np.int64))
    if node.op == "Pack" and node.attr("axis", 0) == 0:
        parts = [_static_value(graph, t, depth + 1) for t in graph.inputs_of(node)]
        if any(isinstance(p, list) for p in parts):
            return None
        return parts  # None for a non-static element
    if node.op == "ConcatV2":
        ins = graph.inputs_of(node)
        if _static_value(graph, ins[-1], depth + 1) not in (0, -1):
            return None
        out = []
        for t in ins[:-1]:
            p = _static_value(graph, t, depth + 1)
            if not isinstance(p, list):
                return None
            out += p
        return out
    return None


def static_reshape_shapes(graph: Graph) -> int:
    """Give a constant target to each Reshape whose run-time computed target has at most one
    non-static dimension; returns how many were rewritten."""
    count = 0
    for node in graph.nodes(op=("Reshape", "Transpose")):
        t = graph.input(node, 1)
        src = graph.producer(t)
        if src.op == "Const" or src.op not in _SHAPE_OPS:
            continue
        value = _static_value(graph, t)
        if not isinstance(value, list) or sum(d is None for d in value) > (1 if node.op == "Reshape" else 0):
            continue
        if any(d is not None and d < 0 for d in value):
            continue
        if node.op == "Transpose" and value == list(range(len(value))) and not graph.control_inputs_of(node) \
                and graph.dtype(graph.input(node, 0)) == node.dtypes[0]:
            graph.replace_all_uses(node.output(0), graph.input(node, 0))  # identity permutation
            graph.remove_node(node)
        else:
            vec = np.array([-1 if d is None else d for d in value], dtype=graph.dtype(t).as_numpy_dtype)
            graph.set_input(node, 1, graph.add_const(f"{node.name}/static_shape", vec, unique=True).output(0))
        count += 1
        todo = [src]
        while todo:  # the shape computation, once nothing reads it
            n = todo.pop()
            if not graph.has_node(n.name) or n.op not in _SHAPE_OPS or any(
                    graph.uses(n.output(p)) for p in range(n.num_outputs)) or graph.control_consumers(n) \
                    or any(a.tensor.node == n.name for a in graph.inputs):
                continue
            ins = [graph.producer(x) for x in graph.inputs_of(n)]
            graph.remove_node(n)
            todo += ins
    return count


def canonicalize(graph: Graph) -> int:
    """Apply the simplifications in place; returns how many nodes were bypassed and removed."""
    removed = 0
    if ungroup_convs(graph):
        graph.infer_shapes()
    for _ in range(16):  # a rewrite can make the shapes downstream static: repeat until none is left
        if not static_reshape_shapes(graph):
            break
        graph.infer_shapes()
    for node in graph.nodes():
        if not graph.has_node(node.name):
            continue
        src = None
        if node.op == "IdentityN" and not graph.control_inputs_of(node):
            for port, inp in enumerate(graph.inputs_of(node)):
                graph.replace_all_uses(node.output(port), inp)
            if all(graph.uses(node.output(p)) == 0 for p in range(node.num_outputs)) and \
                    not graph.control_consumers(node):
                graph.remove_node(node)
                removed += 1
            continue
        if node.op in ("Identity", "Snapshot", "StopGradient") and node.attrs.get("T") is not None and \
                graph.inputs_of(node) and not graph.control_inputs_of(node):
            src = graph.input(node, 0)
        elif node.op == "Squeeze" and node.shapes and node.shapes[0] is not None:
            r = graph.input_node(node, 0)
            if r.op == "Reshape":
                x = graph.input(r, 0)
                xs = graph.shape(x)
                if xs is not None and None not in xs and tuple(xs) == tuple(node.shapes[0]):
                    src = x
        if src is None or graph.dtype(src) != node.dtypes[0]:
            continue
        graph.replace_all_uses(node.output(0), src)
        if graph.uses(node.output(0)) == 0 and not graph.control_consumers(node):
            graph.remove_node(node)
            removed += 1
    # Reshapes left without users (their Squeeze was bypassed) go too.
    changed = True
    while changed:
        changed = False
        for node in graph.nodes():
            if node.op in ("Reshape", "Const", "Squeeze") and graph.uses(node.output(0)) == 0 and \
                    not graph.control_consumers(node) and not any(a.tensor.node == node.name for a in graph.inputs):
                graph.remove_node(node)
                removed += 1
                changed = True
    return removed
