"""Channel rules: what each op does with a channel axis (see :mod:`graphslim.analysis.channels`).

Every rule is registered with ``@channel_rule(op, ...)`` as the ``channel`` hook of its ops in the per-op
facts table (:mod:`graphslim.ir.ops`); importing this module registers the built-in ones.
"""

from __future__ import annotations

import numpy as np

from graphslim.analysis.channel_maps import (Blocked, In, IndexMap, Link, Out, collapse_map, expand_map,
                                             map_from_labels, normalize_map, restrict_map, shift_map)
from graphslim.analysis.constants import concat_part, constant_value, vector_element
from graphslim.ir import ops
from graphslim.ir.graph import WEIGHT_OP, Graph, Node

__all__ = ["CHANNEL_RULES", "channel_rule", "UNARY", "BINARY", "elementwise_rule", "sparse_index", "slice_range",
           "concat_part", "vector_element"]


#: op type → rule ``(ctx, node, at: Link) -> list[Link]``; ``at`` is where the walk reached the node. A
#: live view of the ``channel`` hooks in the per-op facts table (:mod:`graphslim.ir.ops`).
CHANNEL_RULES = ops.hooks("channel")


def channel_rule(*op_types: str):
    """Register a channel rule for op types ``op_types`` (the ``channel`` hook of their entries in
    :mod:`graphslim.ir.ops`).

    A rule gets the walk context (``ctx.graph``, ``ctx.in_shape(node, port)``, ``ctx.const(node,
    port)``, ``ctx.shape_member(node, port)``, ``ctx.renormalizes(node)``), the node, and the
    :class:`Link` at which the channels arrive (an input port, or an output port when walking
    backwards). It returns the links the channels continue to (it may include ``at`` itself, e.g. to
    give it a role), or raises :class:`Blocked` with the reason. Example::

        @channel_rule("MyScale")              # y = x * s, per channel, like Mul
        def _my_scale(ctx, node, at):
            return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]
    """
    return ops.register_hook("channel", *op_types)


def sparse_index(node: Node, axis: int, rank: int, n_spec: int) -> int | None:
    """The entry of a StridedSlice's begin/end/strides vectors that governs input axis ``axis`` (None
    when an ellipsis covers it, or no entry does: the whole axis). Slice: the axis itself."""
    if node.op == "Slice":
        return axis
    ell = node.attr("ellipsis_mask", 0)
    if not ell:
        return axis if axis < n_spec else None
    e = (ell & -ell).bit_length() - 1  # the first ellipsis entry
    after = n_spec - e - 1
    if axis < e:
        return axis
    if axis >= rank - after:
        return e + 1 + axis - (rank - after)
    return None


def slice_range(node: Node, begin, end_or_size, dim: int, i: int) -> tuple[int, int]:
    """``[lo, hi)`` that Slice/StridedSlice ``node`` takes (stride 1) of a length-``dim`` axis whose
    begin/end entry is ``i`` (see :func:`sparse_index`)."""
    b = int(begin[i])
    if node.op == "Slice":
        size = int(end_or_size[i])
        return b, dim if size == -1 else b + size
    lo = 0 if node.attr("begin_mask", 0) >> i & 1 else (b + dim if b < 0 else min(b, dim))
    e = int(end_or_size[i])
    hi = dim if node.attr("end_mask", 0) >> i & 1 else (e + dim if e < 0 else min(e, dim))
    return lo, hi


def _channel_axis(node: Node, rank: int = 4) -> int:
    return ops.channel_axis(node, rank)


def _side(node: Node, at: Link) -> str:
    return f"{'input' if at.io == 'in' else 'output'} {at.port}"


def _not_channel(node: Node, at: Link) -> Blocked:
    return Blocked(f"axis {at.axis} of {_side(node, at)} is not an axis that {node.op} carries channel-wise")


UNARY = ("Identity", "Snapshot", "StopGradient", "PreventGradient", "CheckNumerics", "Cast",
         "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Sigmoid", "Tanh", "Softplus", "Softsign", "Erf", "Erfc",
         "Neg", "Abs", "Square", "Sqrt", "Rsqrt", "Reciprocal", "Inv", "Exp", "Expm1", "Log", "Log1p", "Sign",
         "Floor", "Ceil", "Round", "Rint", "Sin", "Cos", "IsNan", "IsFinite", "LogicalNot")
BINARY = ("AddV2", "Add", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "MulNoNan", "Maximum", "Minimum",
          "SquaredDifference", "Pow", "FloorDiv", "FloorMod", "Greater", "GreaterEqual", "Less", "LessEqual",
          "Equal", "NotEqual", "LogicalAnd", "LogicalOr", "BitwiseAnd", "BitwiseOr", "BitwiseXor")


@channel_rule(*UNARY, *BINARY, "AddN", "ClipByValue", "SelectV2")
def elementwise_rule(ctx, node, at):
    """Broadcasting element-wise ops: inputs that have the axis (not broadcast along it) and the output
    share the channels (per-channel constants, coupled activations: residual Add, x·sigmoid(x)...)."""
    out = ctx.out_shape(node)
    ins = [ctx.in_shape(node, p) for p in range(len(ctx.graph.inputs_of(node)))]
    R = len(out)
    A = at.axis + R - len(ins[at.port]) if at.io == "in" else at.axis
    if out[A] is None:
        raise Blocked(f"output axis {A} has no static length")
    if at.io == "in" and ins[at.port][at.axis] == 1 and out[A] != 1:
        raise Blocked(f"input {at.port} is broadcast along axis {at.axis}")
    links = [Out(0, A, at.imap)]
    for p, s in enumerate(ins):
        a = A - (R - len(s))
        if a < 0:
            continue
        if s[a] == out[A]:
            links.append(In(p, a, at.imap))
        elif s[a] != 1:
            raise Blocked(f"input {p} has length {s[a]} on axis {a}, the output {out[A]}")
    return links


@channel_rule("IdentityN")
def _identity_n(ctx, node, at):
    return [In(at.port, at.axis, at.imap), Out(at.port, at.axis, at.imap)]


@channel_rule("BiasAdd", "BiasAddV1")
def _bias_add(ctx, node, at):
    rank = len(ctx.in_shape(node, 0))
    ca = _channel_axis(node, rank) if node.op == "BiasAdd" else rank - 1
    if at.io == "in" and at.port == 1:
        return [In(0, ca, at.imap), Out(0, ca, at.imap), In(1, 0, at.imap)]
    links = [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]
    return links + [In(1, 0, at.imap)] if at.axis == ca else links


@channel_rule("Conv2D")
def _conv2d(ctx, node, at):
    ca = _channel_axis(node)
    x, k = ctx.in_shape(node, 0), ctx.in_shape(node, 1)
    if x[ca] is not None and k[2] is not None and x[ca] != k[2]:
        raise Blocked(f"grouped convolution (input has {x[ca]} channels, kernel {k[2]})")
    m = at.imap
    side = (at.io, at.port, at.axis)
    if side in (("in", 0, ca), ("in", 1, 2)):
        return [In(0, ca, m), In(1, 2, m, "sink")]
    if side in (("out", 0, ca), ("in", 1, 3)):
        return [Out(0, ca, m), In(1, 3, m, "source")]
    raise _not_channel(node, at)


@channel_rule("DepthwiseConv2dNative")
def _depthwise(ctx, node, at):
    """Input channel c ↔ kernel axis 2 position c ↔ output channels c·m … c·m+m−1."""
    ca = _channel_axis(node)
    mult = ctx.in_shape(node, 1)[3]
    if mult is None:
        raise Blocked("unknown depth multiplier")
    side = (at.io, at.port, at.axis)
    if side in (("in", 0, ca), ("in", 1, 2)):
        m_in = at.imap
    elif side == ("out", 0, ca):
        m_in = collapse_map(at.imap, mult)
    else:
        raise _not_channel(node, at)
    return [In(0, ca, m_in), In(1, 2, m_in), Out(0, ca, expand_map(m_in, mult))]


@channel_rule("MatMul")
def _matmul(ctx, node, at):
    """a[M,K] · b[K,N]: a's K ↔ b's K (sink), b's N ↔ output axis 1 (source), a's M ↔ output axis 0."""
    ka = 0 if node.attr("transpose_a", False) else 1
    kb = 1 if node.attr("transpose_b", False) else 0
    m = at.imap
    side = (at.io, at.port, at.axis)
    if side in (("in", 0, ka), ("in", 1, kb)):
        return [In(0, ka, m), In(1, kb, m, "sink")]
    if side in (("out", 0, 1), ("in", 1, 1 - kb)):
        return [Out(0, 1, m), In(1, 1 - kb, m, "source")]
    if side in (("out", 0, 0), ("in", 0, 1 - ka)):
        return [Out(0, 0, m), In(0, 1 - ka, m)]
    raise _not_channel(node, at)


@channel_rule("BatchMatMulV2", "BatchMatMulV3", "BatchMatMul")
def _batch_matmul(ctx, node, at):
    """x[..., M, K] · y[..., K, N] (adj_x / adj_y transpose the last two axes of x / y); batch axes
    broadcast and couple like element-wise ops."""
    rx, ry, ro = len(ctx.in_shape(node, 0)), len(ctx.in_shape(node, 1)), len(ctx.out_shape(node))
    kx = rx - 2 if node.attr("adj_x", False) else rx - 1
    ky = ry - 1 if node.attr("adj_y", False) else ry - 2
    mx, ny = (2 * rx - 3) - kx, (2 * ry - 3) - ky
    m = at.imap
    side = (at.io, at.port, at.axis)
    if side in (("in", 0, kx), ("in", 1, ky)):
        return [In(0, kx, m), In(1, ky, m, "sink")]
    if side in (("out", 0, ro - 1), ("in", 1, ny)):
        return [Out(0, ro - 1, m), In(1, ny, m, "source")]
    if side in (("out", 0, ro - 2), ("in", 0, mx)):
        return [Out(0, ro - 2, m), In(0, mx, m)]
    rank = {0: rx, 1: ry}.get(at.port) if at.io == "in" else ro
    b = at.axis + ro - rank  # a batch axis, aligned from the end
    if b < 0 or b >= ro - 2:
        raise _not_channel(node, at)
    out = ctx.out_shape(node)
    links = [Out(0, b, m)]
    for p, r in ((0, rx), (1, ry)):
        a = b - (ro - r)
        if a >= 0 and ctx.in_shape(node, p)[a] == out[b]:
            links.append(In(p, a, m))
    return links


def _reads_weight(g: Graph, node: Node, port: int) -> bool:
    """Input ``port`` of ``node`` is a weight, read directly or through Identity and Reshape (Keras's
    MultiHeadAttention reshapes its ``[in, heads, head_dim]`` kernels to matrices)."""
    src = g.input_node(node, port)
    while src.op in ("Identity", "Reshape"):
        src = g.input_node(src, 0)
    return src.op == WEIGHT_OP


@channel_rule("Einsum")
def _einsum(ctx, node, at):
    """Each axis is a label of the equation (``btd,dnh->btnh``): a channel axis goes to every operand
    axis and output axis with the same label. A label only one operand and the output have is that
    operand's output channels (a weight there is a ``source``: the heads ``n`` and head size ``h`` of a
    query kernel); a contracted label couples the operands like MatMul's K (a weight there is a
    ``sink``); a label two operands and the output have couples all three (the heads of the attention
    scores ``BTNH,BSNH->BNTS``). A label summed away from one operand, and equations with an ellipsis
    or repeated labels, block (the equation is named)."""
    try:
        operands, out = ops.einsum_labels(node)
    except ValueError as exc:
        raise Blocked(str(exc)) from None
    if at.io == "out" and at.port != 0:
        raise _not_channel(node, at)
    if len(operands) != len(ctx.graph.inputs_of(node)):
        raise Blocked(f"Einsum equation has {len(operands)} operands, the node {len(ctx.graph.inputs_of(node))}")
    shapes = [ctx.in_shape(node, p) for p in range(len(operands))]
    for labels, shape in zip(operands + [out], shapes + [ctx.out_shape(node)]):
        if len(labels) != len(shape):
            raise Blocked(f"Einsum equation labels {labels!r} do not match a tensor of rank {len(shape)}")
    label = (operands[at.port] if at.io == "in" else out)[at.axis]
    holders = [p for p, labels in enumerate(operands) if label in labels]
    eq = ",".join(operands) + "->" + out
    if label not in out and len(holders) == 1:
        raise Blocked(f"Einsum equation {eq!r} sums over label {label!r}, the channel axis of {_side(node, at)}")
    dims = {shapes[p][operands[p].index(label)] for p in holders} - {None}
    if len(dims) > 1:
        raise Blocked(f"Einsum label {label!r} has lengths {sorted(dims)} (broadcast)")
    links = [Out(0, out.index(label), at.imap)] if label in out else []
    for p in holders:
        role = None
        if _reads_weight(ctx.graph, node, p):
            role = "sink" if label not in out else "source" if len(holders) == 1 else None
        links.append(In(p, operands[p].index(label), at.imap, role))
    return links


@channel_rule("Conv2DBackpropInput")
def _conv_transpose(ctx, node, at):
    """Inputs (input_sizes, filter[h,w,out,in], x[...,in]); output channels ↔ filter axis 2 (source)."""
    ca = _channel_axis(node)
    m = at.imap
    side = (at.io, at.port, at.axis)
    if side in (("out", 0, ca), ("in", 1, 2)):
        ctx.shape_member(node, 0)
        return [Out(0, ca, m), In(1, 2, m, "source")]
    if side in (("in", 2, ca), ("in", 1, 3)):
        return [In(2, ca, m), In(1, 3, m, "sink")]
    raise _not_channel(node, at)


@channel_rule("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _fused_bn(ctx, node, at):
    """x/y channel axis ↔ scale, offset, mean, variance (and batch mean/variance outputs) axis 0."""
    ca = _channel_axis(node)
    m = at.imap
    if (at.io == "in" and at.port == 0) or (at.io == "out" and at.port == 0):
        if at.axis != ca:
            return [In(0, at.axis, m), Out(0, at.axis, m)]
    elif not (at.port in ((1, 2, 3, 4) if at.io == "in" else (1, 2)) and at.axis == 0):
        raise _not_channel(node, at)
    dim = ctx.in_shape(node, 0)[ca]
    links = [In(0, ca, m), Out(0, ca, m)]
    links += [In(p, 0, m) for p in (1, 2, 3, 4) if ctx.in_shape(node, p)[0] == dim]
    links += [Out(p, 0, m) for p in (1, 2) if p < len(node.shapes) and node.shapes[p] and node.shapes[p][0] == dim]
    return links


def _data_port(node: Node, at: Link, port: int = 0) -> None:
    if at.io == "in" and at.port != port:
        raise Blocked(f"a group tensor feeds input {at.port} (not the data input)")


@channel_rule("Pad", "PadV2", "MirrorPad")
def _pad(ctx, node, at):
    _data_port(node, at)
    pads = ctx.const(node, 1)
    if (pads[at.axis] != 0).any():
        raise Blocked(f"pads axis {at.axis}")
    return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]


@channel_rule("MaxPool", "AvgPool", "MaxPoolV2")
def _pool(ctx, node, at):
    _data_port(node, at)
    ksize = node.attr("ksize") if node.op != "MaxPoolV2" else ctx.const(node, 1).tolist()
    strides = node.attr("strides") if node.op != "MaxPoolV2" else ctx.const(node, 2).tolist()
    if ksize[at.axis] != 1 or strides[at.axis] != 1:
        raise Blocked(f"pools along axis {at.axis}")
    return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]


@channel_rule("Mean", "Sum", "Max", "Min", "Prod", "All", "Any")
def _reduce(ctx, node, at):
    """Reductions over other axes pass the channels on (axis renumbered without keep_dims)."""
    _data_port(node, at)
    rank = len(ctx.in_shape(node, 0))
    red = sorted({int(a) % rank for a in np.atleast_1d(ctx.const(node, 1))})
    keep = node.attr("keep_dims", False)
    kept_axes = list(range(rank)) if keep else [a for a in range(rank) if a not in red]
    if at.io == "in":
        if at.axis in red:
            if node.op in ("Max", "Min") and red == [at.axis]:  # the best class's score
                ctx.reduces(node, 0, at.axis)
                return []
            stat = _layernorm_stat(ctx, node, red, keep) if red == [at.axis] else None
            if stat is None:
                raise Blocked(f"reduces over axis {at.axis} (the channel axis)")
            ctx.stats[node.name] = (stat[0], ctx.graph.input(node, 0), at.axis, stat[1])
            return []
        a = at.axis
    else:
        a = kept_axes[at.axis]
        if a in red:
            raise _not_channel(node, at)
    return [In(0, a, at.imap), Out(0, kept_axes.index(a), at.imap)]


_PASS_THROUGH = ("Identity", "StopGradient", "PreventGradient", "Snapshot")  # tf.nn.moments: StopGradient


def _passes_value(g: Graph, node: Node, port: int) -> bool:
    """``node`` hands input ``port`` on unchanged but for a scalar factor: identity-like ops, and a
    ``Mul`` by a scalar constant (the correction an earlier prune put after a layer-norm mean)."""
    if node.op in _PASS_THROUGH:
        return port == 0
    if node.op == "Mul" and len(g.inputs_of(node)) == 2:
        other = constant_value(g, g.input(node, 1 - port))
        return other is not None and np.ndim(other) == 0
    return False


def _layernorm_stat(ctx, node: Node, red: list, keep_dims: bool):
    """``("mean", ())`` if ``node`` is a layer norm's ``Mean(x)`` over the channels (read by a
    ``SquaredDifference(x, ·)``), ``("variance", ((sqdiff node, port of the mean),))`` if it is
    ``Mean(SquaredDifference(x, mean))`` with such a mean, else None. Identity-like ops (tf.nn.moments
    puts a StopGradient on the mean) and scalar factors (an earlier prune's correction) may sit between
    the mean and the SquaredDifference."""
    g = ctx.graph
    if node.op != "Mean" or not keep_dims or g.is_output(node.output(0)):
        return None
    x = g.input(node, 0)
    todo, seen = [node.output(0)], set()
    while todo:
        t = todo.pop()
        for c, p in g.consumers(t):
            if _passes_value(g, c, p) and c.name not in seen:
                seen.add(c.name)
                todo.append(c.output(0))
            elif c.op == "SquaredDifference" and g.input(c, 1 - p) == x:
                return ("mean", ())
    sd = g.producer(x)
    if sd.op != "SquaredDifference" or x.port != 0:
        return None
    for p in (0, 1):
        t = g.input(sd, p)
        while True:
            prev = g.producer(t)
            port = next((q for q in range(len(g.inputs_of(prev))) if _passes_value(g, prev, q)), None)
            if port is None:
                break
            t = g.input(prev, port)
        m = g.producer(t)
        if m.op == "Mean" and t.port == 0 and m.attr("keep_dims", False) and g.input(m, 0) == g.input(sd, 1 - p):
            rank = len(ctx.in_shape(m, 0))
            if sorted({int(a) % rank for a in np.atleast_1d(ctx.const(m, 1))}) == red:
                return ("variance", ((sd.name, p),))
    return None


@channel_rule("ConcatV2", "Concat")
def _concat(ctx, node, at):
    """On the concat axis each input's channels sit at its offset; on other axes all are coupled."""
    n = len(ctx.graph.inputs_of(node)) - 1
    axis_port, data = (n, list(range(n))) if node.op == "ConcatV2" else (0, list(range(1, n + 1)))
    if at.io == "in" and at.port == axis_port:
        raise Blocked("a group tensor is the concat axis")
    rank = len(ctx.out_shape(node))
    cax = int(ctx.const(node, axis_port)) % rank
    if at.axis != cax:
        return [In(p, at.axis, at.imap) for p in data] + [Out(0, at.axis, at.imap)]
    dims = [ctx.in_shape(node, p)[cax] for p in data]
    if any(d is None for d in dims):
        raise Blocked("an input has no static length on the concat axis")
    offsets = np.concatenate([[0], np.cumsum(dims)]).astype(int)
    out_map = at.imap if at.io == "out" else shift_map(at.imap, offsets[data.index(at.port)])
    links = [Out(0, cax, out_map)]
    for i, p in enumerate(data):
        part = restrict_map(out_map, offsets[i], offsets[i + 1], f"concat input {p}")
        if part.present.any():
            links.append(In(p, cax, part))
    return links


@channel_rule("Split", "SplitV")
def _split(ctx, node, at):
    value_port, dim_port = (1, 0) if node.op == "Split" else (0, 2)
    _data_port(node, at, value_port)
    rank = len(ctx.in_shape(node, value_port))
    sax = int(ctx.const(node, dim_port)) % rank
    if at.axis == sax:
        raise Blocked(f"splits along axis {sax}, the channel axis")
    return [In(value_port, at.axis, at.imap)] + [Out(i, at.axis, at.imap) for i in range(node.num_outputs)]


def _concrete(shape: tuple, fill: int) -> list:
    return [fill if d is None else int(d) for d in shape]


def _complete(known_side: list, other: tuple) -> list | None:
    """``other`` with its one unknown dim solved so that both sides hold the same element count."""
    total = int(np.prod(known_side))
    d = list(other)
    unknown = [i for i, x in enumerate(d) if x is None]
    known = int(np.prod([x for x in d if x is not None]))
    if len(unknown) > 1:
        return None
    if unknown:
        if known == 0 or total % known:
            return None
        d[unknown[0]] = total // known
    elif known != total:
        return None
    return d


def _concretize(src: tuple, dst: tuple, fill: int) -> tuple[list, list]:
    """Concrete ``(src, dst)`` shapes of a reshape: the unknown dims of one side set to ``fill`` and the
    other side's one unknown dim solved (``[N,H,W,C] → [N·H·W, C]`` works from either side)."""
    for a, b, flip in ((src, dst, False), (dst, src, True)):
        x = _concrete(a, fill)
        y = _complete(x, b)
        if y is not None:
            return (y, x) if flip else (x, y)
    if sum(d is None for d in src) > 1 and sum(d is None for d in dst) > 1:
        raise Blocked("more than one dim has no static length on both sides")
    raise Blocked("element counts do not match")


def _unsqueeze_axis(src: tuple, src_axis: int, dst: tuple) -> int | None:
    """The destination axis of ``src_axis`` when the reshape only adds or drops size-1 dims (batch-norm
    parameters ``[C] → [1, 1, 1, C]``, ``[N, C] → [N, 1, 1, C]``), else None (take the general path)."""
    if src[src_axis] == 1 or sum(d is None for d in src) > 1 or sum(d is None for d in dst) > 1:
        return None
    s_keep = [i for i, d in enumerate(src) if d != 1]
    d_keep = [i for i, d in enumerate(dst) if d != 1]
    if [src[i] for i in s_keep] != [dst[i] for i in d_keep]:
        return None
    return d_keep[s_keep.index(src_axis)]


def _reshape_map(src: tuple, src_axis: int, imap: IndexMap, dst: tuple, concrete=None) -> tuple[int, IndexMap]:
    """Follow channels through a row-major reshape: the destination axis whose positions each hold one
    group channel's elements (or none), and the map there. Checked with batch (unknown dims) 1 and 2.
    ``concrete(fill)`` may give the concrete ``(src, dst)`` shapes for unknown dims taken as ``fill``
    (when both sides have several unknown dims, e.g. from the reshape's computed target vector)."""
    fast = _unsqueeze_axis(tuple(src), src_axis, tuple(dst))
    if fast is not None:
        return fast, imap
    found = []
    for fill in (1, 2):
        pair = concrete(fill) if concrete is not None else None
        s, d = pair if pair is not None else _concretize(src, dst, fill)
        lab = np.full(s[src_axis], -1, dtype=np.int64)
        valid = imap.rows >= 0
        lab[imap.rows[valid]] = np.nonzero(valid)[0]
        view = [1] * len(s)
        view[src_axis] = s[src_axis]
        labels = np.broadcast_to(lab.reshape(view), s).reshape(d)
        cands = []
        for b in range(len(d)):
            if dst[b] is None or d[b] == 0:
                continue
            mat = np.moveaxis(labels, b, 0).reshape(d[b], -1)
            if mat.shape[1] and (mat == mat[:, :1]).all():
                cands.append(b)
        if not cands:
            raise Blocked("the channel axis is split or merged with another axis in a way that does not "
                          "factorize (no output axis holds whole channels)")
        same = len(dst) - len(src) + src_axis
        b = same if same in cands else next((c for c in cands if d[c] > 1), cands[0])
        col = np.moveaxis(labels, b, 0).reshape(d[b], -1)[:, 0]
        found.append((b, map_from_labels(col, imap.size, f"output axis {b}")))
    if found[0][0] != found[1][0] or found[0][1] != found[1][1]:
        raise Blocked("where the channels land depends on the batch size")
    return found[0]


@channel_rule("Reshape")
def _reshape(ctx, node, at):
    """Index arithmetic: Flatten (channel c → positions p·C + c), detection heads ([N,H,W,A·(K+1)] →
    [N,H·W·A,K+1]: class k ↔ channels a·(K+1)+k), per-class boxes ([N,4K] → [N,K,4]: class k ↔ columns
    4k…4k+3), BN weights reshaped to [1,1,1,C]. The shape input is rebuilt (a ``reshape`` member)."""
    _data_port(node, at)
    src, dst = ctx.in_shape(node, 0), ctx.out_shape(node)

    def concrete(fill, flip=False):
        pair = _reshape_concrete(ctx.graph, node, src, dst, fill)
        return None if pair is None else (pair[::-1] if flip else pair)

    if at.io == "in":
        b, m = _reshape_map(src, at.axis, at.imap, dst, concrete)
        links = [In(0, at.axis, at.imap), Out(0, b, m)]
    else:
        b = at.axis
        a, m = _reshape_map(dst, at.axis, at.imap, src, lambda fill: concrete(fill, flip=True))
        links = [In(0, a, m), Out(0, at.axis, at.imap)]
    ctx.shape_member(node, 1, b)
    return links


def _reshape_concrete(graph: Graph, node: Node, src: tuple, dst: tuple, fill: int):
    """Concrete ``(src, dst)`` of a Reshape whose target vector is computed at run time from its
    input's shape (Keras: ``Reshape((-1, K))`` packs ``shape(x)[0]``, -1 and K), when the output has
    more than one unknown dim: the input's unknown dims are taken as ``fill``, 2·fill+1, ... (distinct,
    so that no two coincide by accident) and the target vector is evaluated for that input shape.
    None when it cannot be evaluated."""
    if sum(d is None for d in dst) <= 1:
        return None
    sizes = iter([fill] + [2 * fill + 1 + 2 * i for i in range(len(src))])
    s = [next(sizes) if d is None else int(d) for d in src]
    vec = constant_value(graph, graph.input(node, 1), assume={graph.input(node, 0): s})
    if vec is None:
        return None
    d = [int(v) for v in np.atleast_1d(vec)]
    if len(d) != len(dst) or d.count(-1) > 1:
        return None
    if -1 in d:
        known = int(np.prod([v for v in d if v != -1]))
        if known == 0 or int(np.prod(s)) % known:
            return None
        d[d.index(-1)] = int(np.prod(s)) // known
    if int(np.prod(d)) != int(np.prod(s)) or any(b is not None and b != v for b, v in zip(dst, d)):
        return None
    return s, d


@channel_rule("Transpose")
def _transpose(ctx, node, at):
    _data_port(node, at)
    perm = [int(p) for p in ctx.const(node, 1)]
    if at.io == "in":
        return [In(0, at.axis, at.imap), Out(0, perm.index(at.axis), at.imap)]
    return [In(0, perm[at.axis], at.imap), Out(0, at.axis, at.imap)]


@channel_rule("Squeeze")
def _squeeze(ctx, node, at):
    src = ctx.in_shape(node, 0)
    dims = {int(d) % len(src) for d in (node.attr("squeeze_dims") or [])}
    if not dims:
        dims = {i for i, d in enumerate(src) if d == 1}
    kept = [i for i in range(len(src)) if i not in dims]
    a = at.axis if at.io == "in" else kept[at.axis]
    if a in dims:
        raise Blocked(f"squeezes axis {a}")
    return [In(0, a, at.imap), Out(0, kept.index(a), at.imap)]


@channel_rule("ExpandDims")
def _expand_dims(ctx, node, at):
    _data_port(node, at)
    rank = len(ctx.out_shape(node))
    d = int(ctx.const(node, 1)) % rank
    if at.io == "in":
        a = at.axis
    elif at.axis == d:
        raise _not_channel(node, at)
    else:
        a = at.axis if at.axis < d else at.axis - 1
    return [In(0, a, at.imap), Out(0, a if a < d else a + 1, at.imap)]


@channel_rule("Softmax", "LogSoftmax")
def _softmax(ctx, node, at):
    """Pass-through; over the channel axis it renormalizes (right for subset, inexact for pruning)."""
    if at.axis == len(ctx.out_shape(node)) - 1:
        ctx.renormalizes(node)
    return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]


def _slice_elements(ctx, ss: Node, rank: int) -> list[int] | None:
    """Elements of a rank-``rank`` shape vector a constant 1-D StridedSlice reads (None if unknown)."""
    try:
        b, e, s = (int(np.atleast_1d(ctx.const(ss, p))[0]) for p in (1, 2, 3))
    except Blocked:
        return None
    if ss.attr("ellipsis_mask", 0) or ss.attr("new_axis_mask", 0):
        return None
    idx = np.arange(rank)
    if ss.attr("shrink_axis_mask", 0) & 1:
        return [int(idx[b])] if -rank <= b < rank else None
    lo = None if ss.attr("begin_mask", 0) & 1 else b
    hi = None if ss.attr("end_mask", 0) & 1 else e
    return idx[slice(lo, hi, s)].tolist()


@channel_rule("Shape", "ShapeN")
def _shape(ctx, node, at):
    """Reading a group tensor's shape is fine when only other dims are used (Keras Flatten reads the
    batch size); anything reading the channel count would silently keep the old count: block."""
    t = node.output(at.port if node.op == "ShapeN" else 0)
    rank = len(ctx.in_shape(node, at.port))
    if ctx.graph.is_output(t):
        raise Blocked("the shape of a group tensor is a signature output")
    for user, port in ctx.graph.consumers(t):
        elems = None
        if user.op == "StridedSlice" and port == 0:
            elems = _slice_elements(ctx, user, rank)
        elif user.op == "GatherV2" and port == 0:  # tf.tensordot: shape(x)[free axes]
            idx = constant_value(ctx.graph, ctx.graph.input(user, 1))
            ax = constant_value(ctx.graph, ctx.graph.input(user, 2))
            if idx is not None and ax is not None and int(ax) == 0 and int(user.attr("batch_dims", 0) or 0) == 0:
                elems = [int(i) % rank for i in np.atleast_1d(idx)]
        if elems is None or at.axis in elems:
            raise Blocked(f"the shape of a group tensor is read by {user.name} ({user.op}), which may use "
                          f"the length of axis {at.axis}")
    return []


@channel_rule("Rank")
def _rank(ctx, node, at):
    return []


@channel_rule("Size")
def _size(ctx, node, at):
    raise Blocked("reads the element count of a group tensor, which changes with the channel count")


def _range_links(ctx, node, at, a: int, out_axis: int, lo: int, hi: int) -> list:
    """Links of a slice taking ``[lo, hi)`` of channel axis ``a``: the input's map restricted to the
    range and shifted to start at 0 (a ``slice`` member rebuilds begin and end)."""
    if lo == 0 and hi == ctx.in_shape(node, 0)[a]:
        return [In(0, a, at.imap), Out(0, out_axis, at.imap)]
    ctx.slice_member(node, a)
    if at.io == "in":
        part = restrict_map(at.imap, lo, hi, f"the slice [{lo}, {hi})")
        if not part.present.any():
            return []  # none of the group's channels is in the range (the other half of a split)
        return [Out(0, out_axis, part)]
    return [In(0, a, shift_map(at.imap, lo)), Out(0, out_axis, at.imap)]


@channel_rule("StridedSlice")
def _strided_slice(ctx, node, at):
    """Pass-through when the slice takes the whole channel axis (axis renumbered for shrunk axes); a
    stride-1 range of it (``x[..., 4:]`` of ``[boxes | classes]``) carries the channels in the range."""
    _data_port(node, at)
    if node.attr("new_axis_mask", 0):
        raise Blocked("StridedSlice with a new-axis mask")
    src = ctx.in_shape(node, 0)
    rank = len(src)
    begin, end, strides = (np.atleast_1d(ctx.const(node, p)).astype(int) for p in (1, 2, 3))
    shrink = node.attr("shrink_axis_mask", 0)
    index = [sparse_index(node, a, rank, len(begin)) for a in range(rank)]
    kept = [a for a in range(rank) if index[a] is None or not shrink >> index[a] & 1]
    a = at.axis if at.io == "in" else kept[at.axis]
    i = index[a]
    if i is None:
        return [In(0, a, at.imap), Out(0, kept.index(a), at.imap)]
    if shrink >> i & 1:
        if at.io == "in" and src[a] is not None and -src[a] <= begin[i] < src[a]:
            ctx.pick(node, 0, a, int(begin[i]) % src[a])
        raise Blocked(f"takes one position of axis {a} (the channel axis)")
    if strides[i] != 1 or src[a] is None:
        raise Blocked(f"slices axis {a} (the channel axis) with stride {strides[i]}")
    lo, hi = slice_range(node, begin, end, src[a], i)
    return _range_links(ctx, node, at, a, kept.index(a), lo, hi)


@channel_rule("Slice")
def _slice(ctx, node, at):
    """Whole channel axis: pass-through; a range of it (``tf.slice(scores, [0, 0, 1], [-1, -1, -1])``
    drops a background class): the channels in the range."""
    _data_port(node, at)
    a = at.axis
    b, n = (vector_element(ctx.graph, ctx.graph.input(node, p), a) for p in (1, 2))
    if b is None or n is None:
        raise Blocked(f"the begin or size of axis {a} (the channel axis) is not a constant")
    dim = ctx.in_shape(node, 0)[a]
    if dim is None:
        raise Blocked(f"slices axis {a} (the channel axis), which has no static length")
    begin, size = np.zeros(a + 1, int), np.zeros(a + 1, int)
    begin[a], size[a] = b, n
    lo, hi = slice_range(node, begin, size, dim, a)
    if lo == 0 and hi == dim and n == dim:  # the size is the channel count: rewritten with it
        ctx.count_member(node, 2, a)
    return _range_links(ctx, node, at, a, a, lo, hi)


@channel_rule("GatherV2")
def _gather(ctx, node, at):
    """Gathering along another axis passes the channels on; the batch axes of a gather with
    ``batch_dims`` couple params, indices and output. Along the channel axis it blocks; with indices
    computed at run time (the mask of each detection's class) it is a :class:`Pick`."""
    rank, irank = len(ctx.in_shape(node, 0)), len(ctx.in_shape(node, 1))
    bd = int(node.attr("batch_dims", 0) or 0) % (irank + 1)
    if at.io == "in" and at.port == 2:
        raise Blocked("a group tensor is the gather axis")
    gax = int(ctx.const(node, 2)) % rank
    nidx = irank - bd  # index dims in the output
    if at.io == "in" and at.port == 1:
        if at.axis >= bd:
            raise Blocked(f"a group tensor feeds input {at.port} (not the data input)")
        a = at.axis
    elif at.io == "in":
        a = at.axis
    elif gax <= at.axis < gax + nidx:
        raise _not_channel(node, at)
    else:
        a = at.axis if at.axis < gax else at.axis - nidx + 1
    if a == gax:
        if constant_value(ctx.graph, ctx.graph.input(node, 1)) is None:
            ctx.pick(node, 0, a, None)
        raise Blocked(f"gathers along axis {a} (the channel axis)")
    links = [In(0, a, at.imap), Out(0, a if a < gax else a + nidx - 1, at.imap)]
    return links + [In(1, a, at.imap)] if a < bd else links


@channel_rule("ArgMax", "ArgMin")
def _argmax(ctx, node, at):
    """Over the channel axis: the output holds channel indices (class ids); over another axis the
    channels pass on (that axis removed)."""
    _data_port(node, at)
    rank = len(ctx.in_shape(node, 0))
    dim = int(ctx.const(node, 1)) % rank
    if at.io == "in" and at.axis == dim:
        ctx.reduces(node, 0, dim, ids_ports=(0,))
        return []
    a = at.axis if at.io == "in" else (at.axis if at.axis < dim else at.axis + 1)
    return [In(0, a, at.imap), Out(0, a if a < dim else a - 1, at.imap)]


@channel_rule("TopKV2", "TopK")
def _top_k(ctx, node, at):
    """Over the last axis when it is the channel axis: values and indices are the best channels'
    (indices are class ids); other axes pass on to both outputs. A last axis that holds more than the
    channels (anchors × classes flattened) blocks: its indices would need decoding."""
    if at.io == "in":
        _data_port(node, at)
    rank = len(ctx.in_shape(node, 0))
    if at.axis != rank - 1:
        return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap), Out(1, at.axis, at.imap)]
    if at.io == "out" or at.imap.width != 1:
        raise Blocked("top-k over an axis that holds more than the channels (its indices are positions "
                      "that would need re-decoding)")
    ctx.reduces(node, 0, at.axis, ids_ports=(1,))
    return []


@channel_rule("CombinedNonMaxSuppression")
def _combined_nms(ctx, node, at):
    """Scores ``[N, anchors, K]`` over the class axis: NMS per class, output 2 holds class ids; boxes
    ``[N, anchors, q, 4]`` with one box per class (q = K) follow the classes."""
    if at.io != "in" or at.port not in (0, 1) or at.axis != 2:
        raise Blocked(f"axis {at.axis} of {_side(node, at)} is not the class axis")
    q = ctx.in_shape(node, 0)[2]
    k = ctx.in_shape(node, 1)[2]
    if at.port == 0 and q != k:
        raise Blocked("boxes are per class but the scores have another class count")
    ctx.reduces(node, 1, 2, ids_ports=(2,))
    return [In(0, 2, at.imap), In(1, 2, at.imap)] if q == k and q != 1 else []


@channel_rule("Tile")
def _tile(ctx, node, at):
    """Multiples of 1 pass the channels on; tiling the channel axis repeats each channel's positions
    (``c + C·j``); an axis of length 1 tiled to the channel count (one class-agnostic box per class)
    starts the channels there: its multiple is rewritten with the count."""
    _data_port(node, at)
    src = ctx.in_shape(node, 0)
    a = at.axis
    m = vector_element(ctx.graph, ctx.graph.input(node, 1), a)
    if m is None:
        raise Blocked(f"the multiple of axis {a} (input 1, element {a}) is not a constant")
    mult = {a: m}
    if mult[a] == 1:
        return [In(0, a, at.imap), Out(0, a, at.imap)]
    if at.io == "out":
        if src[a] == 1:
            ctx.count_member(node, 1, a)
            return [Out(0, a, at.imap)]
        raise Blocked(f"tiles axis {a} (the channel axis) {mult[a]} times")
    if src[a] is None:
        raise Blocked(f"tiles axis {a}, which has no static length")
    rows = at.imap.rows
    tiled = np.concatenate([np.where(rows >= 0, rows + src[a] * j, -1) for j in range(mult[a])], axis=1)
    return [Out(0, a, normalize_map(tiled))]


@channel_rule("Pack")
def _pack(ctx, node, at):
    """Stacking along a new axis: every input's channels are the output's (axis renumbered)."""
    rank = len(ctx.out_shape(node))
    axis = int(node.attr("axis", 0) or 0) % rank
    if at.io == "out":
        if at.axis == axis:
            raise _not_channel(node, at)
        a = at.axis if at.axis < axis else at.axis - 1
    else:
        a = at.axis
    n = len(ctx.graph.inputs_of(node))
    return [In(p, a, at.imap) for p in range(n)] + [Out(0, a if a < axis else a + 1, at.imap)]


@channel_rule("Unpack")
def _unpack(ctx, node, at):
    """Unstacking along another axis than the channels': every output carries them (renumbered)."""
    _data_port(node, at)
    rank = len(ctx.in_shape(node, 0))
    axis = int(node.attr("axis", 0) or 0) % rank
    a = at.axis if at.io == "in" else (at.axis if at.axis < axis else at.axis + 1)
    if a == axis:
        raise Blocked(f"unstacks along axis {a} (the channel axis)")
    return [In(0, a, at.imap)] + [Out(p, a if a < axis else a - 1, at.imap) for p in range(node.num_outputs)]


@channel_rule("Bitcast")
def _bitcast(ctx, node, at):
    """Same-width reinterpretation (float32 → int32: Keras's argmax tells -0.0 from 0.0) is
    element-wise; a width change adds or removes an axis: blocks."""
    if len(ctx.in_shape(node, 0)) != len(ctx.out_shape(node)):
        raise Blocked("changes the element width (and the rank)")
    return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]


@channel_rule("BroadcastTo")
def _broadcast_to(ctx, node, at):
    """Broadcasting other axes passes the channels on (the target shape's element for the channel axis
    is a ``count`` member); an axis of length 1 broadcast to the channel count (Keras's
    ``take_along_axis`` broadcasts one index per detection to every class) starts the channels there."""
    _data_port(node, at)
    out, src = ctx.out_shape(node), ctx.in_shape(node, 0)
    lead = len(out) - len(src)
    A = at.axis + lead if at.io == "in" else at.axis
    a = A - lead
    d = src[a] if a >= 0 else 1
    if out[A] is None:
        raise Blocked(f"output axis {A} has no static length")
    if d == out[A]:
        ctx.count_member(node, 1, A)
        return [In(0, a, at.imap), Out(0, A, at.imap)]
    if at.io == "out" and d == 1:
        ctx.count_member(node, 1, A)
        return [Out(0, A, at.imap)]
    raise Blocked(f"broadcasts axis {A} (the channel axis)")
