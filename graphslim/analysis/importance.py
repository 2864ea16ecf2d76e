"""Channel importance criteria for ``prune``: a registry of scoring functions over channel groups.

A *criterion* gives every channel of a :class:`~graphslim.analysis.channels.ChannelGroup` a score;
higher means more important, and ``prune`` removes channels in ascending score order. Criteria live in
a registry (``@importance("l1")``), like every per-op rule in graphslim, so users add their own and
select them with ``prune{criterion=NAME}``.

Built-in criteria:

=============  ===================================================================================
``l1``, ``l2`` filter norms (Li et al. 2017) of every *source* slice of the channel (a residual stage
               has several sources: each source's norms are divided by their mean, then summed)
``bn``         ``|gamma|`` of the batch norms in the group (network slimming, Liu et al. 2017);
               a group without batch norm (folded by ``fold-batchnorm``, or none) falls back to
               ``l1`` with a note, and a model without any batch norm is an error
``activation`` mean ``|activation|`` of the channel where the sinks read it (calibration data)
``apoz``       1 − average percentage of zeros of that activation (Hu et al. 2016; calibration data)
``thinet``     greedy selection of the channels whose removal least changes the sinks' outputs on
               calibration data (Luo et al. 2017); ``cumulative``: the score of a channel is the
               relative squared output error once it and every channel before it are removed
``lsq``        like ``thinet``, but the kept channels are rescaled by least squares at every step
               (the selection objective of He et al. 2017, solved by greedy backward elimination);
               fits ``reconstruct=true``, which refits the kept weights
``fisher``     ``F_c = Σ_examples (∂L/∂m_c)²`` for a mask ``m_c = 1`` on the channel where the sinks read
               it, L the cross-entropy of the model's output against its own predicted class (Kwon et al.
               2022; calibration data, no labels); cumulative: the score is the sum of ``F`` over the
               channel and its group's less important ones, the loss increase of removing them to
               second order, compared across groups as it is
=============  ===================================================================================

``fisher_block`` is ``fisher`` with the interactions of a group's channels: the loss of removing a set S is
``½ Σ_n (Σ_{c∈S} ∂L_n/∂m_c)²`` (the Fisher matrix's block over the group, Kwon et al.'s mask rearrangement),
and the order is greedy under it (:func:`fisher_order`).

A criterion is ``fn(ctx, group) -> np.ndarray[group.size]``. One that needs activations declares
``requests(ctx, group) -> {key: (tensor, accumulator)}``; :func:`score_groups` runs the model once for
all groups (batched, bounded memory, :func:`graphslim.analysis.calibration.collect`) and the criterion
reads its accumulators with ``ctx.stats(group)``. One that needs gradients declares
``gradients(ctx, group) -> {key: (tensor, axis, accumulator)}`` instead
(:func:`graphslim.analysis.calibration.collect_gradients`: per example, ``Σ ∂L/∂a · a`` along ``axis``).
Example, a user criterion::

    from graphslim.analysis.importance import importance, source_slices

    @importance("linf", help="largest absolute weight of the channel's filters")
    def linf(ctx, group):
        score = 0
        for m, rows in source_slices(ctx.graph, group):     # rows: [C, elements] per source
            score = score + np.abs(rows).max(axis=1)
        return score

    run_pipeline(g, "prune{ratio=0.3 criterion=linf}")

``cumulative=True`` declares that scores are already costs of removing a prefix of the removal order
(like ``thinet``'s cumulative error); otherwise they are additive per channel. ``prune{macs=...}``
uses this to compare groups.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from graphslim.analysis.channels import ChannelGroup, IndexMap
from graphslim.errors import PassError
from graphslim.ir import ops

__all__ = ["Criterion", "CRITERIA", "ImportanceContext", "importance", "get_criterion", "score_groups",
           "per_channel", "source_slices", "sink_ops", "batchnorm_scales", "ChannelGram", "thinet_order",
           "lsq_order", "fisher_order"]


# ----------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Criterion:
    """A registered criterion: scoring function, optional calibration requests, and flags."""

    name: str
    fn: Callable
    requests: Callable | None = None
    needs_data: bool = False
    cumulative: bool = False
    help: str = ""
    gradients: Callable | None = None


CRITERIA: dict[str, Criterion] = {}


def importance(name: str, *, requests: Callable | None = None, needs_data: bool | None = None,
               cumulative: bool = False, help: str | None = None, replace: bool = False,
               gradients: Callable | None = None):
    """Register ``fn(ctx, group) -> scores`` as criterion ``name`` (see the module docstring).

    ``requests(ctx, group)`` returns the activations the criterion needs (``{key: (tensor,
    accumulator)}``), ``gradients(ctx, group)`` the mask gradients (``{key: (tensor, axis,
    accumulator)}``); either implies ``needs_data``. ``help`` defaults to the docstring's first line.
    Registering a taken name is an error unless ``replace=True``.
    """

    def deco(fn):
        if name in CRITERIA and not replace and CRITERIA[name].fn.__qualname__ != fn.__qualname__:
            raise PassError(f"importance criterion {name!r} is already registered; pass replace=True to "
                            f"override it")
        text = help if help is not None else ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        data = bool(requests or gradients) if needs_data is None else needs_data
        CRITERIA[name] = Criterion(name, fn, requests, data, cumulative, text, gradients)
        return fn

    return deco


def get_criterion(name: str) -> Criterion:
    """The criterion ``name``; a PassError lists the registered ones otherwise."""
    if name not in CRITERIA:
        close = difflib.get_close_matches(name, list(CRITERIA), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PassError(f"unknown importance criterion {name!r}; {hint}registered criteria: "
                        + ", ".join(CRITERIA) + " (calibration data needed by: "
                        + ", ".join(c.name for c in CRITERIA.values() if c.needs_data)
                        + "). Register your own with @graphslim.analysis.importance.importance(NAME).")
    return CRITERIA[name]


# ----------------------------------------------------------------------------------------- context
@dataclass
class ImportanceContext:
    """What a criterion sees: the graph, calibration inputs (or None), sampling settings, notes."""

    graph: object
    data: dict | None = None
    seed: int = 0
    positions: int = 64
    batch_size: int = 32
    notes: list = field(default_factory=list)
    _stats: dict = field(default_factory=dict)

    def note(self, group: ChannelGroup, text: str) -> None:
        """Record a remark about ``group`` for the pass's report."""
        self.notes.append(f"{group.name}: {text}")

    def stats(self, group: ChannelGroup) -> dict:
        """The accumulators the criterion's ``requests`` asked for, after the calibration run."""
        return self._stats.get(group.id, {})

    def rng(self, group: ChannelGroup, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, group.id, salt])


def score_groups(graph, groups, criterion, *, data=None, seed: int = 0, positions: int = 64,
                 batch_size: int = 32) -> tuple[dict, list]:
    """Scores of every group's channels under ``criterion`` (a name or :class:`Criterion`).

    Returns ``({group.id: float64 array [group.size]}, notes)``. Data criteria need ``data`` (signature
    input name → array); all their activation statistics are collected in one batched run. Example::

        scores, notes = score_groups(g, [grp for grp in channel_groups(g) if grp.prunable], "l1")
    """
    crit = get_criterion(criterion) if isinstance(criterion, str) else criterion
    ctx = ImportanceContext(graph, data, seed, positions, batch_size)
    if crit.needs_data and data is None:
        raise PassError(f"criterion {crit.name!r} needs calibration data (calib=data.npz)")
    if crit.requests is not None:
        from graphslim.analysis.calibration import collect

        reqs = {}
        for grp in groups:
            for key, req in (crit.requests(ctx, grp) or {}).items():
                reqs[(grp.id, key)] = req
        got = collect(graph, data, reqs, batch_size=batch_size) if reqs else {}
        for (gid, key), acc in got.items():
            ctx._stats.setdefault(gid, {})[key] = acc
    if crit.gradients is not None:
        from graphslim.analysis.calibration import collect_gradients

        reqs = {(grp.id, key): req for grp in groups for key, req in (crit.gradients(ctx, grp) or {}).items()}
        got = collect_gradients(graph, data, reqs, batch_size=batch_size) if reqs else {}
        for (gid, key), acc in got.items():
            ctx._stats.setdefault(gid, {})[key] = acc
    out = {}
    for grp in groups:
        s = np.asarray(crit.fn(ctx, grp), dtype=np.float64).reshape(-1)
        if s.shape != (grp.size,):
            raise PassError(f"criterion {crit.name!r} returned {s.shape[0]} scores for group {grp.name} of "
                            f"{grp.size} channels")
        if not np.isfinite(s).all():
            ctx.note(grp, f"criterion {crit.name} gave non-finite scores; they count as 0")
            s = np.where(np.isfinite(s), s, 0.0)
        out[grp.id] = s
    return out, ctx.notes


# ----------------------------------------------------------------------------------------- helpers
def per_channel(imap: IndexMap, values: np.ndarray, reduce: str = "sum") -> np.ndarray:
    """Reduce per-position ``values`` (along a member's axis) to per-group-channel values using the
    member's index map: ``sum`` or ``mean`` over each channel's positions; channels without positions
    get 0."""
    rows = imap.rows
    valid = rows >= 0
    vals = np.where(valid, np.asarray(values, np.float64)[np.where(valid, rows, 0)], 0.0)
    total = vals.sum(axis=1)
    if reduce == "mean":
        return total / np.maximum(valid.sum(axis=1), 1)
    return total


def source_slices(graph, group: ChannelGroup):
    """For every source member of the group: ``(member, rows)`` with ``rows[c]`` the flattened weights
    of group channel ``c`` (zeros when the channel has no positions in that source)."""
    out = []
    for m in group.sources:
        w = np.asarray(graph.weight(m.name).value, np.float64)
        flat = np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1)
        rows = m.index_map.rows
        valid = rows >= 0
        sl = flat[np.where(valid, rows, 0)] * valid[:, :, None]  # [C, k, rest]
        out.append((m, sl.reshape(group.size, -1)))
    return out


def _normalized_sum(parts: list, present: list) -> np.ndarray:
    """Sum of per-part score vectors, each divided by its mean over the channels it covers."""
    total = 0.0
    for s, mask in zip(parts, present):
        mean = s[mask].mean() if mask.any() else 0.0
        if mean > 0:
            total = total + s / mean
    return np.asarray(total, np.float64)


def _norm_criterion(ctx, group, p: int) -> np.ndarray:
    parts, present = [], []
    for m, rows in source_slices(ctx.graph, group):
        s = np.abs(rows).sum(1) if p == 1 else np.sqrt(np.square(rows).sum(1))
        parts.append(s)
        present.append(m.index_map.present)
    if not parts:
        ctx.note(group, "no source weights: all channels score 0")
        return np.zeros(group.size)
    return _normalized_sum(parts, present) + np.zeros(group.size)


def sink_ops(graph, group: ChannelGroup) -> list:
    """``(sink member, op node, data tensor member)`` for every sink kernel of the group: the op that
    reads the kernel (directly, or reshaped: Keras's attention output under TensorFlow), and the group's
    activation member that the op reads (its data input)."""
    out = []
    for m in group.sinks:
        readers = []
        for node, port in graph.weight_readers(m.name):
            if node.op == "Reshape" and port == 0:
                readers.extend(graph.consumers(node.output(0)))
            else:
                readers.append((node, port))
        for node, port in readers:
            entry = ops.facts(node.op)
            if entry is None or port != entry.kernel_port:
                continue
            t = str(graph.input(node, entry.data_ports[0]))
            act = next((a for a in group.members_of("tensor") if a.name == t), None)
            if act is not None:
                out.append((m, node, act))
    return out


def batchnorm_scales(graph, group: ChannelGroup) -> list:
    """Weight members of the group that are batch-norm scales: read at input 1 of a FusedBatchNorm,
    or named ``.../gamma`` (Keras, TF-Slim)."""
    out = []
    for m in group.members_of("weight"):
        if m.role is not None or m.axis != 0:
            continue
        fused = any(n.op.startswith("FusedBatchNorm") and p == 1 for n, p in graph.weight_readers(m.name))
        if fused or m.name.rsplit("/", 1)[-1] == "gamma":
            out.append(m)
    return out


# ----------------------------------------------------------------------------------------- criteria
@importance("l1", help="sum of |weights| of each channel's source filters (Li et al. 2017)")
def _l1(ctx, group):
    return _norm_criterion(ctx, group, 1)


@importance("l2", help="L2 norm of each channel's source filters")
def _l2(ctx, group):
    return _norm_criterion(ctx, group, 2)


@importance("bn", help="|gamma| of the batch norms in the group (network slimming); l1 where there is none")
def _bn(ctx, group):
    scales = batchnorm_scales(ctx.graph, group)
    if not scales:
        if not ctx.__dict__.setdefault("_bn_checked", False):
            ctx._bn_checked = True
            from graphslim.analysis.channels import channel_groups

            if not any(batchnorm_scales(ctx.graph, g) for g in channel_groups(ctx.graph)):
                raise PassError("criterion 'bn' needs batch norms, but the model has none (fold-batchnorm "
                                "folds them into the convolutions: run prune before it), or use "
                                "criterion=l1")
        ctx.note(group, "no batch norm in the group (folded or absent): scored by l1 instead of bn")
        return _norm_criterion(ctx, group, 1)
    parts, present = [], []
    for m in scales:
        gamma = np.abs(np.asarray(ctx.graph.weight(m.name).value, np.float64))
        parts.append(per_channel(m.index_map, gamma, "mean"))
        present.append(m.index_map.present)
    return _normalized_sum(parts, present) + np.zeros(group.size)


def _activation_members(ctx, group) -> list:
    acts = [act for _, _, act in sink_ops(ctx.graph, group)]
    if not acts:  # no kernel reads the channels: the sources' outputs
        srcs = {n.name for m in group.sources for n, _ in ctx.graph.weight_readers(m.name)}
        acts = [a for a in group.members_of("tensor") if a.tensor.node in srcs]
    return list({a.name: a for a in acts}.values())


def _activation_requests(ctx, group):
    from graphslim.analysis.calibration import ChannelMoments

    return {a.name: (a.name, ChannelMoments(axis=a.axis)) for a in _activation_members(ctx, group)}


def _activation_scores(ctx, group, attr: str, flip: bool) -> np.ndarray:
    parts, present = [], []
    stats = ctx.stats(group)
    for a in _activation_members(ctx, group):
        acc = stats.get(a.name)
        if acc is None or acc.count == 0:
            continue
        v = getattr(acc, attr)
        s = per_channel(a.index_map, 1.0 - v if flip else v, "mean")
        parts.append(s)
        present.append(a.index_map.present)
    if not parts:
        ctx.note(group, "no activation of the group was measured: scored by l1")
        return _norm_criterion(ctx, group, 1)
    return _normalized_sum(parts, present) + np.zeros(group.size)


@importance("activation", requests=_activation_requests,
            help="mean |activation| where the next layers read the channel (calibration data)")
def _activation(ctx, group):
    return _activation_scores(ctx, group, "mean_abs", False)


def _fisher_gradients(ctx, group):
    from graphslim.analysis.calibration import MaskGradients

    return {a.name: (a.name, a.axis, MaskGradients(a.index_map)) for a in _activation_members(ctx, group)}


@importance("fisher", gradients=_fisher_gradients, cumulative=True,
            help="squared loss gradient of a mask on the channel where the next layers read it, summed over "
                 "calibration examples (Kwon et al. 2022; the model's own predictions as labels)")
def _fisher(ctx, group):
    """Kwon et al.'s diagonal Fisher information of each channel's mask, ``F_c = Σ_n (∂L_n/∂m_c)²``;
    removing a set of channels raises the loss by about half their sum. The scores are that sum over the
    channel and every channel of its group with a lower ``F`` (cumulative): an estimate of the loss
    that is comparable across groups, so that ``prune{macs=}`` trades heads against feed-forward
    units and filters by it rather than normalizing each group (the paper's global mask search)."""
    v = _fisher_parts(ctx, group)
    if v is None:
        ctx.note(group, "fisher: no activation of the group was measured: scored by l1")
        return _norm_criterion(ctx, group, 1)
    fisher = np.square(v).sum(axis=0)
    order = np.argsort(fisher, kind="stable")
    scores = np.empty(group.size)
    scores[order] = np.cumsum(fisher[order])
    return scores


def _fisher_parts(ctx, group) -> np.ndarray | None:
    """The per-example mask derivatives ``[n, C]`` of the group, or None. A tensor with the examples' rows
    flattened (tf.tensordot's ``[B·T, C]``) has its rows summed per example (batch-major, as the reshape
    lays them out); one mask per channel: its parts add up per example."""
    parts = [acc.values for acc in ctx.stats(group).values() if acc.count]
    if not parts:
        return None
    n = min(len(p) for p in parts)
    parts = [p if len(p) == n else p.reshape(n, -1, p.shape[-1]).sum(axis=1) for p in parts if len(p) % n == 0]
    return sum(parts)


@importance("fisher_block", gradients=_fisher_gradients, cumulative=True,
            help="fisher with the interactions of a group's channels: greedy removal under the block of the "
                 "Fisher matrix over the group (Kwon et al. 2022's mask rearrangement; calibration data)")
def _fisher_block(ctx, group):
    """Like ``fisher``, but the loss of removing a set of the group's channels is ``½ Σ_n (Σ_c ∂L_n/∂m_c)²``
    over the set (the Fisher matrix's block, off-diagonal terms included) and the order is greedy
    under it (:func:`fisher_order`); scores are the running maximum of that estimate."""
    v = _fisher_parts(ctx, group)
    if v is None:
        ctx.note(group, "fisher_block: no activation of the group was measured: scored by l1")
        return _norm_criterion(ctx, group, 1)
    order, loss = fisher_order(v)
    return _ordered_scores(order, loss, 1.0)


def fisher_order(grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy removal order of a group's channels under the Fisher information *with its interactions
    within the group* (Kwon et al. 2022's mask rearrangement): ``grads[n, c]`` the mask derivatives
    per example, removing a set S raises the loss by about ``½ Σ_n (Σ_{c∈S} grads[n, c])²`` (the
    block of the Fisher matrix over S, not only its diagonal: channels whose gradients cancel go
    together, ones that add up do not). Each step removes the channel that raises that least. Returns
    ``(order, loss estimate after each removal)``."""
    v = np.asarray(grads, np.float64)
    c = v.shape[1]
    norms = np.square(v).sum(axis=0)
    run = np.zeros(v.shape[0])
    alive = np.ones(c, bool)
    order, loss = [], []
    for _ in range(c):
        inc = 2.0 * (run @ v) + norms  # Σ_n (run + v_c)² − Σ_n run²
        inc[~alive] = np.inf
        j = int(np.argmin(inc))
        alive[j] = False
        run += v[:, j]
        order.append(j)
        loss.append(float(np.square(run).sum()))
    return np.array(order, dtype=np.int64), np.array(loss)


@importance("apoz", requests=_activation_requests,
            help="1 - fraction of zero activations where the next layers read the channel (calibration data)")
def _apoz(ctx, group):
    return _activation_scores(ctx, group, "zero_fraction", True)


# ----------------------------------------------------------------------------------------- thinet
class ChannelGram:
    """Accumulates, for one sink layer, the Gram matrix of the group channels' contributions to the
    layer's output: ``G[c, c'] = Σ y_c y_c'`` over sampled outputs, where ``y_c`` is what channel ``c``
    adds to one output element (one spatial position, one output channel). Removing a set ``T`` of
    channels changes those outputs by ``Σ_{c∈T} y_c``, whose squared norm is ``1_Tᵀ G 1_T``
    (ThiNet's objective, Luo et al. 2017). ``power`` is the summed squared output (without bias),
    the denominator of the relative error.

    Convolutions: ``geometry`` set; input patches at ``positions`` sampled output positions per example.
    Dense: rows of the input's last axis. ``kernel`` is ``[D, O]`` (patch order of
    :func:`graphslim.analysis.calibration.extract_patches` flattened); ``labels[p]`` is the group channel
    of input channel ``p`` (−1: not in the group). Per sampled row, ``outputs`` output channels are drawn.
    """

    def __init__(self, kernel: np.ndarray, labels: np.ndarray, size: int, geometry=None, positions=64,
                 outputs: int = 32, rng: np.random.Generator | None = None, max_rows: int = 8192):
        self.kernel = np.asarray(kernel, np.float64)
        self.labels = np.asarray(labels, np.int64)
        self.size, self.geo, self.positions, self.outputs = size, geometry, positions, outputs
        self.rng = rng or np.random.default_rng(0)
        self.max_rows = max_rows
        self.gram = np.zeros((size, size))
        self.power = 0.0
        self.count = 0
        cin = len(self.labels)
        valid = self.labels >= 0
        self._identity = bool(valid.all() and cin == size and (self.labels == np.arange(cin)).all())
        self._onehot = None
        if not self._identity:
            oh = np.zeros((cin, size))
            oh[np.nonzero(valid)[0], self.labels[valid]] = 1.0
            self._onehot = oh

    def update(self, value: np.ndarray) -> None:
        from graphslim.analysis.calibration import extract_patches

        x = np.asarray(value)
        if self.geo is not None:
            p = extract_patches(x, self.geo, self.positions, self.rng)
            n = p.shape[0]
            rows = p.reshape(n, -1, p.shape[-1])  # [n, K², Cin]
        else:
            rows = x.reshape(-1, x.shape[-1])[:, None, :]  # [n, 1, Cin]
            if rows.shape[0] > self.max_rows:
                rows = rows[self.rng.choice(rows.shape[0], self.max_rows, replace=False)]
        n, kk, cin = rows.shape
        o_total = self.kernel.shape[1]
        k = self.kernel.reshape(kk, cin, o_total).transpose(1, 0, 2)  # [Cin, K², O]
        per = min(self.outputs, o_total)
        chunk = max(1, min(256, (1 << 22) // max(1, cin * per)))
        for s in range(0, n, chunk):
            # the rows of a chunk share ``per`` output channels, drawn afresh per chunk
            outs = np.arange(o_total) if per == o_total else np.sort(self.rng.choice(o_total, per, replace=False))
            r = rows[s:s + chunk].astype(np.float64).transpose(2, 0, 1)   # [Cin, b, K²]
            yp = np.matmul(r, k[:, :, outs])                               # [Cin, b, per]
            yp = yp.reshape(cin, -1).T                                     # [b·per, Cin] per input channel
            y = yp if self._identity else yp @ self._onehot
            self.gram += y.T @ y
            self.power += float(np.square(yp.sum(1)).sum())
            self.count += yp.shape[0]


def thinet_order(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ThiNet's greedy removal order for a Gram matrix of channel contributions (see
    :class:`ChannelGram`): repeatedly remove the channel that least increases ``1_Tᵀ G 1_T``.
    Returns ``(order, cumulative error after each removal)``."""
    g = np.asarray(gram, np.float64)
    n = g.shape[0]
    diag = np.diag(g).copy()
    v = np.zeros(n)  # G · 1_T
    left = np.ones(n, dtype=bool)
    order, errs, err = [], [], 0.0
    for _ in range(n):
        cost = np.where(left, 2 * v + diag, np.inf)
        c = int(np.argmin(cost))
        err += float(cost[c])
        order.append(c)
        errs.append(err)
        left[c] = False
        v += g[:, c]
    return np.array(order, dtype=np.int64), np.array(errs)


def _thinet_requests(ctx, group):
    from graphslim.analysis.calibration import ConvGeometry

    reqs = {}
    for i, (m, node, act) in enumerate(sink_ops(ctx.graph, group)):
        w = np.asarray(ctx.graph.weight(m.name).value)
        labels = np.full(w.shape[m.axis], -1, dtype=np.int64)
        rows = m.index_map.rows
        for c in range(group.size):
            labels[rows[c][rows[c] >= 0]] = c
        entry = ops.facts(node.op)
        if not entry.refit or m.axis != ops.kernel_axes(node, w.ndim)[0] or node.attr("transpose_a", False):
            ctx.note(group, f"thinet: sink {node.name} ({node.op}) is not a Conv2D or MatMul; it is left out")
            continue
        geo = ConvGeometry.of(ctx.graph, node) if w.ndim == 4 else None
        kernel = ops.kernel_matrix(node, w)
        reqs[f"sink{i}"] = (act.name, ChannelGram(kernel, labels, group.size, geo, ctx.positions,
                                                  rng=ctx.rng(group, i)))
    return reqs


@importance("thinet", requests=_thinet_requests, cumulative=True,
            help="greedy removal minimizing the next layers' output error on calibration data (Luo et al. 2017)")
def _thinet(ctx, group):
    grams = [acc for acc in ctx.stats(group).values() if acc.count and acc.power > 0]
    if not grams:
        ctx.note(group, "thinet: no Conv2D/MatMul sink measured: scored by l1")
        return _norm_criterion(ctx, group, 1)
    gram = sum(acc.gram / acc.power for acc in grams) / len(grams)
    order, errs = thinet_order(gram)
    # scores sort like the greedy order: running maximum of the cumulative error, ties by position
    return _ordered_scores(order, errs, 1.0)


def lsq_order(gram: np.ndarray, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Greedy backward elimination for ``min_β ‖Σ_c y_c − Σ_{k∈K} β_k y_k‖²`` (the kept channels are
    rescaled by least squares, the channel-selection objective of He et al. 2017, solved greedily instead
    of by LASSO). ``gram`` is the Gram matrix of the channel contributions ``y_c`` (:class:`ChannelGram`).
    Each step removes the channel whose removal least increases the residual (``β_j² / H_jj`` with
    ``H`` the inverse Gram of the kept channels, downdated in place). Returns ``(order, cumulative
    residual after each removal)``; O(C³)."""
    g = np.asarray(gram, np.float64)
    n = g.shape[0]
    g = g + (ridge * np.trace(g) / max(n, 1) + 1e-300) * np.eye(n)
    b = g.sum(axis=1)
    try:
        h = np.linalg.inv(g)
    except np.linalg.LinAlgError:
        h = np.linalg.pinv(g)
    alive = np.ones(n, dtype=bool)
    base = float(b.sum() - b @ (h @ b))  # residual with every channel kept (≈ 0)
    order, errs, err = [], [], max(base, 0.0)
    for _ in range(n - 1):
        beta = h @ b
        d = np.diag(h)
        inc = np.where(alive & (d > 0), beta ** 2 / np.where(d > 0, d, 1.0), np.inf)
        j = int(np.argmin(inc))
        err += float(inc[j])
        col = h[:, j].copy()
        h -= np.outer(col, col) / col[j]
        h[j, :] = 0.0
        h[:, j] = 0.0
        alive[j] = False
        order.append(j)
        errs.append(err)
    last = int(np.nonzero(alive)[0][0]) if alive.any() else 0
    order.append(last)
    errs.append(float(b.sum()))
    return np.array(order, dtype=np.int64), np.array(errs)


def _ordered_scores(order: np.ndarray, errs: np.ndarray, total: float) -> np.ndarray:
    """Scores that sort like ``order`` and equal the (running maximum of the) relative cumulative error."""
    rel = np.maximum(np.asarray(errs, np.float64), 0.0) / (total if total > 0 else 1.0)
    cum = np.maximum.accumulate(rel)
    scores = np.empty(len(order))
    scores[order] = cum + np.arange(len(order)) * 1e-12
    return scores


@importance("lsq", requests=_thinet_requests, cumulative=True,
            help="greedy removal minimizing the next layers' output error after least-squares rescaling "
                 "of the kept channels (He et al. 2017's selection objective; calibration data)")
def _lsq(ctx, group):
    grams = [acc for acc in ctx.stats(group).values() if acc.count and acc.power > 0]
    if not grams:
        ctx.note(group, "lsq: no Conv2D/MatMul sink measured: scored by l1")
        return _norm_criterion(ctx, group, 1)
    gram = sum(acc.gram / acc.power for acc in grams) / len(grams)
    order, errs = lsq_order(gram)
    return _ordered_scores(order, errs, 1.0)
