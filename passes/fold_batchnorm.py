"""``fold-batchnorm``: fold inference batch norms (and any per-channel affine op) into the preceding
linear op (``linear=True`` in :mod:`graphslim.ir.ops`: Conv2D, DepthwiseConv2dNative, MatMul).

After a linear op ``y = x ⊛ W`` (optionally ``+ b`` through BiasAdd), a chain of per-channel affine ops
``y * s + t`` is folded exactly: ``W' = W · s`` (per output channel), ``b' = b · s + t``. Recognised links:

* ``FusedBatchNorm`` / ``V2`` / ``V3`` with ``is_training=false`` (TF1, tf.keras 2);
* ``Mul`` / ``AddV2`` / ``Add`` / ``Sub`` by a per-channel constant: Keras 3 writes inference batch norm as
  ``x * (gamma * rsqrt(var + eps)) + (beta - mean * gamma * rsqrt(var + eps))``; constants are
  evaluated from the weights with numpy;
* ``BiasAdd`` by a constant.

An affine chain after a channel ``ConcatV2`` folds into each branch when every branch ends in its own
single-use linear op (optionally + BiasAdd): branch ``i`` takes its slice of the scale and shift.

The kernel keeps its name; the bias becomes the existing BiasAdd's weight, or a new weight
``<layer>/bias`` next to the kernel. Batch-norm weights that are no longer read leave the model.

Constants are evaluated within a memory budget (``max_eval_mb``, checked from the shapes before
anything is allocated): a chain whose constant would be larger stops there, unfolded, and the report
says why (``over_budget``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from graphslim.analysis.constants import EVAL_BUDGET_BYTES, ConstantBudgetError, constant_value
from graphslim.ir import ops
from graphslim.pipeline import PassResult, register_pass



@dataclass(frozen=True)
class FoldBatchNormOptions:
    max_eval_mb: int = field(default=EVAL_BUDGET_BYTES // 2**20, metadata={
        "help": "memory budget (MiB) for evaluating one constant operand of a batch norm or affine op; "
                "a larger one is left unfolded (never allocated)"})

    def __post_init__(self):
        if self.max_eval_mb < 1:
            raise ValueError(f"max_eval_mb must be at least 1 (MiB), got {self.max_eval_mb}")
BN_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")


def _channel_axis(graph, node) -> int:
    axis = ops.channel_axis(node, 4)
    return 1 if axis == 1 else -1


def _per_channel(value: np.ndarray, out_rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``value`` as a length-``channels`` vector if it broadcasts along ``axis`` only, else None."""
    v = np.asarray(value, dtype=np.float64)
    if v.ndim == 0 or v.size == 1:
        return np.full(channels, float(v.reshape(-1)[0]))
    if v.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - v.ndim) + v.shape
    ax = axis % out_rank
    if any(d != 1 for i, d in enumerate(shape) if i != ax) or shape[ax] != channels:
        return None
    return v.reshape(-1)


def _sole_consumer(graph, tensor):
    users = graph.consumers(tensor)
    if len(users) != 1 or graph.is_output(tensor):
        return None
    return users[0]


class _Budget:
    """The constant-evaluation budget of one run of the pass, and the evaluations it refused."""

    def __init__(self, nbytes: int):
        self.nbytes, self.refused = nbytes, []

    def value(self, graph, tensor):
        """``constant_value`` of ``tensor`` within the budget; None (recorded) when over it."""
        try:
            return constant_value(graph, tensor, budget=self.nbytes, strict=True)
        except ConstantBudgetError as exc:
            self.refused.append({"node": exc.node, "shape": list(exc.shape), "bytes": exc.nbytes,
                                 "reason": f"{exc} Raise fold-batchnorm{{max_eval_mb=N}} to fold it on "
                                           f"a machine with that much memory."})
            return None


def _walk_affine(graph, start, axis: int, channels: int, rank: int, allow_bias_reuse: bool,
                 budget: _Budget | None = None):
    """Follow single-use per-channel affine ops from tensor ``start``.

    Returns (scale, shift, folded nodes, reusable BiasAdd or None): the chain computes
    ``start * scale + shift`` per channel."""
    value = (budget or _Budget(EVAL_BUDGET_BYTES)).value
    scale = np.ones(channels)
    shift = np.zeros(channels)
    bias_node = None  # a BiasAdd right after the linear op, whose weight can carry the new bias
    folded = []
    cur = start
    dtype = graph.dtype(start)
    while True:
        use = _sole_consumer(graph, cur)
        if use is None:
            break
        nxt, port = use
        if nxt.op == "BiasAdd" and port == 0:
            if nxt.attr("data_format", "NHWC").startswith("NC") != (axis == 1):
                break
            bv = value(graph, graph.input(nxt, 1))
            if bv is None:
                break
            b = graph.weight_of(nxt, 1)
            if allow_bias_reuse and bias_node is None and not folded and b is not None \
                    and graph.uses(graph.input(nxt, 1)) == 1:
                bias_node = nxt
            shift = shift + np.asarray(bv, np.float64).reshape(-1)
        elif nxt.op in ("Mul", "AddV2", "Add", "Sub"):
            cv = value(graph, graph.input(nxt, 1 - port))
            vec = None if cv is None else _per_channel(cv, rank, axis, channels)
            if vec is None:
                break
            if nxt.op == "Mul":
                scale, shift = scale * vec, shift * vec
            elif nxt.op == "Sub":
                if port != 0:
                    break  # c - y would flip the sign: not worth it
                shift = shift - vec
            else:
                shift = shift + vec
        elif nxt.op in BN_OPS and port == 0 and not nxt.attr("is_training", True):
            if nxt.attr("data_format", "NHWC").startswith("NC") != (axis == 1):
                break
            if any(graph.consumers(nxt.output(i)) or graph.is_output(nxt.output(i)) for i in range(1, nxt.num_outputs)):
                break
            vals = [value(graph, graph.input(nxt, i)) for i in range(1, 5)]
            if any(v is None or np.asarray(v).size != channels for v in vals):
                break
            gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in vals)
            sc = gamma / np.sqrt(var + nxt.attr("epsilon", 1e-3))
            scale, shift = scale * sc, (shift - mean) * sc + beta
        else:
            break
        if nxt.dtypes[0] != dtype:
            break
        folded.append(nxt)
        cur = nxt.output(0)
    return scale, shift, folded, bias_node


def _linear_geometry(graph, lin):
    """(channel axis, channels, rank) of a linear op's output, or None if it cannot be folded into."""
    if graph.weight_of(lin, 1) is None or graph.uses(graph.input(lin, 1)) != 1:
        return None
    if lin.op == "MatMul" and lin.attr("transpose_a", False):
        return None
    out_shape = lin.shapes[0]
    if out_shape is None:
        return None
    axis = _channel_axis(graph, lin)
    if out_shape[axis] is None or (lin.op == "Conv2D" and len(graph.shape(graph.input(lin, 1)) or ()) != 4):
        return None
    return axis, out_shape[axis], len(out_shape)


def _rewrite(graph, lin, axis, scale, shift, bias_node, last):
    """Scale ``lin``'s kernel per output channel; carry ``shift`` in ``bias_node``'s weight or a new
    BiasAdd; make ``last``'s users read the result."""
    kernel = graph.weight_of(lin, 1)
    w = kernel.value.astype(np.float64)
    w = ops.matrix_to_kernel(lin, ops.kernel_matrix(lin, w) * scale.reshape(1, -1), w.shape)
    dtype = kernel.value.dtype
    graph.set_weight(kernel.name, w.astype(dtype))
    if bias_node is not None:
        bw = graph.weight_of(bias_node, 1)
        graph.set_weight(bw.name, shift.astype(dtype).reshape(bw.value.shape))
        if last is not None and last is not bias_node:
            graph.replace_all_uses(last.output(0), bias_node.output(0))
        return bias_node
    base = kernel.name.rsplit("/", 1)[0] if "/" in kernel.name else kernel.name
    bnode = graph.add_weight(f"{base}/bias", shift.astype(dtype), trainable=kernel.trainable, unique=True)
    add = graph.add_node(f"{lin.name}/folded_bias", "BiasAdd", inputs=[lin.output(0), bnode.output(0)],
                         attrs={"T": tf.as_dtype(dtype), "data_format": "NCHW" if axis == 1 else "NHWC"},
                         unique=True)
    if last is not None:
        graph.replace_all_uses(last.output(0), add.output(0))
    else:
        graph.replace_all_uses(lin.output(0), add.output(0))
        graph.set_input(add, 0, lin.output(0))
    return add


def _fold_one(graph, lin, budget: _Budget) -> dict | None:
    geo = _linear_geometry(graph, lin)
    if geo is None:
        return None
    axis, channels, rank = geo
    scale, shift, folded, bias_node = _walk_affine(graph, lin.output(0), axis, channels, rank, True, budget)
    if not any(n.op != "BiasAdd" for n in folded):
        return None
    _rewrite(graph, lin, axis, scale, shift, bias_node, folded[-1])
    return {"layer": lin.name, "folded": [n.name for n in folded]}


def _branch_linear(graph, tensor):
    """The linear op feeding ``tensor`` directly or through one single-use BiasAdd, if foldable."""
    node = graph.producer(tensor)
    bias_node = None
    if node.op == "BiasAdd" and graph.uses(node.output(0)) == 1:
        bias_node, node = node, graph.input_node(node, 0)
        if graph.uses(node.output(0)) != 1 or graph.weight_of(bias_node, 1) is None \
                or graph.uses(graph.input(bias_node, 1)) != 1:
            return None
    if not ops.facts(node.op) or not ops.facts(node.op).linear or graph.uses(node.output(0)) != 1:
        return None
    geo = _linear_geometry(graph, node)
    return None if geo is None else (node, bias_node, geo)


def _fold_through_concat(graph, concat, budget: _Budget) -> dict | None:
    """An affine chain after a channel Concat folds into every branch's linear op, slice by slice."""
    out_shape = concat.shapes[0]
    n = concat.attr("N")
    axis_val = budget.value(graph, graph.input(concat, n))
    if out_shape is None or axis_val is None:
        return None
    rank = len(out_shape)
    axis = int(axis_val) % rank
    if axis not in (rank - 1, 1) or out_shape[axis] is None:
        return None
    branches = [_branch_linear(graph, graph.input(concat, i)) for i in range(n)]
    if any(b is None or (b[2][0] % rank) != axis for b in branches):
        return None
    channels = out_shape[axis]
    scale, shift, folded, _ = _walk_affine(graph, concat.output(0), axis - rank, channels, rank, False,
                                           budget)
    if not any(nd.op != "BiasAdd" for nd in folded):
        return None
    offset = 0
    for lin, bias_node, (_, c, _) in branches:
        sl = slice(offset, offset + c)
        b0 = np.zeros(c) if bias_node is None else \
            np.asarray(graph.weight_of(bias_node, 1).value, np.float64).reshape(-1)
        _rewrite(graph, lin, axis - rank, scale[sl], b0 * scale[sl] + shift[sl], bias_node, None)
        offset += c
    graph.replace_all_uses(folded[-1].output(0), concat.output(0))
    return {"layer": concat.name, "folded": [nd.name for nd in folded]}


@register_pass("fold-batchnorm", options=FoldBatchNormOptions)
def fold_batchnorm(graph, options: FoldBatchNormOptions | None) -> PassResult:
    """Fold inference batch norms and per-channel affine ops into the preceding conv / matmul.

    Exact up to float rounding. Example: ``--passes fold-batchnorm,dce``
    """
    options = options or FoldBatchNormOptions()
    budget = _Budget(options.max_eval_mb * 2**20)
    graph.infer_shapes()
    layers = []
    for lin in graph.nodes(op=ops.ops_where(linear=True)):
        if graph.has_node(lin.name):
            done = _fold_one(graph, lin, budget)
            if done:
                layers.append(done)
    for concat in graph.nodes(op="ConcatV2"):
        if graph.has_node(concat.name):
            done = _fold_through_concat(graph, concat, budget)
            if done:
                layers.append(done)
    removed = graph.remove_dead_nodes() if layers else []
    remaining = [n.name for n in graph.nodes(op=BN_OPS)]
    refused = list({r["node"]: r for r in budget.refused}.values())  # once per node
    stats = {"folded_layers": len(layers), "removed_nodes": len(removed),
             "batchnorms_left": len(remaining), "layers": layers}
    warnings = []
    if refused:  # constants left alone rather than allocated
        stats["over_budget"] = refused
        more = f" ({len(refused) - 1} more in the report)" if len(refused) > 1 else ""
        warnings.append(f"{refused[0]['reason']}{more}")
    return PassResult(changed=bool(layers), stats=stats, warnings=warnings)
