"""Evaluate weight-only subexpressions with numpy (never TensorFlow: nothing of the model runs).

``constant_value(graph, tensor)`` returns the value of ``tensor`` when it depends only on weights and
constants through a small set of element-wise and shape ops (Keras 3 computes batch-norm scales as
``Rsqrt(Reshape(var) + eps) * Reshape(gamma)``); otherwise None. Rules live in a registry keyed by op.

Evaluation is bounded: the size of every array a rule would create is computed from its operands'
shapes *before* the rule runs (the broadcast shape for element-wise ops), and the arrays of one
evaluation together may take at most ``budget`` bytes (:data:`EVAL_BUDGET_BYTES`, 1 GiB, by default).
Two 8 MiB constants of shapes ``[2048, 1, 1024]`` and ``[1, 2048, 1024]`` multiply to 32 GiB in
float64: over the budget the value is unknown (None), or, with ``strict=True``, a
:class:`ConstantBudgetError` names the node, the shape and the bytes. Shared subexpressions are
evaluated once per call (a chain of ``Add(x, x)`` is linear, not exponential).
"""

from __future__ import annotations

import numpy as np

from graphslim.errors import GraphslimError
from graphslim.ir import ops
from graphslim.ir.graph import WEIGHT_OP, Graph, Node, Tensor, as_tensor

#: op type → ``(node, args) -> array``: a live view of the ``evaluate`` hooks in the per-op facts table
#: (:mod:`graphslim.ir.ops`); an entry's ``broadcasting`` fact says its result has the broadcast shape
#: of its operands.
EVAL_RULES = ops.hooks("evaluate")
EVAL_BUDGET_BYTES = 2**30  # the arrays one constant_value() call may create, together
_MAX_DEPTH = 64


class ConstantBudgetError(GraphslimError):
    """Evaluating a constant expression would create arrays larger than the evaluation budget.
    ``node``, ``shape``, ``nbytes`` and ``budget`` say which, how large, and the limit."""

    def __init__(self, message: str, node: str = "", shape: tuple = (), nbytes: int = 0, budget: int = 0):
        super().__init__(message)
        self.node, self.shape, self.nbytes, self.budget = node, shape, nbytes, budget


def eval_rule(*op_types: str, broadcasting: bool = False):
    """Register ``fn(node, args) -> array`` as the numpy rule of ``ops``. The budget charges each
    result the broadcast of the operands' shapes (``broadcasting``) or, for every other rule, the
    operands' total size: the rule must not create a larger array than that."""
    def deco(fn):
        for op in op_types:
            ops.define_op(op, evaluate=fn, **({"broadcasting": True} if broadcasting else {}))
        return fn

    return deco


eval_rule("Identity", "Snapshot", "StopGradient")(lambda node, a: a[0])
eval_rule("AddV2", "Add", broadcasting=True)(lambda node, a: a[0] + a[1])
eval_rule("Sub", broadcasting=True)(lambda node, a: a[0] - a[1])
eval_rule("Mul", broadcasting=True)(lambda node, a: a[0] * a[1])
eval_rule("RealDiv", "Div", broadcasting=True)(lambda node, a: a[0] / a[1])
eval_rule("Maximum", broadcasting=True)(lambda node, a: np.maximum(a[0], a[1]))
eval_rule("Minimum", broadcasting=True)(lambda node, a: np.minimum(a[0], a[1]))
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


class _Meter:
    """The bytes one evaluation has created so far, against its budget."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0

    def charge(self, node, shape, itemsize: int, why: str) -> None:
        numel = 1
        for d in shape:
            numel *= int(d)
        nbytes = numel * itemsize
        if self.used + nbytes > self.budget:
            raise ConstantBudgetError(
                f"evaluating node {node.name!r} ({node.op}) as a constant would create {why} of shape "
                f"{list(map(int, shape))} ({_size(nbytes)}; {_size(self.used)} created before it), more "
                f"than the {_size(self.budget)} budget of one constant evaluation. graphslim does not "
                f"allocate it: the value is treated as unknown, and a pass that would fold it leaves the "
                f"node as it is.", node.name, tuple(int(d) for d in shape), nbytes, self.budget)
        self.used += nbytes


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _result_shape(node, args) -> tuple:
    """An upper bound of the shape of what ``node``'s rule returns, from its operands' shapes alone."""
    entry = ops.facts(node.op)
    if entry is not None and entry.broadcasting:
        return tuple(np.broadcast_shapes(*(np.shape(a) for a in args)))  # ValueError: incompatible
    return (sum(int(np.size(a)) for a in args),)


def constant_value(graph: Graph, tensor, _depth: int = 0, assume: dict | None = None, *,
                   budget: int | None = None, strict: bool = False) -> np.ndarray | None:
    """The value of ``tensor`` if it is computable from weights and constants alone, else None.

    ``assume`` maps tensors to concrete shapes: with it, ``Shape`` of such a tensor evaluates to that
    shape (a Reshape's target vector built from its input's run-time batch size can then be computed
    for an assumed input shape), and ``Shape`` of a tensor whose static shape is fully known to that.
    Without it ``Shape`` is never a constant (passes change shapes).
    Arithmetic is done in float64 and cast back to the tensor's dtype.

    ``budget`` (bytes, default :data:`EVAL_BUDGET_BYTES`) bounds the arrays this call creates
    together, checked from the shapes before anything is allocated; over it the value is unknown
    (None), or with ``strict`` a :class:`ConstantBudgetError` is raised.

        >>> constant_value(g, "bn/mul:0")            # doctest: +SKIP
        array([0.5, 2. ], dtype=float32)"""
    meter = _Meter(EVAL_BUDGET_BYTES if budget is None else budget)
    try:
        return _evaluate(graph, as_tensor(tensor), _depth, assume, meter, {})
    except ConstantBudgetError:
        if strict:
            raise
        return None


def _evaluate(graph: Graph, t: Tensor, depth: int, assume, meter: _Meter, memo: dict):
    if t in memo:
        return memo[t]
    node = graph.node(t.node)
    value = None
    if node.op == WEIGHT_OP:
        value = graph.weights[node.name].value
    elif node.op == "Const":
        value = node.attr("value")
    elif node.op == "Shape" and t.port == 0 and assume is not None:
        src = graph.input(node, 0)
        shape = assume.get(src)
        if shape is None:
            static = graph.shape(src)
            shape = static if static is not None and None not in static else None
        if shape is not None:
            dtype = node.dtypes[0].as_numpy_dtype if node.dtypes else np.int32
            value = np.asarray(shape, dtype=dtype)
    elif node.op in EVAL_RULES and t.port == 0 and depth <= _MAX_DEPTH:
        value = _apply(graph, node, depth, assume, meter, memo)
    memo[t] = value
    return value


def _apply(graph: Graph, node, depth: int, assume, meter: _Meter, memo: dict):
    args = []
    for inp in graph.inputs_of(node):
        v = _evaluate(graph, inp, depth + 1, assume, meter, memo)
        if v is None:
            return None
        if v.dtype.kind == "f" and v.dtype != np.float64:
            meter.charge(node, np.shape(v), 8, "a float64 copy of an operand")
            v = v.astype(np.float64)
        args.append(v)
    try:
        shape = _result_shape(node, args)
    except ValueError:
        return None  # operands that do not broadcast: the rule would fail too
    itemsize = max([a.itemsize for a in args] + [8])
    meter.charge(node, shape, itemsize, "an array")
    try:
        out = np.asarray(EVAL_RULES[node.op](node, args))
    except (ValueError, IndexError, TypeError):
        return None
    dtype = np.dtype(node.dtypes[0].as_numpy_dtype if node.dtypes else out.dtype)
    meter.charge(node, out.shape, dtype.itemsize, f"its {dtype.name} result")
    return out.astype(dtype)  # a copy: never the weight's own array (Identity returns its operand)


def is_constant(graph: Graph, tensor: Tensor) -> bool:
    return constant_value(graph, tensor) is not None


def concat_part(graph: Graph, node: Node, element: int) -> tuple[int, int] | None:
    """``(input port, offset in it)`` holding element ``element`` of 1-D ConcatV2 ``node``'s output (a
    shape vector ``concat([shape(x)[:2], [C]])``, as ``tf.tensordot`` builds for Keras Dense on a 3-D
    input), or None when a part has no static length."""
    start = 0
    for p, t in enumerate(graph.inputs_of(node)[:-1]):
        s = graph.shape(t)
        if s is None or len(s) != 1 or s[0] is None:
            return None
        if element < start + s[0]:
            return p, element - start
        start += s[0]
    return None


def vector_element(graph: Graph, t, element: int, *, shapes: bool = False) -> int | None:
    """Element ``element`` of the 1-D int tensor ``t`` when it is constant: a constant vector, a Pack of
    scalars whose element is constant (``[batch, 1, 1]`` with the batch read at run time), or a ConcatV2
    whose part holding it is constant; else None. With ``shapes``, also a static dimension read at run
    time through ``Shape(x)`` or ``GatherV2(Shape(x), constant indices)`` (``tf.tensordot``'s target)."""
    v = constant_value(graph, t)
    if v is not None:
        v = np.atleast_1d(v)
        return int(v[element]) if -len(v) <= element < len(v) else None
    src = graph.producer(t)
    if src.op == "Pack" and 0 <= element < len(graph.inputs_of(src)):
        e = constant_value(graph, graph.input(src, element))
        return None if e is None or np.ndim(e) else int(e)
    if src.op == "ConcatV2":
        part = concat_part(graph, src, element)
        return None if part is None else vector_element(graph, graph.input(src, part[0]), part[1], shapes=shapes)
    if not shapes:
        return None
    if src.op == "GatherV2" and graph.producer(graph.input(src, 0)).op == "Shape":
        idx = constant_value(graph, graph.input(src, 1))
        if idx is None or not -np.size(idx) <= element < np.size(idx):
            return None
        return vector_element(graph, graph.input(src, 0), int(np.atleast_1d(idx)[element]), shapes=True)
    if src.op == "Shape":
        dims = graph.shape(graph.input(src, 0))
        return None if dims is None or not -len(dims) <= element < len(dims) else dims[element]
    return None
