"""Evaluate weight-only subexpressions with numpy (never TensorFlow: nothing of the model runs).

``constant_value(graph, tensor)`` returns the value of ``tensor`` when it depends only on weights and
constants through a small set of element-wise and shape ops (Keras 3 computes batch-norm scales as
``Rsqrt(Reshape(var) + eps) * Reshape(gamma)``); otherwise None. Rules live in a registry keyed by op.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from graphslim.ir.graph import WEIGHT_OP, Graph, Tensor, as_tensor

EVAL_RULES: dict[str, Callable] = {}


def eval_rule(*ops: str):
    def deco(fn):
        for op in ops:
            EVAL_RULES[op] = fn
        return fn

    return deco


eval_rule("Identity", "Snapshot", "StopGradient")(lambda node, a: a[0])
eval_rule("AddV2", "Add")(lambda node, a: a[0] + a[1])
eval_rule("Sub")(lambda node, a: a[0] - a[1])
eval_rule("Mul")(lambda node, a: a[0] * a[1])
eval_rule("RealDiv", "Div")(lambda node, a: a[0] / a[1])
eval_rule("Maximum")(lambda node, a: np.maximum(a[0], a[1]))
eval_rule("Minimum")(lambda node, a: np.minimum(a[0], a[1]))
eval_rule("Neg")(lambda node, a: -a[0])
eval_rule("Sqrt")(lambda node, a: np.sqrt(a[0]))
eval_rule("Rsqrt")(lambda node, a: 1.0 / np.sqrt(a[0]))
eval_rule("Reciprocal", "Inv")(lambda node, a: 1.0 / a[0])
eval_rule("Square")(lambda node, a: a[0] * a[0])
eval_rule("Reshape")(lambda node, a: np.reshape(a[0], [int(d) for d in a[1]]))


@eval_rule("Squeeze")
def _squeeze(node, a):
    dims = node.attr("squeeze_dims") or []
    return np.squeeze(a[0], axis=tuple(dims)) if dims else np.squeeze(a[0])


@eval_rule("ExpandDims")
def _expand(node, a):
    return np.expand_dims(a[0], int(a[1]))


@eval_rule("Cast")
def _cast(node, a):
    return a[0].astype(node.attr("DstT").as_numpy_dtype)


@eval_rule("Pack")
def _pack(node, a):
    return np.stack(a, axis=int(node.attr("axis", 0) or 0))


@eval_rule("ConcatV2")
def _concat(node, a):
    return np.concatenate(a[:-1], axis=int(a[-1]))


@eval_rule("Prod")
def _prod(node, a):
    axes = tuple(int(x) for x in np.atleast_1d(a[1]))
    return np.prod(a[0], axis=axes, keepdims=bool(node.attr("keep_dims", False)))


@eval_rule("StridedSlice")
def _strided_slice(node, a):
    """1-D slices only (shape vectors): begin/end masks and shrink, no ellipsis or new axes."""
    x, begin, end, strides = a[0], *(np.atleast_1d(v).astype(int) for v in a[1:4])
    if x.ndim != 1 or len(begin) != 1 or node.attr("ellipsis_mask", 0) or node.attr("new_axis_mask", 0):
        raise ValueError("only 1-D strided slices of a vector")
    if node.attr("shrink_axis_mask", 0) & 1:
        return x[int(begin[0])]
    lo = None if node.attr("begin_mask", 0) & 1 else int(begin[0])
    hi = None if node.attr("end_mask", 0) & 1 else int(end[0])
    return x[lo:hi:int(strides[0])]


def constant_value(graph: Graph, tensor, _depth: int = 0, assume: dict | None = None) -> np.ndarray | None:
    """The value of ``tensor`` if it is computable from weights and constants alone, else None.

    ``assume`` maps tensors to concrete shapes: with it, ``Shape`` of such a tensor evaluates to that
    shape (a Reshape's target vector built from its input's run-time batch size can then be computed
    for an assumed input shape), and ``Shape`` of a tensor whose static shape is fully known to that.
    Without it ``Shape`` is never a constant (passes change shapes).
    Arithmetic is done in float64 and cast back to the tensor's dtype."""
    t = as_tensor(tensor)
    node = graph.node(t.node)
    if node.op == WEIGHT_OP:
        return graph.weights[node.name].value
    if node.op == "Const":
        return node.attr("value")
    if node.op == "Shape" and t.port == 0 and assume is not None:
        src = graph.input(node, 0)
        shape = assume.get(src)
        if shape is None:
            static = graph.shape(src)
            shape = static if static is not None and None not in static else None
        if shape is None:
            return None
        dtype = node.dtypes[0].as_numpy_dtype if node.dtypes else np.int32
        return np.asarray(shape, dtype=dtype)
    rule = EVAL_RULES.get(node.op)
    if rule is None or t.port != 0 or _depth > 64:
        return None
    args = []
    for inp in graph.inputs_of(node):
        v = constant_value(graph, inp, _depth + 1, assume)
        if v is None:
            return None
        args.append(v.astype(np.float64) if v.dtype.kind == "f" else v)
    try:
        out = np.asarray(rule(node, args))
    except (ValueError, IndexError, TypeError):
        return None
    dtype = node.dtypes[0].as_numpy_dtype if node.dtypes else out.dtype
    return out.astype(dtype)


def is_constant(graph: Graph, tensor: Tensor) -> bool:
    return constant_value(graph, tensor) is not None
