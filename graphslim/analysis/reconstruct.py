"""Least-squares reconstruction of the layers that read pruned channels (He et al. 2017; Zhang et al.
2015), and their output error against the original model.

After ``prune`` removes channels, each *sink* layer (a Conv2D or MatMul whose input channels shrank; in a
transformer also an Einsum reading a weight over the input's trailing axes, like BERT's attention output
``abcd,cde->abe``, and a BatchMatMul reading a reshaped weight, like Keras's attention output under
TensorFlow: :func:`linear_sink`) computes its output from fewer inputs. On calibration data, :func:`fit_layers` compares, at sampled
output positions, the layer's output in the **pruned** model with the **original** model's output of the
same layer (restricted to the output channels that remain), and with ``refit=True`` solves

    min ‖[P, 1]·[W; b] − Y_orig‖² + λ‖[W; b] − [W₀; b₀]‖²

in float64 (``P``: the pruned model's input patches of the layer, im2col at sampled positions; ``W₀``:
the sliced weights; λ = ``ridge`` × mean diagonal of the normal matrix, which keeps directions the data
does not see at the sliced weights). Layers are fitted in waves from input to output: a layer is
fitted once every fitted layer it depends on has its new weights, so its inputs are those of the final
pruned model. Memory is bounded: only the normal equations (D² for D inputs per output) and one batch of
activations are held (:func:`graphslim.analysis.calibration.collect`).

Three refinements after Kwon et al. 2022 (the post-training pruning of transformers), for any model:

* **Downstream layers** (:func:`downstream_layers`): the layers after the sinks read drifted inputs
  although their own channels did not change; ``prune{reconstruct=true refit=downstream}`` refits them
  too, in the same waves (the next block's projections, the classifier head, the latter on the KL
  divergence to the original's probabilities when a Softmax reads it). On the digits ViT at half the MACs
  this is most of what reconstruction recovers: the sinks alone 92.1%, with the layers after them 94.3%
  (95.8% unpruned). Not the default: as a start for ``distill`` it measured worse (resnet_digits at half
  the MACs, 5 draws: 95.81% after distill against 96.18% from the sinks-only refit).
* **Residual targets** (opt-in: ``fit_layers(residual=True)``, ``prune{residual_targets=true}``): a layer
  whose output (after its bias) only feeds ``Add(skip, ·)`` is fitted to ``sum_orig − skip_pruned`` — what
  it must add for the pruned model's residual stream to match the original's there — rather than to its
  own original output; the two agree while the skip is exact, and the former also corrects what earlier
  layers left in the stream. Measured at half the MACs (5 calibration draws): no better on the digits ViT
  (94.29% either way) or resnet_digits (94.25 against 94.29), 0.24 points worse on the layer-norm net
  (96.50 against 96.74), hence not the default.
* **Live positions** (:func:`live_positions`): output positions (tokens, feature-map rows and columns)
  whose mask gradient is zero on the calibration data reach no output — the tokens other than the class
  token after a ViT's last attention — and are left out of the fit (Kwon et al. fit the last layer on
  the class token only; here it is found from the gradients, one pass for all layers).

A layer without a bias gets one when the fitted intercept is not zero: a new ``BiasAdd`` reading a new
weight ``<kernel scope>/bias`` (trainable).

Example::

    original = g.copy()
    kept = kept_positions(changes)                   # before apply_keeps
    apply_keeps(g, changes)
    fits = fit_layers(g, original, sink_layers(g, changes), data, kept, refit=True)
    for f in fits.values():
        print(f.layer, f.error_before, f.error_after)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphslim.analysis.calibration import ConvGeometry, collect, extract_patches, patch_index
from graphslim.analysis.channels import combined_positions
from graphslim.ir import ops
from graphslim.ir.graph import WEIGHT_OP, Graph

__all__ = ["LayerFit", "LinearSink", "fit_layers", "kept_positions", "linear_sink", "sink_layers", "ridge_solve",
           "live_positions", "downstream_layers", "MAX_FEATURES"]

MAX_FEATURES = 8192  #: inputs per output above which a layer is measured but not refit (D² normal matrix)
MAX_HEAD_BYTES = 128 << 20  #: rows a softmax head keeps for its KL refit


@dataclass
class LayerFit:
    """One sink layer: relative output error on the calibration data with the sliced weights
    (``error_before``) and after the refit (``error_after``, None when not refit), rows used, and why a
    layer was not refit."""

    layer: str
    kernel: str
    error_before: float | None = None
    error_after: float | None = None
    rows: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        d = {"layer": self.layer, "kernel": self.kernel, "error_before": self.error_before,
             "error_after": self.error_after, "rows": self.rows}
        if self.note:
            d["note"] = self.note
        return d


def kept_positions(changes) -> dict:
    """``{(weight name, axis): old positions kept, in order}`` for every weight member of the
    ``(group, keep)`` changes (groups sharing a member, like Concat branches, combined). Compute it
    before :func:`~graphslim.analysis.channels.apply_keeps`."""
    parts: dict = {}
    dims: dict = {}
    for group, keep in changes:
        for m in group.members_of("weight"):
            parts.setdefault((m.name, m.axis), []).append((m.index_map, list(keep)))
            dims[(m.name, m.axis)] = m.dim
    return {k: combined_positions(dims[k], p) for k, p in parts.items()}


def sink_layers(graph: Graph, changes) -> list[str]:
    """Names of the refittable nodes (:func:`linear_sink`: ``refit=True`` in :mod:`graphslim.ir.ops`,
    Conv2D and MatMul; dense Einsums and BatchMatMuls of a reshaped weight) reading a sink kernel of the
    changed groups, in topological order (other sink ops are not refit)."""
    from graphslim.analysis.importance import sink_ops

    names = set()
    for group, keep in changes:
        if len(keep) == group.size:
            continue
        for m, node, _ in sink_ops(graph, group):
            try:
                linear_sink(graph, node)
            except ValueError:
                continue
            names.add(node.name)
    return [n.name for n in graph.nodes() if n.name in names]


@dataclass(frozen=True)
class LinearSink:
    """A layer as ``rows(x) @ matrix(kernel)``: the kernel weight's ``in_axes`` flattened (in the order of
    the input's rows: im2col patches for a convolution, the input's trailing axes otherwise) against its
    ``out_axes`` flattened (the output's trailing axes). ``conv``: the rows are im2col patches."""

    kernel: object
    in_axes: tuple
    out_axes: tuple
    conv: bool = False

    def matrix(self, value: np.ndarray) -> np.ndarray:
        order = self.in_axes + self.out_axes
        rows = int(np.prod([value.shape[a] for a in self.in_axes], dtype=np.int64))
        return np.transpose(value, order).reshape(rows, -1)

    def to_kernel(self, matrix: np.ndarray, shape: tuple) -> np.ndarray:
        order = self.in_axes + self.out_axes
        return np.transpose(matrix.reshape(tuple(shape[a] for a in order)), np.argsort(order))

    def columns(self, shape: tuple, kept: dict) -> np.ndarray | None:
        """Columns of the matrix of a kernel of ``shape`` that ``kept`` (:func:`kept_positions`) keeps
        along the output axes; None when none of them changed."""
        picks = [kept.get((self.kernel.name, a)) for a in self.out_axes]
        if all(p is None for p in picks):
            return None
        dims = [shape[a] for a in self.out_axes]
        grids = np.ix_(*[np.arange(d) if p is None else np.asarray(p, np.int64) for p, d in zip(picks, dims)])
        return np.ravel_multi_index(grids, dims).reshape(-1)


def linear_sink(graph: Graph, node) -> LinearSink:
    """``node`` as a :class:`LinearSink`, or ValueError saying why it is not refit: a ``refit`` op of
    :mod:`graphslim.ir.ops` (Conv2D NHWC, MatMul without ``transpose_a``), an Einsum whose operand 1 is a
    weight contracted with the input's trailing axes (``abcd,cde->abe``; output: the input's other axes,
    then the weight's), or a BatchMatMul (no ``adj_x``) whose operand 1 is a 2-D weight or a weight
    reshaped to a matrix by merging leading and trailing axes (``[4, 16, 64] → [64, 64]``)."""
    node = graph.node(node) if isinstance(node, str) else node
    entry = ops.facts(node.op)
    if entry is None or entry.kernel_port is None:
        raise ValueError(f"op {node.op} is not refit")
    if entry.refit:
        k = graph.weight_of(node, entry.kernel_port)
        if k is None:
            raise ValueError("its kernel is not a weight")
        if str(node.attr("data_format", "NHWC")).startswith("NC"):
            raise ValueError("NCHW convolution")
        if node.attr("transpose_a", False):
            raise ValueError(f"{node.op} with transpose_a")
        nd = k.value.ndim
        out = ops.kernel_axes(node, nd)[1]
        return LinearSink(k, tuple(a for a in range(nd) if a != out), (out,), nd == 4)
    if node.op == "Einsum":
        (x, kl), out = ops.einsum_labels(node)
        k = graph.weight_of(node, 1)
        if k is None:
            raise ValueError("its operand 1 is not a weight")
        contracted = "".join(c for c in x if c in kl and c not in out)
        free = "".join(c for c in out if c in kl and c not in x)
        batch = x[:len(x) - len(contracted)]
        if (not contracted or set(kl) != set(contracted) | set(free) or not x.endswith(contracted)
                or out != batch + free):
            raise ValueError(f"Einsum {x},{kl}->{out} is not a dense layer over the input's trailing axes")
        return LinearSink(k, tuple(kl.index(c) for c in contracted), tuple(kl.index(c) for c in free))
    if node.op.startswith("BatchMatMul"):
        if node.attr("adj_x", False):
            raise ValueError(f"{node.op} with adj_x")
        adj = bool(node.attr("adj_y", False))
        k = graph.weight_of(node, 1)
        if k is not None:
            if k.value.ndim != 2:
                raise ValueError(f"{node.op} of a {k.value.ndim}-D weight")
            return LinearSink(k, (1,), (0,)) if adj else LinearSink(k, (0,), (1,))
        src = graph.input_node(node, 1)
        k = graph.weight_of(src, 0) if src.op == "Reshape" else None
        target = graph.shape(src.output(0)) if k is not None else None
        if k is None or target is None or len(target) != 2 or None in target:
            raise ValueError(f"{node.op}'s operand 1 is not a weight reshaped to a matrix")
        if len(graph.weight_readers(k.name)) != 1 or graph.sole_consumer(src.output(0)) is None:
            raise ValueError(f"{k.name} is read elsewhere too")
        shape = k.value.shape
        split = next((i for i in range(len(shape) + 1) if int(np.prod(shape[:i], dtype=np.int64)) == target[0]), None)
        if split is None:
            raise ValueError(f"{node.op} reads {k.name} {list(shape)} reshaped to {list(target)}")
        lead, trail = tuple(range(split)), tuple(range(split, len(shape)))
        return LinearSink(k, trail, lead) if adj else LinearSink(k, lead, trail)
    raise ValueError(f"op {node.op} is not refit")


def _bias_after(graph: Graph, node):
    """``(node adding the bias, bias Weight)``: :meth:`Graph.bias_after`, or an Add/AddV2 of a weight
    nothing else reads, possibly after a Reshape that keeps the last axis (Keras's Dense under
    ``Tensordot``); else ``(None, None)``."""
    found = graph.bias_after(node)
    if found[0] is not None:
        return found
    t = node.output(0)
    use = graph.sole_consumer(t)
    if use is not None and use[0].op == "Reshape" and use[1] == 0:
        a, b = graph.shape(t), graph.shape(use[0].output(0))
        if a and b and a[-1] is not None and a[-1] == b[-1]:
            found = graph.bias_after(use[0])
            if found[0] is not None:
                return found
            t = use[0].output(0)
            use = graph.sole_consumer(t)
    if use is None or use[0].op not in ("Add", "AddV2") or use[1] != 0:
        return None, None
    w, _ = graph.sole_weight(use[0], 1)
    return (use[0], w) if w is not None else (None, None)


def _residual_add(pruned: Graph, original: Graph, out, width: int, axes: int) -> tuple:
    """``(skip tensor in pruned, sum tensor in original)`` when ``out`` (a layer's output after its bias)
    is only read by an Add/AddV2 of another activation of the same shape (a residual connection:
    ``x + f(x)``), that Add is in ``original`` too, and the sum's last ``axes`` axes hold the layer's
    ``width`` original output channels; else ``(None, None)``."""
    use = pruned.sole_consumer(out)
    if use is None or use[0].op not in ("Add", "AddV2") or use[1] not in (0, 1):
        return None, None
    add = use[0]
    skip = pruned.input(add, 1 - use[1])
    if pruned.producer(skip).op in (WEIGHT_OP, "Const"):
        return None, None
    a, b = pruned.shape(out), pruned.shape(skip)
    if a is None or b is None or list(a) != list(b) or None in list(a)[1:]:
        return None, None
    if not original.has_node(add.name) or original.node(add.name).op != add.op:
        return None, None
    osum = original.node(add.name).output(0)
    shape = original.shape(osum)
    if shape is None or None in list(shape)[1:] or len(shape) != len(a):
        return None, None
    if int(np.prod([int(d) for d in list(shape)[len(shape) - axes:]], dtype=np.int64)) != width:
        return None, None
    return skip, osum


class _PositionFisher:
    """Σ over examples of the squared mask gradient of each position along one axis."""

    def __init__(self):
        self.values = None

    def update(self, value) -> None:
        v = np.square(np.asarray(value, np.float64)).sum(axis=0)
        self.values = v if self.values is None else self.values + v


def live_positions(graph: Graph, tensors: dict, data: dict, *, batch_size: int = 32) -> dict:
    """``{key: [bool mask per position axis] }`` for ``tensors`` (``{key: (tensor, position axes)}``): the
    positions along each axis (tokens, rows and columns of a feature map) whose mask gradient is not zero
    on the calibration ``data`` (the Fisher information of a mask on each position, as
    :func:`graphslim.analysis.calibration.collect_gradients` computes it). A position no output depends
    on — a token that a classifier reading only its first token never sees after the last attention — has
    none: reconstruction leaves it out (Kwon et al. 2022 fit the last layer on the class token only). A
    tensor whose gradients are all zero (no gradient reaches it) or that cannot be differentiated is
    left out of the answer: all its positions count."""
    from graphslim.analysis.calibration import collect_gradients
    from graphslim.errors import GraphslimError

    requests = {(key, a): (t, a, _PositionFisher()) for key, (t, axes) in tensors.items() for a in axes}
    if not requests:
        return {}
    try:
        got = collect_gradients(graph, data, requests, batch_size=batch_size)
    except (GraphslimError, ValueError):
        return {}
    out = {}
    for key, (_, axes) in tensors.items():
        masks = []
        for a in axes:
            f = got[(key, a)].values
            if f is None or not np.isfinite(f).all() or f.max() <= 0:
                break
            masks.append(f > 1e-9 * f.max())
        else:
            if not all(m.all() for m in masks):
                out[key] = masks
    return out


def downstream_layers(graph: Graph, after: list[str]) -> list[str]:
    """The refittable layers (:func:`linear_sink`) that depend on one of the layers ``after`` and are not
    among them, in topological order: their own channels did not change, but their inputs did (the
    next block's projections, a classifier head). ``prune{reconstruct=true}`` refits them too, each on
    the pruned model's inputs as the layers before it left them, to the original's outputs."""
    if not after:
        return []
    down = graph.descendants(after) - set(after)
    found = []
    for node in graph.nodes():
        if node.name not in down:
            continue
        try:
            linear_sink(graph, node)
        except ValueError:
            continue
        found.append(node.name)
    return found


def ridge_solve(ff: np.ndarray, ft: np.ndarray, b0: np.ndarray, ridge: float) -> np.ndarray:
    """``argmin ‖T − F·B‖² + λ‖B − B0‖²`` from the normal equations ``FᵀF``, ``FᵀT`` (float64),
    λ = ``ridge`` × mean diagonal of ``FᵀF``."""
    d = ff.shape[0]
    lam = ridge * float(np.trace(ff)) / max(d, 1) + 1e-12
    a = ff + lam * np.eye(d)
    rhs = ft + lam * b0
    try:
        return np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, rhs, rcond=None)[0]


# ------------------------------------------------------------------------------------------ layers
class _Layer:
    """Weights and geometry of one sink layer in the pruned and the original graph."""

    def __init__(self, pruned: Graph, original: Graph, name: str, kept: dict):
        self.name = name
        node = pruned.node(name)
        self.op = node.op
        self.sink = linear_sink(pruned, node)
        self.kernel = self.sink.kernel
        onode = original.node(name)
        osink = linear_sink(original, onode)
        okernel = osink.kernel
        if okernel.name != self.kernel.name:
            raise ValueError("its kernel differs from the original's")
        self.bias_node, self.bias = _bias_after(pruned, node)
        _, obias = _bias_after(original, onode)
        k = self.kernel.value
        self.geo = ConvGeometry.of(pruned, node) if self.sink.conv else None  # im2col patches, or rows
        self.w0 = self.sink.matrix(k).astype(np.float64)
        w_orig = osink.matrix(okernel.value).astype(np.float64)
        cols = self.sink.columns(okernel.value.shape, kept)
        if cols is None:
            cols = np.arange(w_orig.shape[1])
        if len(cols) != self.w0.shape[1]:
            raise ValueError("its output channels do not match the pruned layer")
        self.w_orig = w_orig[:, cols]
        self.b_orig = None if obias is None else np.asarray(obias.value, np.float64).reshape(-1)[cols]
        self.b0 = None if self.bias is None else np.asarray(self.bias.value, np.float64).reshape(-1)
        if self.b0 is not None and self.b0.shape[0] != self.w0.shape[1]:
            raise ValueError(f"its bias {self.bias.name} does not match its output channels")
        # no bias to write an intercept into, and none can be added (several output axes): no intercept
        self.intercept = self.bias is not None or len(self.sink.out_axes) == 1
        self.x = pruned.input(node, 0)
        self.x_orig = original.input(onode, 0)
        self.cols, self.width_orig = cols, w_orig.shape[1]
        self.out = (self.bias_node or node).output(0)
        self.live = None  # per position axis of the output, the positions the model's outputs depend on
        # a layer added to a residual stream (its output + a skip): fitted to what the sum needs
        self.skip, self.sum_orig = _residual_add(pruned, original, (self.bias_node or node).output(0),
                                                 w_orig.shape[1], len(self.sink.out_axes))
        # a classifier head: MatMul (+ BiasAdd) → Softmax, all classes kept
        self.softmax = None
        if self.geo is None and len(cols) == w_orig.shape[1]:
            users = pruned.consumers((self.bias_node or node).output(0))
            if len(users) == 1 and users[0][0].op == "Softmax":
                self.softmax = users[0][0].name

    @property
    def features(self) -> int:
        return self.w0.shape[0] + 1


class _Fit:
    """Accumulator: per batch, rows of the pruned layer input and the original layer output at the same
    sampled positions; running squared error of the sliced weights and (optionally) normal equations."""

    def __init__(self, layer: _Layer, positions: int, rng: np.random.Generator, normal: bool,
                 residual: bool = False):
        self.layer, self.positions, self.rng, self.normal = layer, positions, rng, normal
        d = layer.w0.shape[0] + 1
        self.b0 = np.concatenate([layer.w0, (layer.b0 if layer.b0 is not None else
                                             np.zeros(layer.w0.shape[1]))[None]], axis=0)
        self.ff = np.zeros((d, d)) if normal else None
        self.ft = np.zeros((d, layer.w0.shape[1])) if normal else None
        self.tt = 0.0
        self.err0 = 0.0
        self.count = 0
        # a softmax head keeps its rows (bounded) for the KL refit
        self.keep_rows = normal and layer.softmax is not None
        self.max_rows = max(1, MAX_HEAD_BYTES // (8 * (d + layer.w0.shape[1])))
        self.rows_f: list = []
        self.rows_t: list = []
        self.stream = residual and layer.skip is not None
        self._inputs: list = []
        self._sums: list = []

    def _rows(self, x, index, width):
        if self.layer.geo is not None:
            p = extract_patches(x, self.layer.geo, index=index)
            return p.reshape(p.shape[0], -1).astype(np.float64)
        return x.reshape(-1, width).astype(np.float64)

    def update(self, value, reference) -> None:
        if self.stream:
            self._inputs.append((value, reference))
            self._drain()
            return
        self._add(value, reference)

    def update_residual(self, skip, total) -> None:
        """One batch of the pruned model's skip input and the original's residual sum (for a layer
        in a residual stream: :class:`_ResidualSide` feeds it); paired with :meth:`update`'s batches in
        order."""
        self._sums.append((skip, total))
        self._drain()

    def _drain(self) -> None:
        while self._inputs and self._sums:
            self._add(*self._inputs.pop(0), *self._sums.pop(0))

    def _out_rows(self, value, index, cols=None) -> np.ndarray:
        """Rows of an output-shaped tensor at the layer's sampled output positions."""
        value = np.asarray(value)
        if self.layer.geo is not None:
            n_idx, orow, ocol = index
            rows = value[n_idx, orow, ocol, :]
        else:
            width = self.layer.width_orig if cols is not None else self.layer.w0.shape[1]
            rows = value.reshape(-1, width)
        if cols is not None:
            rows = rows[:, cols]
        return rows.astype(np.float64)

    def _live_rows(self, rows: int, index) -> np.ndarray | None:
        """Which sampled rows are output positions the model's outputs depend on (None: all)."""
        live = self.layer.live
        if live is None:
            return None
        if self.layer.geo is not None:
            _, orow, ocol = index
            return live[0][orow] & live[1][ocol]
        grid = live[0]
        for m in live[1:]:
            grid = np.logical_and.outer(grid, m)
        grid = np.ravel(grid)
        if rows % grid.size:
            return None
        return np.tile(grid, rows // grid.size)

    def _add(self, value, reference, skip=None, total=None) -> None:
        value, reference = np.asarray(value), np.asarray(reference)
        index = None
        if self.layer.geo is not None:
            index = patch_index(value.shape, self.layer.geo, self.positions, self.rng)
        f = self._rows(value, index, self.layer.w0.shape[0])
        if skip is not None:  # the layer's share of the original's residual sum, given the pruned skip
            t = self._out_rows(total, index, self.layer.cols) - self._out_rows(skip, index)
        else:
            r = self._rows(reference, index, self.layer.w_orig.shape[0])
            t = r @ self.layer.w_orig
            if self.layer.b_orig is not None:
                t += self.layer.b_orig
        keep = self._live_rows(f.shape[0], index)
        if keep is not None:
            f, t = f[keep], t[keep]
        f = np.concatenate([f, np.ones((f.shape[0], 1))], axis=1)
        self.err0 += float(np.square(t - f @ self.b0).sum())
        self.tt += float(np.square(t).sum())
        self.count += f.shape[0]
        if self.normal:
            self.ff += f.T @ f
            self.ft += f.T @ t
        room = self.max_rows - sum(len(r) for r in self.rows_f)
        if self.keep_rows and room > 0:
            self.rows_f.append(f[:room])
            self.rows_t.append(t[:room])

    def residual(self, b) -> float:
        err = self.tt - 2.0 * float(np.sum(b * self.ft)) + float(np.sum(b * (self.ff @ b)))
        return max(err, 0.0)


class _ResidualSide:
    """The second stream of a residual layer's :class:`_Fit`: the pruned skip and the original's sum."""

    def __init__(self, fit: _Fit):
        self.fit = fit

    def update(self, skip, total) -> None:
        self.fit.update_residual(skip, total)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax_kl(f: np.ndarray, p: np.ndarray, b: np.ndarray) -> float:
    """Mean KL(p ‖ softmax(f·b)) over the rows (p: the original's probabilities)."""
    lq = _log_softmax(f @ b)
    with np.errstate(divide="ignore", invalid="ignore"):
        lp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    return float(np.mean(np.sum(p * (lp - lq), axis=1)))


def softmax_refit(f: np.ndarray, p: np.ndarray, b_init: np.ndarray, b0: np.ndarray, ridge: float,
                  iterations: int = 200, memory: int = 10) -> np.ndarray:
    """``argmin_B mean KL(p ‖ softmax(F·B)) + ρ/2·‖B − B0‖²`` by L-BFGS from ``b_init`` (the
    least-squares solution), ρ = ``ridge`` × mean diagonal of FᵀF/N / 4 (the curvature scale of the
    softmax loss). Convex: a multinomial logistic regression on soft targets — the classifier head's
    reconstruction when the model's output is a softmax, where matching logits in L2 wastes the fit on
    shifts and on classes the softmax ignores."""
    n, d = f.shape
    rho = ridge * float(np.einsum("ij,ij->", f, f)) / (n * d) / 4.0 + 1e-12

    def value_grad(b):
        lq = _log_softmax(f @ b)
        q = np.exp(lq)
        loss = -float(np.mean(np.sum(p * lq, axis=1))) + 0.5 * rho * float(np.sum((b - b0) ** 2))
        grad = f.T @ ((q - p) / n) + rho * (b - b0)
        return loss, grad

    b = b_init.copy()
    loss, g = value_grad(b)
    hist: list = []
    for _ in range(iterations):
        # two-loop recursion
        q_vec = g.copy()
        alphas = []
        for s_k, y_k, r_k in reversed(hist):
            a = r_k * float(np.sum(s_k * q_vec))
            alphas.append(a)
            q_vec -= a * y_k
        if hist:
            s_k, y_k, _ = hist[-1]
            q_vec *= float(np.sum(s_k * y_k)) / max(float(np.sum(y_k * y_k)), 1e-300)
        else:
            q_vec /= max(float(np.linalg.norm(g)), 1e-12)
        for (s_k, y_k, r_k), a in zip(hist, reversed(alphas)):
            beta = r_k * float(np.sum(y_k * q_vec))
            q_vec += (a - beta) * s_k
        direction = -q_vec
        slope = float(np.sum(g * direction))
        if slope >= 0:  # not a descent direction: restart from the gradient
            hist.clear()
            direction, slope = -g, -float(np.sum(g * g))
        step = 1.0
        while True:  # Armijo backtracking
            nb = b + step * direction
            nloss, ng = value_grad(nb)
            if nloss <= loss + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        if step < 1e-10:
            break
        s_k, y_k = nb - b, ng - g
        sy = float(np.sum(s_k * y_k))
        if sy > 1e-12:
            hist.append((s_k, y_k, 1.0 / sy))
            if len(hist) > memory:
                hist.pop(0)
        converged = abs(loss - nloss) <= 1e-10 * max(1.0, abs(loss))
        b, loss, g = nb, nloss, ng
        if converged or float(np.max(np.abs(g))) < 1e-8:
            break
    return b


def _solve(acc, layer: _Layer, ridge: float) -> np.ndarray:
    """The ridge refit of one layer (a layer without bias: intercept pulled to 0; one that cannot take a
    bias: none)."""
    if layer.intercept:
        return ridge_solve(acc.ff, acc.ft, acc.b0, ridge)
    w = ridge_solve(acc.ff[:-1, :-1], acc.ft[:-1], acc.b0[:-1], ridge)
    return np.concatenate([w, np.zeros((1, w.shape[1]))], axis=0)


def _depends(graph: Graph, names: list[str]) -> dict:
    """For each layer, the other layers among ``names`` it depends on."""
    s = set(names)
    return {n: (graph.ancestors([n]) - {n}) & s for n in names}


def _write(graph: Graph, layer: _Layer, b: np.ndarray) -> str:
    """Write the refit weights (and bias) into ``graph``; returns a note when a bias was added."""
    w, bias = b[:-1], b[-1]
    k = layer.kernel
    dtype = k.value.dtype
    new = layer.sink.to_kernel(w, k.value.shape)
    graph.set_weight(k.name, np.ascontiguousarray(new.astype(dtype)))
    if layer.bias is not None:
        graph.set_weight(layer.bias.name, bias.reshape(layer.bias.value.shape).astype(layer.bias.value.dtype))
        return ""
    if not np.any(bias):
        return ""
    node = graph.node(layer.name)
    scope = k.name.rsplit("/", 1)[0] if "/" in k.name else k.name
    wnode = graph.add_weight(f"{scope}/bias", bias.astype(dtype), unique=True)
    consumers = graph.consumers(node.output(0))
    outputs = [o for o in graph.outputs if o.tensor == node.output(0)]
    ba = graph.add_node(f"{layer.name}/bias_add", "BiasAdd", [node.output(0), wnode.output(0)],
                        attrs={"T": node.attr("T")}, unique=True)
    for user, port in consumers:
        graph.set_input(user, port, ba.output(0))
    for o in outputs:
        o.tensor = ba.output(0)
    return f"added bias {wnode.name}"


def fit_layers(pruned: Graph, original: Graph, layers: list[str], data: dict, kept: dict, *,
               refit: bool = True, ridge: float = 1e-3, positions: int = 64, batch_size: int = 32,
               seed: int = 0, max_bytes: int = 256 << 20, softmax_heads: bool = True,
               residual: bool = False, live_rows: bool = True) -> dict:
    """Measure (and with ``refit`` reconstruct) the sink ``layers`` of ``pruned`` against ``original``
    on calibration ``data``; ``kept`` from :func:`kept_positions`. Mutates ``pruned``'s weights when
    refitting. Returns ``{layer: LayerFit}``. Relative errors are ‖Y − Y_orig‖ / ‖Y_orig‖ over the
    sampled outputs (in-sample for the refit). A refit that does not lower the error is not applied.

    With ``softmax_heads`` a MatMul (+ BiasAdd) read only by a Softmax — a classifier head — is refit
    in two steps: least squares on the logits, then :func:`softmax_refit` on the KL divergence to the
    original's probabilities (its errors are then those of the probabilities)."""
    fits: dict = {}
    todo = []
    for name in layers:
        try:
            layer = _Layer(pruned, original, name, kept)
        except ValueError as exc:
            k = pruned.weight_of(pruned.node(name), 1)
            fits[name] = LayerFit(name, k.name if k else "", note=f"not measured: {exc}")
            continue
        if not softmax_heads:
            layer.softmax = None
        todo.append(layer)
    if not todo:
        return fits
    if refit and live_rows:
        wanted = {}
        for layer in todo:
            shape = original.shape(layer.out) if original.has_node(layer.out.node) else None
            if shape is None:
                continue
            axes = (1, 2) if layer.geo is not None else tuple(range(1, len(shape) - len(layer.sink.out_axes)))
            if axes and all(shape[a] for a in axes) and len(shape) > max(axes):
                wanted[layer.name] = (layer.out, axes)
        for name, masks in live_positions(original, wanted, data, batch_size=batch_size).items():
            next(l for l in todo if l.name == name).live = masks
    waves: list[list[_Layer]] = []
    if refit:
        deps = _depends(pruned, [l.name for l in todo])
        done: set = set()
        left = list(todo)
        while left:
            wave = [l for l in left if not (deps[l.name] - done - {x.name for x in fits})]
            if not wave:  # cannot happen in a DAG; be safe
                wave = left[:1]
            waves.append(wave)
            done |= {l.name for l in wave}
            left = [l for l in left if l.name not in done]
    else:
        waves = [todo]
    for wi, wave in enumerate(waves):
        accs = {}
        for li, layer in enumerate(wave):
            normal = refit and layer.features <= MAX_FEATURES
            fit = _Fit(layer, positions, np.random.default_rng([seed, wi, li]), normal, residual=residual and refit)
            accs[layer.name] = (layer.x, layer.x_orig, fit)
            if fit.stream:
                accs[("residual", layer.name)] = (layer.skip, layer.sum_orig, _ResidualSide(fit))
        got = collect(pruned, data, accs, reference=original, batch_size=batch_size, max_bytes=max_bytes)
        for layer in wave:
            acc = got[layer.name]
            f = LayerFit(layer.name, layer.kernel.name, rows=acc.count)
            power = acc.tt
            f.error_before = float(np.sqrt(acc.err0 / power)) if power > 0 else 0.0
            if refit and acc.normal and power > 0 and acc.keep_rows and acc.rows_f:
                # softmax head: least squares, then the KL to the original's probabilities
                rf, rt = np.concatenate(acc.rows_f), np.concatenate(acc.rows_t)
                p = np.exp(_log_softmax(rt))
                b_ls = ridge_solve(acc.ff, acc.ft, acc.b0, ridge)
                b = softmax_refit(rf, p, b_ls, acc.b0, ridge)
                kl0, kl_ls, kl1 = (softmax_kl(rf, p, x) for x in (acc.b0, b_ls, b))
                if kl_ls < kl1:
                    b, kl1 = b_ls, kl_ls
                pn = float(np.linalg.norm(p))
                f.error_before = float(np.linalg.norm(np.exp(_log_softmax(rf @ acc.b0)) - p) / pn)
                if kl1 < kl0:
                    f.error_after = float(np.linalg.norm(np.exp(_log_softmax(rf @ b)) - p) / pn)
                    f.note = f"softmax head: fitted to the original's probabilities, KL {kl0:.3g} → {kl1:.3g}"
                    note = _write(pruned, layer, b)
                    if note:
                        f.note += f"; {note}"
                else:
                    f.error_after = f.error_before
                    f.note = "refit did not lower the error: kept the sliced weights"
            elif refit and acc.normal and power > 0:
                b = _solve(acc, layer, ridge)
                err = float(np.sqrt(acc.residual(b) / power))
                if err < f.error_before:
                    f.error_after = err
                    f.note = _write(pruned, layer, b)
                else:
                    f.error_after = f.error_before
                    f.note = "refit did not lower the error: kept the sliced weights"
            elif refit:
                f.note = (f"{layer.features - 1} inputs per output (> {MAX_FEATURES}): measured, not refit"
                          if power > 0 else "zero output on the calibration data: not refit")
            fits[layer.name] = f
        if refit:
            pruned.infer_shapes()
    return fits
