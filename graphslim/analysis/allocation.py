"""How many channels each channel group keeps to reach a cost target: the cost models and the allocators.

A *cost model* predicts a cost of the graph (MACs: :class:`MacModel`; measured latency:
:class:`graphslim.analysis.latency.LatencyModel`) as a function of how many channels each group
removes, in the group's removal order (least important first). Both share :class:`WidthModel`: each
cost term (a layer) reads kernel axes (weight name, axis), and each axis shrinks by the positions that
the groups covering it remove. An *allocator* picks the removal counts: :func:`global_allocation`
(greedy, least importance lost per unit of cost saved) or :func:`uniform_allocation` (one ratio for
every group, solved by bisection). ``prune`` uses them for ``macs=`` and ``latency=``.
"""

from __future__ import annotations

import heapq

import numpy as np

from graphslim.ir import ops
from graphslim.ir.graph import WEIGHT_OP

__all__ = ["allowed_counts", "snap", "WidthModel", "MacModel", "group_costs", "global_allocation",
           "uniform_allocation"]


def allowed_counts(size: int, min_channels: int, round_to: int) -> list[int]:
    """Keep counts a group may take, descending from ``size``."""
    lo = min(size, max(1, min_channels))
    if round_to <= 1 or size <= round_to:
        return list(range(size, lo - 1, -1))
    lo = max(lo, round_to)
    lo = -(-lo // round_to) * round_to
    counts = [size] + [k for k in range((size - 1) // round_to * round_to, lo - 1, -round_to)]
    return [k for k in counts if k >= 1]


def snap(counts: list[int], k: float) -> int:
    """The allowed count nearest to ``k`` (ties: the larger)."""
    return min(counts, key=lambda c: (abs(c - k), -c))


class WidthModel:
    """A cost as a sum of terms over kernel axes, as a function of the channels each group removes.

    ``terms``: ``(payload, keys)`` per term (a layer), ``keys`` the ``(weight name, axis)`` kernel axes
    (or ``(tensor name, axis)`` activation axes) whose lengths the term's cost depends on; ``dims``: each key's full length; ``fixed``: the cost no
    group changes. Subclasses give :meth:`term_cost` from the term's payload and its keys' kept lengths.
    ``removed`` maps a group id to how many channels it removes, first ones of its order first."""

    def __init__(self, terms: list, dims: dict, fixed: float, groups, orders: dict):
        self.terms, self.dims, self.fixed = terms, dims, fixed
        self.cum: dict = {}  # key → {gid: cumulative positions removed by the first r channels}
        self.node_groups: dict = {}  # gid → the terms it changes
        for grp in groups:
            order = orders[grp.id]
            for m in grp.members_of("weight") + grp.members_of("tensor"):
                k = (m.name, m.axis)
                if k not in dims:
                    continue
                widths = (m.index_map.rows >= 0).sum(axis=1)[order]
                self.cum.setdefault(k, {})[grp.id] = np.concatenate([[0], np.cumsum(widths)])
        for i, (_, keys) in enumerate(self.terms):
            for k in keys:
                for gid in self.cum.get(k, {}):
                    self.node_groups.setdefault(gid, set()).add(i)
        self.total0 = self.total({})

    def kept(self, key, removed: dict) -> int:
        """The length of kernel axis ``key`` left after ``removed``."""
        gone = sum(int(cum[removed.get(gid, 0)]) for gid, cum in self.cum.get(key, {}).items())
        return max(self.dims[key] - gone, 0)

    def term_cost(self, i: int, kept: list) -> float:
        raise NotImplementedError

    def node_cost(self, i: int, removed: dict) -> float:
        return self.term_cost(i, [self.kept(k, removed) for k in self.terms[i][1]])

    def total(self, removed: dict) -> float:
        return self.fixed + sum(self.node_cost(i, removed) for i in range(len(self.terms)))

    def saving(self, gid: int, removed: dict, new_r: int) -> float:
        """How much the cost drops when group ``gid`` removes ``new_r`` channels instead of its current
        count."""
        nodes = self.node_groups.get(gid, ())
        before = sum(self.node_cost(i, removed) for i in nodes)
        trial = dict(removed)
        trial[gid] = new_r
        return before - sum(self.node_cost(i, trial) for i in nodes)


class MacModel(WidthModel):
    """MACs of the kernel ops scale with the product of their kernel's axis lengths (a conv's input ×
    output channels × window, a depthwise conv's channels × multiplier, a MatMul's K × N, an attention
    projection's input × heads × head size), the kernel read directly or through Identity and Reshape.
    An Einsum or BatchMatMul of two activations (attention scores and context) scales with each of its
    labels' lengths, read on the first operand that has the label (heads, head sizes). Other ops without
    a kernel weight keep their MACs."""

    def __init__(self, graph, groups, orders: dict):
        terms, dims, fixed = [], {}, 0
        for c in graph.cost().nodes:
            if not c.macs:
                continue
            node = graph.node(c.name)
            entry = ops.facts(node.op)
            w = None
            if entry and entry.kernel_port is not None:
                src = graph.input_node(node, entry.kernel_port)
                while src.op in ("Identity", "Reshape"):
                    src = graph.input_node(src, 0)
                w = graph.weights.get(src.name) if src.op == WEIGHT_OP else None
            if w is None:
                keys = _activation_keys(graph, node)
                if keys:  # attention scores and context: heads and head sizes scale them
                    dims.update(keys)
                    terms.append((c.macs, list(keys)))
                else:
                    fixed += c.macs
                continue
            keys = [(w.name, a) for a in range(w.value.ndim)]
            for k in keys:
                dims[k] = w.value.shape[k[1]]
            terms.append((c.macs, keys))
        super().__init__(terms, dims, fixed, groups, orders)

    def term_cost(self, i: int, kept: list) -> float:
        macs, keys = self.terms[i]
        f = float(macs)
        for k, n in zip(keys, kept):
            f *= n / self.dims[k]
        return f


def _activation_keys(graph, node) -> dict:
    """``{(tensor name, axis): length}`` for every label of an Einsum or BatchMatMul with no kernel weight,
    one (tensor, axis) per label (the first operand holding it), static lengths only; {} otherwise."""
    if node.op != "Einsum" and not node.op.startswith("BatchMatMul"):
        return {}
    inputs = [str(graph.input(node, p)) for p in range(2)]
    shapes = [graph.shape(t) for t in inputs]
    if any(sh is None for sh in shapes):
        return {}
    picks = []
    if node.op == "Einsum":
        try:
            labels, _ = ops.einsum_labels(node)
        except ValueError:
            return {}
        seen = set()
        for t, labs in zip(range(2), labels):
            for a, c in enumerate(labs):
                if c not in seen:
                    seen.add(c)
                    picks.append((t, a))
    else:  # x [..., M, K] (adj_x: [..., K, M]) · y [..., K, N] (adj_y: [..., N, K]): every axis of x, and N
        rank_y = len(shapes[1])
        picks = [(0, a) for a in range(len(shapes[0]))] + [(1, rank_y - 2 if node.attr("adj_y", False) else rank_y - 1)]
    return {(inputs[t], a): shapes[t][a] for t, a in picks if shapes[t][a]}


def group_costs(scores: np.ndarray, order: np.ndarray, cumulative: bool) -> np.ndarray:
    """Normalized cost of removing the first r channels of the order, r = 0..C (removing all costs 1
    for additive criteria; cumulative criteria give it directly)."""
    s = np.maximum(scores[order], 0.0)
    if cumulative:
        return np.concatenate([[0.0], s])
    total = s.sum()
    c = np.concatenate([[0.0], np.cumsum(s)])
    return c / total if total > 0 else c


def global_allocation(model: WidthModel, free: list, fixed_removed: dict, counts: dict, costs: dict,
                       target: float) -> dict:
    """Greedy: repeatedly take the group step (to its next allowed keep count) with the least importance
    cost per unit of modelled cost saved (MACs, seconds), until the model reaches ``target``. Returns
    ``{gid: channels removed}``."""
    removed = dict(fixed_removed)
    step = {g.id: 0 for g in free}
    for g in free:
        removed[g.id] = 0
    size = {g.id: g.size for g in free}
    cur = model.total(removed)

    def entry(gid):
        # the next keep count that saves anything: a measured cost can stay flat for a few steps
        # (a runtime's kernels tile the channels), MACs never do
        for j in range(step[gid] + 1, len(counts[gid])):
            new_r = size[gid] - counts[gid][j]
            sav = model.saving(gid, removed, new_r)
            if sav > 0:
                cost = costs[gid][new_r] - costs[gid][removed[gid]]
                return (max(cost, 0.0) / sav, gid, new_r, sav, j)
        return None

    heap = [e for e in (entry(g.id) for g in free) if e is not None]
    heapq.heapify(heap)
    while heap and cur > target:
        ratio, gid, new_r, sav, j = heapq.heappop(heap)
        fresh = entry(gid)
        if fresh is None:
            continue
        if fresh[:3] != (ratio, gid, new_r) and heap and fresh[0] > heap[0][0]:
            heapq.heappush(heap, fresh)  # stale: another group's step changed this one's saving
            continue
        ratio, gid, new_r, sav, j = fresh
        if cur - sav < target and (target - (cur - sav)) > (cur - target):
            continue  # this group's step overshoots more than stopping short; its later steps more so
        removed[gid] = new_r
        step[gid] = j
        cur -= sav
        nxt = entry(gid)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return removed


def uniform_allocation(model: WidthModel, free: list, fixed_removed: dict, counts: dict, target: float) -> dict:
    """One removal ratio for every free group (snapped to its allowed counts), bisected until the model
    is nearest ``target``. Returns ``{gid: channels removed}``."""

    def removal(r):
        out = dict(fixed_removed)
        for g in free:
            out[g.id] = g.size - snap(counts[g.id], g.size - round(r * g.size))
        return out

    lo, hi = 0.0, 1.0
    best = removal(0.0)
    best_err = abs(model.total(best) - target)
    for _ in range(40):
        mid = (lo + hi) / 2
        rem = removal(mid)
        cost = model.total(rem)
        if abs(cost - target) < best_err:
            best, best_err = rem, abs(cost - target)
        if cost > target:
            lo = mid
        else:
            hi = mid
    return best
