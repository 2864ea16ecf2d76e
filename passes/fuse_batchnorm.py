"""``fuse-batchnorm``: rewrite Keras 3's element-wise inference batch norm into one ``FusedBatchNormV3``
that reads the same variables, so that TensorFlow's grappler fuses ``Conv2D + BatchNorm (+ Relu)``
into one kernel at run time.

Keras 3 writes an inference batch norm as ``tf.nn.batch_normalization`` does::

    inv = rsqrt(moving_variance + eps) * gamma
    y   = x * inv + (beta - moving_mean * inv)        # or  + (-(moving_mean * inv))  without beta

that is two passes over the activation (``Mul``, ``AddV2``) plus four small ops per layer, which the
runtime cannot fuse into the convolution. ``FusedBatchNormV3(x, gamma, beta, moving_mean,
moving_variance, epsilon, is_training=false)`` computes the same function (equal up to float rounding)
and the grappler remapper turns ``Conv2D → FusedBatchNormV3 → Relu`` into one ``_FusedConv2D`` on CPU.

When the batch norm follows ``Conv2D → BiasAdd`` (Keras convs with ``use_bias=True``, as in ResNet50),
the bias moves into the mean — ``x + b − μ = x − (μ − b)``, the mean input becomes ``Sub(μ, b)`` — so
that the Conv2D meets the batch norm directly; otherwise the runtime fuses Conv2D with the BiasAdd and
runs the batch norm alone, which is slower than the element-wise form. Parameters reshaped to
``[1, 1, 1, C]`` (Keras with an explicit ``axis=3``) are read at their ``[C]`` source.

Unlike ``fold-batchnorm``, nothing is folded: the batch-norm variables (and a conv bias) stay, with
their names and trainable flags, so the emitted model fine-tunes like the original (the batch norm stays
in inference mode, as in the original serving function). Matched only for NHWC 4-D float32
activations with per-channel float32 parameters; anything else is left as it is.

Example: ``graphslim optimize model/ -o out/ --passes fuse-batchnorm``
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphslim.pipeline import PassResult, register_pass


def _vector(graph, tensor, channels: int):
    """The ``[channels]`` float32 weight or constant behind ``tensor``: itself, or the source of a
    Reshape to ``[1, 1, 1, channels]`` (Keras reshapes the parameters when ``axis=3`` is explicit, as in
    ResNet50); else None."""
    node = graph.producer(tensor)
    if node.op == "Reshape" and graph.shape(tensor) == (1, 1, 1, channels):
        tensor = graph.input(node, 0)
        node = graph.producer(tensor)
    if node.op not in ("Weight", "Const"):
        return None
    if graph.shape(tensor) != (channels,) or graph.dtype(tensor) != np.float32:
        return None
    return tensor


def _other(graph, node, tensor):
    """The input of the binary ``node`` that is not ``tensor``."""
    a, b = graph.inputs_of(node)
    return b if a == tensor else a if b == tensor else None


def _match(graph, out):
    """Match ``out = x * inv + shift`` (an AddV2 node) as Keras's batch norm; returns
    ``(x, gamma, beta, mean, var, eps, nodes)`` or None. ``gamma``/``beta`` are tensors or None."""
    ins = graph.inputs_of(out)
    if len(ins) != 2:
        return None
    for mul_t, shift_t in (ins, ins[::-1]):
        mul, shift = graph.producer(mul_t), graph.producer(shift_t)
        if mul.op != "Mul" or shift.op not in ("Sub", "Neg"):
            continue
        for x, inv in (graph.inputs_of(mul), graph.inputs_of(mul)[::-1]):
            xs = graph.shape(x)
            if xs is None or len(xs) != 4 or xs[3] is None or graph.dtype(x) != np.float32:
                continue
            c = int(xs[3])
            inv_node = graph.producer(inv)
            # inv = rsqrt(var + eps) [* gamma]
            gamma = None
            rs = inv_node
            if inv_node.op == "Mul":
                a, b = graph.inputs_of(inv_node)
                if graph.producer(a).op == "Rsqrt":
                    rs, gamma = graph.producer(a), b
                elif graph.producer(b).op == "Rsqrt":
                    rs, gamma = graph.producer(b), a
                else:
                    continue
                gamma = _vector(graph, gamma, c)
                if gamma is None:
                    continue
            if rs.op != "Rsqrt":
                continue
            add = graph.input_node(rs, 0)
            if add.op not in ("AddV2", "Add"):
                continue
            a, b = graph.inputs_of(add)
            eps = graph.constant_value(b) if graph.producer(b).op == "Const" else None
            var = a
            if eps is None and graph.producer(a).op == "Const":
                eps, var = graph.constant_value(a), b
            var = _vector(graph, var, c) if eps is not None and np.size(eps) == 1 else None
            if var is None:
                continue
            # shift = beta - mean * inv   or   -(mean * inv)
            if shift.op == "Sub":
                beta, m2t = graph.inputs_of(shift)
                beta = _vector(graph, beta, c)
                if beta is None:
                    continue
            else:
                beta, m2t = None, graph.input(shift, 0)
            m2 = graph.producer(m2t)
            if m2.op != "Mul":
                continue
            mean = _other(graph, m2, inv)
            mean = None if mean is None else _vector(graph, mean, c)
            if mean is None:
                continue
            inner = [mul, shift, m2] + ([inv_node] if inv_node is not rs else []) + [rs, add]  # users first
            return x, gamma, beta, mean, var, float(np.reshape(eps, -1)[0]), inner
    return None


def elementwise_batchnorms(graph) -> list[str]:
    """Names of the element-wise batch norms (``x * inv + shift``, as Keras 3 exports them) that
    ``fuse-batchnorm`` would rewrite: their cost shrinks only linearly with pruned channels. Static
    shapes must be current (every pass leaves them so)."""
    return [n.name for n in graph.nodes(op=("AddV2", "Add")) if _match(graph, n) is not None]


@register_pass("fuse-batchnorm")
def fuse_batchnorm(graph, options) -> PassResult:
    """Rewrite element-wise inference batch norms into ``FusedBatchNormV3`` over the same variables.

    Exact up to float rounding; variables, names and trainable flags are kept.
    Example: ``--passes fuse-batchnorm``
    """
    graph.infer_shapes()
    fused, skipped, removed = [], 0, 0
    for out in graph.nodes(op=("AddV2", "Add")):
        if not graph.has_node(out.name):
            continue
        m = _match(graph, out)
        if m is None:
            continue
        x, gamma, beta, mean, var, eps, inner = m
        # x * inv (a pass over the activation) must have no other reader, else the rewrite would keep it
        # and add a batch norm beside it; the small parameter ops may be shared
        mul = inner[0]
        if graph.uses(mul.output(0)) != 1 or any(graph.is_output(n.output(0)) for n in inner):
            skipped += 1
            continue
        c = int(graph.shape(x)[3])
        # Conv2D → BiasAdd → batch norm: the bias moves into the mean (x + b − μ = x − (μ − b)), so that
        # the runtime can fuse Conv2D with the batch norm; the bias stays a variable, read by a Sub
        ba = graph.producer(x)
        if ba.op == "BiasAdd" and ba.attr("data_format", "NHWC") == "NHWC" and \
                graph.uses(ba.output(0)) == 1 and not graph.is_output(ba.output(0)):
            bias = _vector(graph, graph.input(ba, 1), c)
            if bias is not None and graph.producer(graph.input(ba, 0)).op == "Conv2D":
                sub = graph.add_node(f"{out.name}/mean_minus_bias", "Sub", [mean, bias],
                                     attrs={"T": tf.float32}, unique=True)
                x, mean = graph.input(ba, 0), sub.output(0)
                inner.append(ba)
        if gamma is None:
            gamma = graph.add_const(f"{out.name}/ones", np.ones(c, np.float32), unique=True).output(0)
        if beta is None:
            beta = graph.add_const(f"{out.name}/zeros", np.zeros(c, np.float32), unique=True).output(0)
        bn = graph.add_node(f"{out.name}/FusedBatchNormV3", "FusedBatchNormV3",
                            [x, gamma, beta, mean, var],
                            attrs={"T": tf.float32, "U": tf.float32, "epsilon": eps,
                                   "exponential_avg_factor": 1.0, "data_format": "NHWC",
                                   "is_training": False}, unique=True)
        graph.replace_all_uses(out.output(0), bn.output(0))
        fused.append(bn.name)
        todo = [out] + inner  # the element-wise nodes (users first), when nothing else reads them,
        while todo:           # then the parameter reshapes and constants they leave unread
            n = todo.pop(0)
            if graph.has_node(n.name) and not graph.consumers(n.output(0)) and not graph.is_output(n.output(0)):
                feeds = [graph.producer(t) for t in graph.inputs_of(n)]
                graph.remove_node(n)
                removed += 1
                todo += [f for f in feeds if f.op in ("Reshape", "Const")]
    if fused:
        graph.infer_shapes()
    return PassResult(changed=bool(fused), stats={"fused": len(fused), "skipped": skipped,
                                                  "removed_nodes": removed})
