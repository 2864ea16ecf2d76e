"""Dead positions: compute only the positions (tokens, rows) that some output needs.

A ViT's classifier reads the class token of its last block (``x[:, 0]``); the block's query projection,
attention output, MLP and final layer norm still run on all 17 (or 197) tokens, of which 16 (or 196)
feed nothing. Only the keys and values need every token. This is dead-code elimination along an axis:

1. **Liveness, backwards** (:func:`live_spans`). Every tensor gets the :class:`Span` of positions its
   consumers need (the hull of their spans along one axis; all of it when they disagree on the axis or
   it is a signature output). A consumer's span on each input comes from its op's position rule
   (:mod:`graphslim.analysis.position_rules`): a StridedSlice that takes one position starts a span, an
   element-wise op or a projection carries it, attention's score Einsum carries the query positions and
   reads every key position. An op without a rule reads everything.
2. **Rewrite, forwards** (:func:`slice_dead_positions`). An op whose inputs arrive restricted computes
   only its needed positions; where a tensor is computed in full (or wider) and a consumer needs fewer, a
   StridedSlice is inserted on that edge (the residual stream before the last block's query and its
   residual Add). Ops whose constants name positions (a Reshape's target shape, a StridedSlice's begin)
   are rewritten by their rules. A span that cannot be cut on an edge (positions merged with the batch
   in a ``[batch·T, C]`` matrix) makes its consumer compute everything, and the analysis runs again.

The result computes the same outputs; :func:`slice_dead_positions` re-infers the shapes and checks that
every restricted tensor has the length it should.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from graphslim.analysis.constants import constant_value
from graphslim.analysis.position_rules import POSITION_RULES, NotPositional, Span, static_target
from graphslim.errors import PassError
from graphslim.ir.graph import Graph, Tensor

__all__ = ["Liveness", "live_spans", "slice_dead_positions", "static_reshapes"]


@dataclass
class Liveness:
    """What :func:`live_spans` found. ``computed[node]``: the span the node's output is computed on after the rewrite. ``edges[(node,
    port)]``: the span node reads of input ``port``. ``rewrites``: the rules' attribute changes."""
    computed: dict = field(default_factory=dict)
    edges: dict = field(default_factory=dict)
    rewrites: list = field(default_factory=list)


class _Context:
    def __init__(self, graph: Graph):
        self.graph = graph
        self._pending: list = []

    def in_shape(self, node, port: int):
        return self.graph.shape(self.graph.input(node, port))

    def out_shape(self, node):
        return node.shapes[0] if node.shapes else None

    def const(self, node, port: int):
        return constant_value(self.graph, self.graph.input(node, port))

    def rewrite(self, fn) -> None:
        self._pending.append(fn)


def _hull(spans: list) -> Span | None:
    if any(s is None for s in spans):
        return None
    first = spans[0]
    if any((s.axis, s.period, s.merged) != (first.axis, first.period, first.merged) for s in spans):
        return None
    return Span(first.axis, min(s.lo for s in spans), max(s.hi for s in spans), first.period, first.merged)


def _whole(span: Span | None) -> bool:
    return span is None or (span.lo == 0 and span.period is not None and span.hi >= span.period)


def _analyze(graph: Graph, forced: set) -> Liveness:
    live = Liveness()
    ctx = _Context(graph)
    outputs = {s.tensor for s in graph.outputs}
    alive = graph.live_nodes()  # a dead consumer (a run-time shape made constant) reads nothing
    for node in reversed(graph.topo_order()):
        need = None
        if node.num_outputs == 1 and node.output(0) not in outputs and graph.control_consumers(node) == []:
            wanted = [live.edges.get((c.name, p)) for c, p in graph.consumers(node.output(0)) if c.name in alive]
            need = _hull(wanted) if wanted else None
        shape = node.shapes[0] if node.shapes else None
        if _whole(need):
            need = None
        rule = POSITION_RULES.get(node.op)
        n_in = len(graph.inputs_of(node))
        spans = [None] * n_in
        known = shape is not None and all(ctx.in_shape(node, p) is not None for p in range(n_in))
        if rule is not None and known and node.name not in forced and not graph.control_inputs_of(node):
            ctx._pending = []
            try:
                spans = list(rule(ctx, node, need))
            except NotPositional:
                spans = [None] * n_in
            if len(spans) != n_in:
                raise PassError(f"positions: the position rule of {node.op} returned {len(spans)} spans for "
                                f"node {node.name!r}, which has {n_in} inputs.")
            spans = [None if _whole(s) else s for s in spans]
            if any(s is not None for s in spans):
                live.rewrites.extend(ctx._pending)
                if need is not None:
                    live.computed[node.name] = need
        for p, s in enumerate(spans):
            if s is not None:
                live.edges[(node.name, p)] = s
    return live


def _edge_cut(graph: Graph, live: Liveness, node, port: int) -> tuple[Span | None, Span] | None:
    """``(span the input is computed on, span the node reads)`` where they differ, else None."""
    want = live.edges.get((node.name, port))
    if want is None:
        return None
    t = graph.input(node, port)
    have = live.computed.get(t.node) if t.port == 0 else None
    return None if have == want else (have, want)


def live_spans(graph: Graph) -> Liveness:
    """The dead-position analysis of ``graph`` (static shapes current): run until every edge where a
    consumer reads fewer positions than its input holds can be cut with a StridedSlice."""
    forced: set = set()
    while True:
        live = _analyze(graph, forced)
        blocked = set()
        for (name, port) in live.edges:
            node = graph.node(name)
            cut = _edge_cut(graph, live, node, port)
            if cut is not None and cut[1].merged:
                blocked.add(name)
        if not blocked:
            return live
        forced |= blocked


def _cut(graph: Graph, tensor: Tensor, have: Span | None, want: Span, cache: dict) -> Tensor:
    key = (tensor, want)
    if key in cache:
        return cache[key]
    rank = len(graph.shape(tensor))
    base = have.lo if have is not None else 0
    begin, end = np.zeros(rank, np.int32), np.zeros(rank, np.int32)
    begin[want.axis], end[want.axis] = want.lo - base, want.hi - base
    mask = ((1 << rank) - 1) & ~(1 << want.axis)
    name = graph.unique_name(f"{tensor.node}/live_positions")
    consts = [graph.add_const(f"{name}/{k}", v, unique=True).output(0)
              for k, v in (("begin", begin), ("end", end), ("strides", np.ones(rank, np.int32)))]
    node = graph.add_node(name, "StridedSlice", [tensor, *consts],
                          {"T": graph.dtype(tensor), "Index": tf.int32, "begin_mask": mask, "end_mask": mask})
    cache[key] = node.output(0)
    return cache[key]


def static_reshapes(graph: Graph) -> int:
    """Give every Reshape whose target is computed at run time but known before it up to one entry
    (``tf.tensordot``'s ``concat([shape(x)[:2], [C]])`` on a static sequence length) that target as a
    constant, -1 at the unknown entry; re-infer, and repeat while the shapes this makes known unlock
    more. Returns the number rewritten. The same reshapes: the shape inference guarantees the entries."""
    done = 0
    while True:
        found = [(n, t) for n in graph.nodes("Reshape") if constant_value(graph, graph.input(n, 1)) is None
                 for t in [static_target(graph, n)] if t is not None]
        if not found:
            return done
        for node, target in found:
            graph.set_input(node, 1, graph.add_const(f"{node.name}/static_shape", target, unique=True).output(0))
        done += len(found)
        graph.infer_shapes()


def slice_dead_positions(graph: Graph) -> dict:
    """Rewrite ``graph`` in place so that every tensor is computed only on the positions some output
    needs. Returns statistics: the tensors computed on fewer positions, the slices inserted, and per
    restricted tensor its span. Raises PassError (the graph untouched) when the rewritten shapes do not
    re-infer as the analysis expected."""
    snapshot = graph.copy()
    static = static_reshapes(graph)
    live = live_spans(graph)
    if not live.computed:
        if static:
            graph.restore(snapshot)
        return {"restricted": 0, "slices": 0, "spans": {}}
    expected = {name: (span, graph.shape(graph.node(name).output(0))) for name, span in live.computed.items()}
    cache: dict = {}
    try:
        for (name, port) in sorted(live.edges):
            node = graph.node(name)
            cut = _edge_cut(graph, live, node, port)
            if cut is not None:
                graph.set_input(node, port, _cut(graph, graph.input(node, port), *cut, cache))
        for fn in live.rewrites:
            fn(graph)
        graph.infer_shapes()
        for name, (span, before) in expected.items():
            after = graph.shape(graph.node(name).output(0))
            want = None if before[span.axis] is None else before[span.axis] // (span.period or before[span.axis]) \
                * span.size
            if after is None or len(after) != len(before) or after[span.axis] not in (want, None):
                raise PassError(f"positions: node {name!r} should hold {span.size} positions along axis "
                                f"{span.axis} after the rewrite but has shape {after} (before: {before}). "
                                f"This is a bug in a position rule; the model is left unchanged.")
    except Exception:
        graph.restore(snapshot)
        raise
    spans = {name: f"axis {s.axis} [{s.lo}, {s.hi}) of {s.period if s.period is not None else '?'}"
             for name, s in live.computed.items()}
    return {"restricted": len(live.computed), "slices": len(cache), "spans": spans}
