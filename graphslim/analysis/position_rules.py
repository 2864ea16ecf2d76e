"""Position rules: which positions of its inputs an op reads to produce some positions of its output
(see :mod:`graphslim.analysis.positions`, the dead-position analysis that uses them).

A *position* is an index along one axis of a tensor: a token of a transformer's sequence, a row of a
feature map. A :class:`Span` says that only positions ``lo ≤ p < hi`` along one axis are needed. Every
rule is registered with ``@position_rule(op, ...)`` as the ``positions`` hook of its ops in the per-op
facts table (:mod:`graphslim.ir.ops`); importing this module registers the built-in ones. A rule gets
the context (``ctx.graph``, ``ctx.in_shape(node, port)``, ``ctx.out_shape(node)``, ``ctx.const(node,
port)``, ``ctx.rewrite(fn)``), the node and the :class:`Span` of its output that is needed (None: all of
it). It returns one entry per input port: the :class:`Span` of that input it reads, or None when it
reads all of it. When the rewritten op needs new attributes or constants (a Reshape's target shape, a
StridedSlice's begin and end), the rule records the change with ``ctx.rewrite(fn)``; ``fn(graph)`` runs
only if the rewrite happens. An op without a rule reads all of every input, so nothing is guessed.
Example::

    @position_rule("MyGelu")                      # element-wise: position p of y is position p of x
    def _my_gelu(ctx, node, need):
        return [need]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from graphslim.analysis.channel_rules import BINARY, UNARY, slice_range, sparse_index, vector_element
from graphslim.ir import ops

__all__ = ["POSITION_RULES", "position_rule", "Span", "NotPositional", "static_target"]

#: op type → rule ``(ctx, node, need: Span | None) -> list[Span | None]``: a live view of the ``positions``
#: hooks in the per-op facts table (:mod:`graphslim.ir.ops`).
POSITION_RULES = ops.hooks("positions")


class NotPositional(Exception):
    """A rule cannot restrict its inputs (the op mixes the needed positions with others); the analysis
    reads all of every input."""


@dataclass(frozen=True)
class Span:
    """Positions ``lo ≤ p < hi`` along ``axis`` are needed. ``period`` is the number of positions: the
    axis's length, or, when the axis merges an outer axis with the positions (``[batch·T, C]`` after a
    Dense's Tensordot reshape), ``T``: index ``i`` along the axis is position ``i % period``. None: the
    axis has no static length (and merges nothing)."""
    axis: int
    lo: int
    hi: int
    period: int | None = None
    #: the axis holds several periods (``[batch·T, C]``) rather than exactly the positions: set where a
    #: Reshape merges them, carried by the ops after it
    merged: bool = False

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def at(self, axis: int) -> "Span":
        return replace(self, axis=axis)


def position_rule(*op_types: str):
    """Register a position rule for op types ``op_types`` (the ``positions`` hook of their entries in
    :mod:`graphslim.ir.ops`). See the module docstring for the signature."""
    return ops.register_hook("positions", *op_types)


def _const(ctx, node, port: int) -> np.ndarray:
    """Input ``port`` of ``node`` as a constant array (NotPositional when it is computed at run time)."""
    value = ctx.const(node, port)
    if value is None:
        raise NotPositional
    return np.atleast_1d(value).astype(np.int64)


def _on(need: Span | None, shape, axis: int) -> Span | None:
    """``need`` moved to ``axis`` of an input of ``shape``; None where the input is broadcast along it
    (length 1), and so read whole."""
    if need is None or axis < 0 or shape is None or axis >= len(shape) or shape[axis] == 1:
        return None
    return need.at(axis)


@position_rule(*UNARY)
def _unary(ctx, node, need):
    """Element-wise: position p of the output is position p of the input."""
    return [need]


@position_rule(*BINARY, "SelectV2", "BiasAdd", "AddN", "ClipByValue")
def _broadcasting(ctx, node, need):
    """Broadcasting element-wise ops: each input aligned from the last axis; an input broadcast along
    the axis (length 1, or missing) is read whole."""
    n = len(ctx.graph.inputs_of(node))
    if need is None:
        return [None] * n
    rank = len(ctx.out_shape(node))
    spans = []
    for p in range(n):
        s = ctx.in_shape(node, p)
        spans.append(None if s is None else _on(need, s, need.axis - (rank - len(s))))
    return spans


@position_rule("Softmax", "LogSoftmax")
def _softmax(ctx, node, need):
    """Normalizes over the last axis: positions along it are mixed."""
    if need is not None and need.axis == len(ctx.out_shape(node)) - 1:
        raise NotPositional
    return [need]


@position_rule("Mean", "Sum", "Max", "Min", "Prod")
def _reduce(ctx, node, need):
    """Reductions over other axes keep the positions (axis renumbered without keep_dims)."""
    if need is None:
        return [None, None]
    rank = len(ctx.in_shape(node, 0))
    red = {int(a) % rank for a in _const(ctx, node, 1)}
    kept = list(range(rank)) if node.attr("keep_dims", False) else [a for a in range(rank) if a not in red]
    a = kept[need.axis]
    if a in red:
        raise NotPositional
    return [need.at(a), None]


@position_rule("MatMul", "BatchMatMulV2", "BatchMatMulV3", "BatchMatMul")
def _matmul(ctx, node, need):
    """x[..., M, K] · y[..., K, N]: output rows are x's rows, columns y's columns, batch axes broadcast."""
    if need is None:
        return [None, None]
    ro = len(ctx.out_shape(node))
    sx, sy = ctx.in_shape(node, 0), ctx.in_shape(node, 1)
    tx = node.attr("transpose_a", False) or node.attr("adj_x", False)
    ty = node.attr("transpose_b", False) or node.attr("adj_y", False)
    if need.axis == ro - 2:
        return [need.at(len(sx) - (1 if tx else 2)), None]
    if need.axis == ro - 1:
        return [None, need.at(len(sy) - (2 if ty else 1))]
    return [_on(need, s, need.axis - (ro - len(s))) for s in (sx, sy)]


@position_rule("Einsum")
def _einsum(ctx, node, need):
    """Each axis is a label of the equation: the operands holding the output axis's label read those
    positions; the others (the keys of ``BTNH,BSNH->BNTS`` for the query positions T) are read whole."""
    n = len(ctx.graph.inputs_of(node))
    if need is None:
        return [None] * n
    try:
        operands, out = ops.einsum_labels(node)
    except ValueError:
        raise NotPositional from None
    label = out[need.axis]
    return [_on(need, ctx.in_shape(node, p), operands[p].index(label)) if label in operands[p] else None
            for p in range(n)]


@position_rule("Transpose")
def _transpose(ctx, node, need):
    if need is None:
        return [None, None]
    perm = [int(a) for a in _const(ctx, node, 1)]
    return [need.at(perm[need.axis]), None]


@position_rule("ConcatV2")
def _concat(ctx, node, need):
    """Concatenation along another axis keeps the positions; along the positions' axis it reads all."""
    n = len(ctx.graph.inputs_of(node))
    if need is None:
        return [None] * n
    rank = len(ctx.out_shape(node))
    if int(_const(ctx, node, n - 1)[0]) % rank == need.axis:
        raise NotPositional
    return [need] * (n - 1) + [None]


def _flat_size(shape) -> int | None:
    if shape is None or any(d is None for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def static_target(graph, node) -> np.ndarray | None:
    """A Reshape's target computed at run time (``tf.tensordot``'s concat of Shape(x) parts) as a
    constant, when every entry but one (the batch, written -1) is known before run time; else None."""
    out = node.shapes[0] if node.shapes else None
    if out is None:
        return None
    known = [vector_element(graph, graph.input(node, 1), i, shapes=True) for i in range(len(out))]
    known = [None if v is None or v < 0 else v for v in known]
    if sum(v is None for v in known) > 1 or any(v != d for v, d in zip(known, out) if None not in (v, d)):
        return None
    return np.array([-1 if v is None else v for v in known], graph.dtype(graph.input(node, 1)).as_numpy_dtype)


@position_rule("Reshape")
def _reshape(ctx, node, need):
    """Row-major reshapes keep each element's flat index, so a span of positions keeps its flat pattern
    (``period`` positions of ``suffix`` elements each): found again on the input axis whose trailing
    axes hold ``suffix`` elements (merged with the batch as in ``[batch·T, C]``, or split from it). The
    target shape must be a constant, or computed at run time with a result known before it up to one
    axis (:func:`static_target`); its entry for the axis becomes the kept positions."""
    if need is None:
        return [None, None]
    out, src = ctx.out_shape(node), ctx.in_shape(node, 0)
    target = ctx.const(node, 1)
    if target is None:
        target = static_target(ctx.graph, node)
    suffix = _flat_size(out[need.axis + 1:])
    period = need.period if need.period is not None else out[need.axis]
    if target is None or suffix is None or period is None:
        raise NotPositional
    for b in range(len(src)):
        if _flat_size(src[b + 1:]) == suffix and (src[b] is None or src[b] % period == 0):
            break
    else:
        raise NotPositional
    if src[b] is None and b != 0:  # an axis of unknown length that may or may not hold the batch too
        raise NotPositional
    merged = src[b] != period  # [batch·T, C]: the batch (of unknown length) and the positions
    target = np.array(target).reshape(-1).copy()
    if target[need.axis] != -1:
        if target[need.axis] % period:
            raise NotPositional
        target[need.axis] = target[need.axis] // period * need.size

    def rewrite(graph):
        const = graph.add_const(f"{node.name}/positions_shape", target.astype(target.dtype), unique=True)
        graph.set_input(node, 1, const.output(0))

    ctx.rewrite(rewrite)
    return [Span(b, need.lo, need.hi, period, merged), None]


def _taken(ranges: dict, src, need: Span | None, axis: int | None) -> Span:
    """The span of its input a slicing op reads: with nothing needed downstream yet, its one sliced
    range (``{axis: (lo, hi)}``); else the needed positions of input axis ``axis``, within its range."""
    if need is None:
        if len(ranges) != 1:
            raise NotPositional
        ((a, (lo, hi)),) = ranges.items()
        return Span(a, lo, hi, src[a])
    if need.merged:
        raise NotPositional
    base = ranges.get(axis, (0, None))[0]
    return Span(axis, base + need.lo, base + need.hi, src[axis])


@position_rule("StridedSlice")
def _strided_slice(ctx, node, need):
    """A stride-1 range or one position of one axis (``x[:, 0]``, the class token) reads only those
    positions of its input: a slice is where dead positions are found. Other axes pass through."""
    if node.attr("new_axis_mask", 0) or node.attr("ellipsis_mask", 0):
        raise NotPositional
    src = ctx.in_shape(node, 0)
    consts = [ctx.const(node, p) for p in (1, 2, 3)]
    if src is None or any(c is None for c in consts):
        raise NotPositional
    begin, end, strides = (np.atleast_1d(c).astype(np.int64) for c in consts)
    rank, shrink = len(src), node.attr("shrink_axis_mask", 0)
    ranges = {}
    for a in range(min(rank, len(begin))):
        if strides[a] != 1 and not shrink >> a & 1:  # x[:, ::-1] reverses: position p is not p any more
            raise NotPositional
        lo, hi = (0, src[a]) if node.attr("begin_mask", 0) >> a & 1 and node.attr("end_mask", 0) >> a & 1 \
            else (None, None)
        if lo is None:
            if shrink >> a & 1:
                b = int(begin[a])
                if b < 0 and src[a] is None:
                    raise NotPositional
                lo = b + src[a] if b < 0 else b
                hi = lo + 1
            elif src[a] is None:
                raise NotPositional
            else:
                lo, hi = slice_range(node, begin, end, src[a], a)
        if (lo, hi) != (0, src[a]):
            ranges[a] = (lo, hi)
    kept = [a for a in range(rank) if not (a < len(begin) and shrink >> a & 1)]
    take = _taken(ranges, src, need, None if need is None else kept[need.axis])
    a = take.axis
    if a >= len(begin) or sparse_index(node, a, rank, len(begin)) != a:
        raise NotPositional
    # the input arrives holding exactly the positions the slice takes: it now takes all of them
    new_begin, new_end = begin.copy(), end.copy()
    new_begin[a], new_end[a] = 0, 1 if shrink >> a & 1 else take.size

    def rewrite(graph):
        for port, value in ((1, new_begin), (2, new_end)):
            const = graph.add_const(f"{node.name}/positions_{'begin' if port == 1 else 'end'}",
                                    value.astype(consts[port - 1].dtype), unique=True)
            graph.set_input(node, port, const.output(0))
        mask = ~(1 << a)
        node.set_attr("begin_mask", node.attr("begin_mask", 0) & mask)
        node.set_attr("end_mask", node.attr("end_mask", 0) & mask)

    ctx.rewrite(rewrite)
    return [take, None, None, None]


def _range_of(values) -> tuple[int, int] | None:
    """``[lo, hi)`` when ``values`` (a scalar or a vector) are consecutive ascending integers, else None."""
    v = np.atleast_1d(values).astype(np.int64).reshape(-1)
    if v.size == 0 or np.any(np.diff(v) != 1):
        return None
    return int(v[0]), int(v[-1]) + 1


@position_rule("GatherV2")
def _gather(ctx, node, need):
    """Constant indices that are one position or a run of them (``tf.gather(x, 0, axis=1)``) read only
    those positions of ``params`` (the indices are rewritten to count from the run's start); other axes
    pass through."""
    if node.attr("batch_dims", 0):
        raise NotPositional
    src = ctx.in_shape(node, 0)
    axis = int(_const(ctx, node, 2)[0]) % len(src)
    indices = ctx.const(node, 1)
    n_idx = len(ctx.in_shape(node, 1))
    if need is not None:
        if axis <= need.axis < axis + n_idx:
            raise NotPositional
        return [need.at(need.axis if need.axis < axis else need.axis - n_idx + 1), None, None]
    run = None if indices is None or src[axis] is None else _range_of(np.where(np.asarray(indices) < 0,
                                                                                np.asarray(indices) + src[axis],
                                                                                indices))
    if run is None:
        raise NotPositional
    lo, hi = run
    shifted = (np.asarray(indices) % src[axis] - lo).astype(np.asarray(indices).dtype)

    def rewrite(graph):
        const = graph.add_const(f"{node.name}/positions_indices", shifted, unique=True)
        graph.set_input(node, 1, const.output(0))

    ctx.rewrite(rewrite)
    return [Span(axis, lo, hi, src[axis]), None, None]


@position_rule("Slice")
def _slice(ctx, node, need):
    """``tf.slice`` with a constant begin and size: a range of one axis reads only it (begin rewritten to
    count from the range's start); whole axes pass through."""
    src = ctx.in_shape(node, 0)
    begin, size = _const(ctx, node, 1), _const(ctx, node, 2)
    ranges = {}
    for a, d in enumerate(src):
        lo = int(begin[a])
        hi = d if size[a] == -1 else lo + int(size[a])
        if (lo, hi) != (0, d):
            if d is None or hi is None:
                raise NotPositional
            ranges[a] = (lo, hi)
    take = _taken(ranges, src, need, None if need is None else need.axis)
    new_begin, new_size = begin.copy(), size.copy()
    new_begin[take.axis], new_size[take.axis] = 0, take.size

    def rewrite(graph):
        for port, value, label in ((1, new_begin, "begin"), (2, new_size, "size")):
            dtype = graph.dtype(graph.input(node, port)).as_numpy_dtype
            graph.set_input(node, port, graph.add_const(f"{node.name}/positions_{label}", value.astype(dtype),
                                                        unique=True).output(0))

    ctx.rewrite(rewrite)
    return [take, None, None]


@position_rule("ExpandDims")
def _expand_dims(ctx, node, need):
    if need is None:
        return [None, None]
    d = int(_const(ctx, node, 1)[0]) % len(ctx.out_shape(node))
    if need.axis == d:
        raise NotPositional
    return [need.at(need.axis if need.axis < d else need.axis - 1), None]


@position_rule("Squeeze")
def _squeeze(ctx, node, need):
    if need is None:
        return [None]
    src = ctx.in_shape(node, 0)
    dims = {int(a) % len(src) for a in node.attr("squeeze_dims", [])} or {a for a, d in enumerate(src) if d == 1}
    return [need.at([a for a in range(len(src)) if a not in dims][need.axis])]
