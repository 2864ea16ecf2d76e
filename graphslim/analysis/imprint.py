"""Imprinted classes (Qi, Brown and Lowe, "Low-Shot Learning with Imprinted Weights", CVPR 2018): the
weights of a new class computed from a few examples of it, no gradient step.

The head is the Dense (MatMul) or 1×1 Conv2D whose kernel produces the class axis; its input is the
*embedding*. For each new class, :func:`imprint` takes its examples' embeddings (spatial positions
averaged for a conv head), normalizes each, averages them and normalizes again: that direction, scaled
to the mean norm of the existing classes' weight rows, is the new row (so its logits are on the scale
of the old ones). Its bias: the old classes' mean bias, raised by just enough that each of the class's
own examples scores it at least as high as its best old class (``bias=fit``, the default), or left at
the mean (``bias=mean``). The old rows are untouched, so the old classes' logits do not change.

Example data: a ``.npz`` with the model's inputs (keyed by input name) and the key ``labels``: each
example's class id on the grown axis (``K .. K+n-1`` for ``n`` classes added to ``K``).

With unlabeled data of the old classes (``calib=``), :func:`gated_imprint` does better than Qi's rule
on a plain (not cosine-trained) softmax head, where a new row scores high on everything the ReLU
embedding makes alike. It fits a shared-covariance Gaussian model (linear discriminant analysis) to the
*features*: the head's input, and the input of the dense layer before it when there is one (the
embedding's ReLU drops what the old classes did not need, and the new classes may need it). The old
classes' means come from the calibration data labelled by the model's own predictions, each new
class's mean from its examples, and the within-class covariance is pooled over both and shrunk towards
its mean variance (:data:`SHRINK`). The new class ``k``'s logit is then

    z_k = max_j z_j + (d_k(f) - max_j d_j(f))

with ``z_j`` the untouched old logits and ``d`` the discriminants ``μᵀΣ⁻¹f - ½μᵀΣ⁻¹μ``: it beats the
old classes exactly where the discriminant prefers the new class, and among the old classes the old
head still decides, so the old logits are identical. :func:`emit_gated` builds that branch beside the
head and joins it to the old logits with a ConcatV2; ``d_k``'s weights (``<kernel>_imprinted``) are
trainable, every other weight of the branch is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.analysis.calibration import CalibrationError, load_calibration, load_class_ids
from graphslim.errors import PassError
from graphslim.ir.graph import Graph

__all__ = ["GatedImprint", "HeadLayer", "emit_gated", "gated_imprint", "head_layer", "imprint"]

SHRINK = 0.01  # ridge on the pooled covariance, as a fraction of its mean variance
MIN_CALIB = 16  # calibration examples gated imprinting needs at least


@dataclass
class HeadLayer:
    node: str  # the MatMul / Conv2D
    kernel: str  # its kernel weight
    bias: str | None  # the BiasAdd's bias weight after it, if any
    embedding: str  # its input tensor
    rows: np.ndarray  # the old classes' weight rows [K, D]
    biases: np.ndarray | None  # [K]


def head_layer(graph: Graph, group, pass_name: str = "extend") -> HeadLayer:
    """The kernel op whose output channels are the class axis of ``group`` (a channel group)."""
    for m in group.members_of("weight"):
        if m.role != "source":
            continue
        for node, port in graph.weight_readers(m.name):
            if port != 1 or node.op not in ("MatMul", "Conv2D"):
                continue
            w = graph.weights[m.name].value
            if node.op == "Conv2D" and w.shape[:2] != (1, 1):
                continue
            if node.op == "MatMul" and node.attr("transpose_a", False):
                continue
            if node.op == "MatMul":
                rows = w if node.attr("transpose_b", False) else w.T
            else:
                rows = w.reshape(-1, w.shape[-1]).T
            _, bias = graph.bias_after(node)
            return HeadLayer(node.name, m.name, bias.name if bias is not None else None,
                             str(graph.input(node, 0)), np.asarray(rows, np.float64),
                             None if bias is None else np.asarray(bias.value, np.float64).reshape(-1))
    raise PassError(f"{pass_name}: examples= imprints new classes into a Dense or 1×1 convolution head; "
                    f"the class axis of this model is not produced by one (group {group.name})")


def _examples(path: str, graph: Graph, key: str, first: int, n: int) -> tuple[dict, np.ndarray]:
    data = load_calibration(path, graph)
    count = len(next(iter(data.values())))
    need = f"integer class ids of shape [{count}] (one per example), each in {first}..{first + n - 1} (the new classes)"
    y = load_class_ids(path, key, count, need, f"examples={path}")
    bad = sorted(set(y.tolist()) - set(range(first, first + n)))
    if bad:
        raise CalibrationError(f"examples={path}: {key!r} holds class ids {bad[:5]} outside the new classes; it "
                               f"needs {need}")
    missing = [c for c in range(first, first + n) if not (y == c).any()]
    if missing:
        raise CalibrationError(f"examples={path}: no example of new class(es) {missing} under {key!r}; every new "
                               "class needs at least one example")
    return data, y


def imprint(graph: Graph, head: HeadLayer, path: str, key: str, first: int, n: int,
            bias: str = "fit") -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The new rows ``[n, D]`` and biases ``[n]`` (None without a bias) of ``n`` classes from the
    examples in ``path``; and stats (examples per class, the bias raise)."""
    from graphslim.runtime import run

    data, y = _examples(path, graph, key, first, n)
    emb = np.asarray(run(graph, data, fetch=[head.embedding])[head.embedding], np.float64)
    if emb.ndim == 4:  # a 1×1 conv head: its logits averaged over positions are linear in the mean
        emb = emb.mean(axis=(1, 2))
    emb = emb.reshape(len(y), -1)
    if emb.shape[1] != head.rows.shape[1]:
        raise PassError(f"extend: the head {head.node} reads {emb.shape[1]} features but its kernel has "
                        f"{head.rows.shape[1]} rows")
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    scale = float(np.linalg.norm(head.rows, axis=1).mean())
    rows = np.zeros((n, emb.shape[1]))
    for c in range(n):
        mean = unit[y == first + c].mean(axis=0)
        rows[c] = scale * mean / max(np.linalg.norm(mean), 1e-12)
    biases, raised = None, []
    if head.biases is not None:
        base = float(head.biases.mean())
        biases = np.full(n, base)
        if bias == "fit":  # each example of the class scores it at least as high as its best old class
            best_old = (emb @ head.rows.T + head.biases).max(axis=1)
            for c in range(n):
                mine = y == first + c
                biases[c] = max(base, float((best_old[mine] - emb[mine] @ rows[c]).max()))
                raised.append(biases[c] - base)
    stats = {"examples": {str(first + c): int((y == first + c).sum()) for c in range(n)},
             "row_scale": scale, "bias": bias, "bias_raise": raised, "embedding": head.embedding,
             "head": head.node}
    return rows, biases, stats


# Ops a feature passes through unchanged per element on the way back from the head's input to the
# dense layer before it (Keras: MatMul → BiasAdd or AddV2 of the bias → activation).
_PER_ELEMENT = ("Relu", "Relu6", "Elu", "Selu", "Gelu", "Tanh", "Sigmoid", "Softplus", "LeakyRelu", "Identity",
                "BiasAdd", "Add", "AddV2")


def _pre_embedding(graph: Graph, tensor: str) -> str | None:
    """The input of the Dense (MatMul) whose output, through per-element ops, is ``tensor``; None when
    there is none (or it is not a batch of vectors)."""
    node = graph.producer(tensor)
    for _ in range(8):
        if node.op == "MatMul" and not node.attr("transpose_a", False) and graph.weight_of(node, 1) is not None:
            pre = graph.input(node, 0)
            shape = graph.shape(pre)
            return str(pre) if shape is not None and len(shape) == 2 else None
        if node.op not in _PER_ELEMENT:
            return None
        if node.op in ("Add", "AddV2", "BiasAdd"):
            if graph.weight_of(node, 1) is None and graph.constant_value(graph.input(node, 1)) is None:
                return None
        node = graph.input_node(node, 0)
    return None


@dataclass
class GatedImprint:
    features: list  # the tensors concatenated into the feature vector f
    logits: str  # the head's old logits [N, K]
    old_w: np.ndarray  # [D, K'] discriminant weights of the old classes seen in the calibration data
    old_b: np.ndarray  # [K']
    new_w: np.ndarray  # [D, n]
    new_b: np.ndarray  # [n]


def gated_imprint(graph: Graph, head: HeadLayer, logits: str, path: str, key: str, first: int, n: int,
                  calib: str, calib_samples: int = 512, shrink: float = SHRINK) -> tuple[GatedImprint, dict]:
    """The discriminant branch of :func:`emit_gated` for ``n`` classes from the examples in ``path``
    and unlabeled old-class data ``calib``; and stats."""
    from graphslim.runtime import Runner

    shape = graph.shape(logits)
    if shape is None or len(shape) != 2:
        raise PassError(f"extend: calib= imprinting reads a head whose logits are a batch of vectors [N, K]; "
                        f"{logits} has shape {shape}. Leave out calib= to imprint by Qi's rule.")
    data, y = _examples(path, graph, key, first, n)
    cal = load_calibration(calib, graph, max_examples=calib_samples)
    count = len(next(iter(cal.values())))
    if count < MIN_CALIB:
        raise CalibrationError(f"calib={calib}: {count} example(s); imprinting needs at least {MIN_CALIB} "
                               "unlabeled examples of the old classes to estimate their features' statistics")
    pre = _pre_embedding(graph, head.embedding)
    features = [head.embedding] + ([pre] if pre is not None else [])
    with Runner(graph) as r:
        out_c = _batched(r, cal, features + [logits])
        out_x = _batched(r, data, features)
    fc = np.concatenate([out_c[f].reshape(count, -1) for f in features], axis=1)
    fx = np.concatenate([out_x[f].reshape(len(y), -1) for f in features], axis=1)
    pseudo = out_c[logits].argmax(axis=1)
    seen = sorted(set(pseudo.tolist()))
    old_means = np.stack([fc[pseudo == j].mean(axis=0) for j in seen])
    new_means = np.stack([fx[y == first + c].mean(axis=0) for c in range(n)])
    resid = np.concatenate([fc - old_means[np.searchsorted(seen, pseudo)], fx - new_means[y - first]])
    cov = resid.T @ resid / len(resid)
    dim = cov.shape[0]
    cov += (shrink * np.trace(cov) / dim + 1e-12) * np.eye(dim)
    prec = np.linalg.inv(cov)

    def discriminant(means):
        w = prec @ means.T
        return w, -0.5 * np.einsum("kd,dk->k", means, w)

    old_w, old_b = discriminant(old_means)
    new_w, new_b = discriminant(new_means)
    gate_x = fx @ new_w + new_b - (fx @ old_w + old_b).max(axis=1, keepdims=True)
    gate_c = fc @ new_w + new_b - (fc @ old_w + old_b).max(axis=1, keepdims=True)
    stats = {"method": "discriminant", "features": features, "feature_dims": int(dim), "calib_examples": count,
             "old_classes_seen": len(seen), "examples": {str(first + c): int((y == first + c).sum()) for c in range(n)},
             "shrink": shrink, "head": head.node,
             # how the branch scores what it was built from: examples won by their own class, and the
             # fraction of the old-class calibration data a new class would take
             "examples_recognised": float((gate_x.argmax(axis=1) == y - first)[gate_x.max(axis=1) > 0].sum() / len(y)),
             "calib_taken": float((gate_c.max(axis=1) > 0).mean())}
    if len(seen) < head.rows.shape[0]:
        stats["note"] = (f"{head.rows.shape[0] - len(seen)} old class(es) predicted for none of the calibration "
                         "examples: the gate does not compare the new classes with them")
    return GatedImprint(features, logits, old_w, old_b, new_w, new_b), stats


def _batched(runner, data: dict, fetch: list, batch: int = 256) -> dict:
    count = len(next(iter(data.values())))
    parts: dict = {f: [] for f in fetch}
    for i in range(0, count, batch):
        out = runner.run({k: v[i:i + batch] for k, v in data.items()}, fetch)
        for f in fetch:
            parts[f].append(np.asarray(out[f], np.float64))
    return {f: np.concatenate(v) for f, v in parts.items()}


def emit_gated(graph: Graph, g: GatedImprint, name: str) -> str:
    """Build ``z_new = max z_old + (f W_new + b_new) - max(f W_old + b_old)`` beside the head and return
    the ConcatV2 of the old logits and ``z_new`` (its consumers are the caller's to redirect). Weights:
    ``<name>_imprinted`` / ``<name>_imprinted_bias`` (trainable) and ``<name>_gate`` /
    ``<name>_gate_bias`` (not)."""
    import tensorflow as tf

    dtype = graph.dtype(g.logits)
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype
    attrs = {"T": tf.as_dtype(dtype)}
    scope = graph.unique_name(f"{graph.producer(g.logits).name}/imprinted")
    if len(g.features) > 1:
        axis = graph.add_const(f"{scope}/features_axis", np.int32(1), unique=True)
        feats = graph.add_node(f"{scope}/features", "ConcatV2", list(g.features) + [f"{axis.name}:0"],
                               {"N": len(g.features), "T": tf.as_dtype(dtype), "Tidx": tf.int32}).output(0)
    else:
        feats = g.features[0]

    def dense(tag, w, b, trainable):
        wn = graph.add_weight(f"{name}_{tag}", np.ascontiguousarray(w.astype(np_dtype)), trainable=trainable,
                              unique=True)
        bn = graph.add_weight(f"{name}_{tag}_bias", np.ascontiguousarray(b.astype(np_dtype)), trainable=trainable,
                              unique=True)
        mm = graph.add_node(f"{scope}/{tag}_matmul", "MatMul", [feats, wn.output(0)],
                            {**attrs, "transpose_a": False, "transpose_b": False})
        return graph.add_node(f"{scope}/{tag}", "BiasAdd", [mm.output(0), bn.output(0)],
                              {**attrs, "data_format": b"NHWC"}).output(0)

    def row_max(tensor, tag):
        axis = graph.add_const(f"{scope}/{tag}_axis", np.int32(-1), unique=True)
        return graph.add_node(f"{scope}/{tag}", "Max", [tensor, f"{axis.name}:0"],
                              {**attrs, "Tidx": tf.int32, "keep_dims": True}).output(0)

    new = dense("imprinted", g.new_w, g.new_b, True)
    old = dense("gate", g.old_w, g.old_b, False)
    shift = graph.add_node(f"{scope}/shift", "Sub", [row_max(g.logits, "logits_max"), row_max(old, "gate_max")],
                           attrs).output(0)
    z_new = graph.add_node(f"{scope}/logits", "AddV2", [new, shift], attrs).output(0)
    axis = graph.add_const(f"{scope}/axis", np.int32(-1), unique=True)
    concat = graph.add_node(f"{scope}/concat", "ConcatV2", [g.logits, z_new, f"{axis.name}:0"],
                            {"N": 2, "T": tf.as_dtype(dtype), "Tidx": tf.int32})
    return concat.output(0)
