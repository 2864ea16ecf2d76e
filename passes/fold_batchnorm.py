"""``fold-batchnorm``: fold inference batch norms (and any per-channel affine op) into the preceding
Conv2D / DepthwiseConv2dNative / MatMul.

After a linear op ``y = x ⊛ W`` (optionally ``+ b`` through BiasAdd), a chain of per-channel affine ops
``y * s + t`` is folded exactly: ``W' = W · s`` (per output channel), ``b' = b · s + t``. Recognised links:

* ``FusedBatchNorm`` / ``V2`` / ``V3`` with ``is_training=false`` (TF1, tf.keras 2);
* ``Mul`` / ``AddV2`` / ``Add`` / ``Sub`` by a per-channel constant: Keras 3 writes inference batch norm as
  ``x * (gamma * rsqrt(var + eps)) + (beta - mean * gamma * rsqrt(var + eps))``; constants are
  evaluated from the weights with numpy;
* ``BiasAdd`` by a constant.

The kernel keeps its name; the bias becomes the existing BiasAdd's weight, or a new weight
``<layer>/bias`` next to the kernel. Batch-norm weights that are no longer read leave the model.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphslim.analysis.constants import constant_value
from graphslim.pipeline import PassResult, register_pass

LINEAR_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul")
BN_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")


def _channel_axis(graph, node) -> int:
    if node.op == "MatMul":
        return -1
    fmt = node.attr("data_format", "NHWC")
    return 1 if fmt.startswith("NC") else -1


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


def _fold_one(graph, lin) -> dict | None:
    kernel = graph.weight_of(lin, 1)
    if kernel is None or graph.uses(graph.input(lin, 1)) != 1:
        return None
    if lin.op == "MatMul" and lin.attr("transpose_a", False):
        return None
    out_shape = lin.shapes[0]
    if out_shape is None:
        return None
    axis = _channel_axis(graph, lin)
    channels = out_shape[axis]
    if channels is None:
        return None
    rank = len(out_shape)
    scale = np.ones(channels)
    shift = np.zeros(channels)
    bias_node = None  # an existing BiasAdd directly after the linear op, whose weight we reuse
    folded = []
    cur = lin.output(0)
    while True:
        use = _sole_consumer(graph, cur)
        if use is None:
            break
        nxt, port = use
        if nxt.op == "BiasAdd" and port == 0:
            if nxt.attr("data_format", "NHWC").startswith("NC") != (axis == 1):
                break
            b = graph.weight_of(nxt, 1)
            bv = constant_value(graph, graph.input(nxt, 1))
            if bv is None:
                break
            if bias_node is None and not folded and b is not None and graph.uses(graph.input(nxt, 1)) == 1:
                bias_node = nxt
            shift = shift + np.asarray(bv, np.float64).reshape(-1)
            folded.append(nxt)
        elif nxt.op in ("Mul", "AddV2", "Add", "Sub"):
            other = graph.input(nxt, 1 - port)
            cv = constant_value(graph, other)
            if cv is None:
                break
            vec = _per_channel(cv, rank, axis, channels)
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
            folded.append(nxt)
        elif nxt.op in BN_OPS and port == 0 and not nxt.attr("is_training", True):
            if nxt.attr("data_format", "NHWC").startswith("NC") != (axis == 1):
                break
            if any(graph.consumers(nxt.output(i)) or graph.is_output(nxt.output(i)) for i in range(1, nxt.num_outputs)):
                break
            vals = [constant_value(graph, graph.input(nxt, i)) for i in range(1, 5)]
            if any(v is None or np.asarray(v).size != channels for v in vals):
                break
            gamma, beta, mean, var = (np.asarray(v, np.float64).reshape(-1) for v in vals)
            s = gamma / np.sqrt(var + nxt.attr("epsilon", 1e-3))
            scale, shift = scale * s, (shift - mean) * s + beta
            folded.append(nxt)
        else:
            break
        cur = nxt.output(0)
        if nxt.dtypes[0] != lin.dtypes[0]:
            break
    if not folded or all(n.op == "BiasAdd" for n in folded):
        return None
    # Rewrite: scale the kernel per output channel, and one BiasAdd carries the shift.
    w = kernel.value.astype(np.float64)
    if lin.op == "Conv2D":
        w = w * scale.reshape(1, 1, 1, -1) if w.ndim == 4 else None
    elif lin.op == "DepthwiseConv2dNative":
        kh, kw, cin, mult = w.shape
        w = (w.reshape(kh, kw, cin * mult) * scale).reshape(kh, kw, cin, mult)
    else:
        w = w * (scale.reshape(-1, 1) if lin.attr("transpose_b", False) else scale.reshape(1, -1))
    if w is None:
        return None
    dtype = kernel.value.dtype
    graph.set_weight(kernel.name, w.astype(dtype))
    last = folded[-1]
    if bias_node is not None:
        bw = graph.weight_of(bias_node, 1)
        graph.set_weight(bw.name, shift.astype(dtype).reshape(bw.value.shape))
        if last is not bias_node:
            graph.replace_all_uses(last.output(0), bias_node.output(0))
    else:
        base = kernel.name.rsplit("/", 1)[0] if "/" in kernel.name else kernel.name
        bnode = graph.add_weight(f"{base}/bias", shift.astype(dtype), trainable=kernel.trainable, unique=True)
        add = graph.add_node(f"{lin.name}/folded_bias", "BiasAdd", inputs=[lin.output(0), bnode.output(0)],
                             attrs={"T": tf.as_dtype(dtype),
                                    "data_format": "NCHW" if axis == 1 else "NHWC"}, unique=True)
        graph.replace_all_uses(last.output(0), add.output(0))
    return {"layer": lin.name, "folded": [n.name for n in folded]}


@register_pass("fold-batchnorm")
def fold_batchnorm(graph, options) -> PassResult:
    """Fold inference batch norms and per-channel affine ops into the preceding conv / matmul.

    Exact up to float rounding. Example: ``--passes fold-batchnorm,dce``
    """
    graph.infer_shapes()
    layers = []
    for lin in graph.nodes(op=LINEAR_OPS):
        if graph.has_node(lin.name):
            done = _fold_one(graph, lin)
            if done:
                layers.append(done)
    removed = graph.remove_dead_nodes() if layers else []
    remaining = [n.name for n in graph.nodes(op=BN_OPS)]
    return PassResult(changed=bool(layers), stats={
        "folded_layers": len(layers), "removed_nodes": len(removed),
        "batchnorms_left": len(remaining), "layers": layers})
