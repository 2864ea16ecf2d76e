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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.analysis.calibration import CalibrationError, load_calibration, load_class_ids
from graphslim.errors import PassError
from graphslim.ir.graph import Graph

__all__ = ["HeadLayer", "head_layer", "imprint"]


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
