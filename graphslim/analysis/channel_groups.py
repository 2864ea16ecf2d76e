"""Channel groups: the breadth-first walk from a seed (tensor, axis) through the channel rules, and its
result (:class:`ChannelGroup` of :class:`Member` s). See :mod:`graphslim.analysis.channels`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from graphslim.analysis.channel_maps import (Blocked, ChannelError, IndexMap, In, Link, Out, check_map,
                                             merge_maps)
from graphslim.analysis.channel_rules import CHANNEL_RULES, concat_part, vector_element  # registers the rules
from graphslim.analysis.constants import constant_value
from graphslim.ir import ops
from graphslim.ir.graph import WEIGHT_OP, Graph, Node, Tensor, as_tensor

__all__ = ["Blocker", "Pick", "Member", "ChannelGroup", "group_for", "channel_groups", "hidden_size",
           "format_groups"]


# ----------------------------------------------------------------------------------------- results
class Blocker(NamedTuple):
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


class Pick(NamedTuple):
    """An op that reads positions of the channel axis by index: one fixed position (``x[..., j]``, a
    post-processing unrolled per class: ``position`` j) or positions chosen at run time (a gather by
    class ids, the mask of each detection's class: ``position`` None). It blocks the group (a channel
    removed or moved would change what it reads) but not growth at the end of the axis, which leaves
    every old position where it was (:func:`apply_grow` with ``allow_picks``)."""

    node: str
    tensor: str  # the input whose axis it reads
    axis: int
    position: int | None


@dataclass
class Member:
    """One thing a group's change touches.

    ``kind``:
      * ``"weight"``: weight ``name`` is sliced along ``axis``;
      * ``"const"``: Const node ``name``'s value is sliced along ``axis`` (cloned if read by nodes
        outside the group; ``users`` lists the (node, port) pairs of the group that read it);
      * ``"tensor"``: activation ``name`` (``"node:port"``) shrinks along ``axis`` (for reporting and
        verification; nothing to edit, shapes re-infer);
      * ``"reshape"``: node ``name``'s shape-vector input ``port`` (Reshape's ``shape``,
        Conv2DBackpropInput's ``input_sizes``) is rebuilt from its new static output shape;
      * ``"slice"``: Slice/StridedSlice node ``name`` takes a range of the channel ``axis`` of its
        input (``tf.slice(scores, [0, 0, 1], [-1, -1, -1])`` drops a background class; a
        ``[boxes | classes]`` tensor split by two slices): its begin/end (or size) are recomputed
        from the positions that survive, which must stay contiguous inside the range;
      * ``"count"``: element ``axis`` of node ``name``'s constant input ``port`` (or constant element of
        a Pack) is the channel count (a Tile's multiple that broadcasts one box to every class, a
        BroadcastTo's target shape): rewritten to the new count;
      * ``"stat"``: ``Mean`` node ``name`` averages the channels (``axis`` of its input) for a layer
        norm: ``role`` ``"mean"`` (``Mean(x)``) or ``"variance"`` (``Mean(SquaredDifference(x, mean))``).
        When channels go, it is corrected to average over all ``dim`` channels with the removed ones
        taken as zero (the same assumption as everywhere in pruning), so that pruning channels that
        are zero stays exact.
    ``dim`` is the axis length before the change; ``index_map`` maps group channels to positions.
    """

    kind: str
    name: str
    axis: int | None = None
    index_map: IndexMap | None = None
    dim: int | None = None
    role: str | None = None
    users: tuple = ()
    port: int | None = None

    @property
    def tensor(self) -> Tensor | None:
        """The tensor this member is (weights: the Weight node's output)."""
        return None if self.kind in ("reshape", "stat", "slice", "count") else Tensor.parse(self.name)

    def positions(self, keep: Sequence[int]) -> np.ndarray:
        """Old positions along ``axis`` that remain after :func:`apply_keep` with ``keep``, in order."""
        return self.index_map.positions(keep, self.dim)

    def __repr__(self) -> str:
        if self.kind == "reshape":
            return f"<Member reshape {self.name} port {self.port}>"
        if self.kind in ("slice", "count"):
            return f"<Member {self.kind} {self.name} axis {self.axis}>"
        if self.kind == "stat":
            return f"<Member stat {self.role} {self.name} axis {self.axis} dim {self.dim}>"
        role = f" {self.role}" if self.role else ""
        return f"<Member {self.kind}{role} {self.name} axis {self.axis} dim {self.dim} {self.index_map!r}>"


@dataclass
class ChannelGroup:
    """Everything that shrinks with one channel axis. See the module docstring.

    ``size`` is the number of group channels C (indexing ``keep``); ``seed`` the (tensor, axis) it was
    grown from; ``touches_outputs`` / ``touches_inputs`` list (signature name, axis) pairs of signature
    tensors inside the group; ``renormalized_by`` the Softmax-like nodes normalizing over the channels
    (fine for subset, not for exact pruning); ``reduced_by`` / ``ids`` the ops picking among the
    channels and their outputs holding channel indices; ``picks`` the blockers that read positions
    of the channel axis by index (:class:`Pick`: they do not stop :func:`apply_grow`).
    """

    seed: tuple
    size: int
    members: list = field(default_factory=list)
    blockers: list = field(default_factory=list)
    touches_outputs: list = field(default_factory=list)
    touches_inputs: list = field(default_factory=list)
    renormalized_by: list = field(default_factory=list)
    reduced_by: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    picks: list = field(default_factory=list)
    id: int = 0
    _keys: frozenset = field(default=frozenset(), repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"g{self.id}"

    @property
    def sources(self) -> list:
        """Weight members whose slices produce the channels (conv/matmul kernels' output axis)."""
        return [m for m in self.members if m.kind == "weight" and m.role == "source"]

    @property
    def sinks(self) -> list:
        """Weight members whose slices read the channels (the next kernels' input axis)."""
        return [m for m in self.members if m.kind == "weight" and m.role == "sink"]

    @property
    def prunable(self) -> bool:
        """Channels can be removed: no blocker, no signature input/output, no renormalization, nothing
        that picks among the channels (ArgMax, TopK, NMS over classes)."""
        return not (self.blockers or self.touches_outputs or self.touches_inputs or self.renormalized_by
                    or self.reduced_by)

    def why_not(self) -> str:
        """Why the group is not prunable ("" if it is)."""
        parts = [f"blocked at {b}" for b in self.blockers]
        parts += [f"output {n!r} axis {a}" for n, a in self.touches_outputs]
        parts += [f"input {n!r} axis {a}" for n, a in self.touches_inputs]
        parts += [f"renormalized by {n}" for n in self.renormalized_by]
        parts += [f"picked among by {n}" for n in self.reduced_by]
        return "; ".join(parts)

    @property
    def normalized_by(self) -> list:
        """Layer-norm statistics (Mean nodes) over the group's channels: pruning corrects them, but
        other changes (keeping classes, adding channels) would change what they compute."""
        return [m.name for m in self.members if m.kind == "stat"]

    def members_of(self, kind: str) -> list:
        return [m for m in self.members if m.kind == kind]

    def member(self, name: str, axis: int | None = None) -> Member:
        """The member called ``name`` (weight, Const, ``node:port`` tensor or reshape node)."""
        t = str(as_tensor(name)) if ":" in name else None
        for m in self.members:
            if (m.name == name or m.name == t) and (axis is None or m.axis == axis):
                return m
        raise KeyError(f"{name!r} is not a member of channel group {self.name}")

    def covers(self, tensor, axis: int) -> bool:
        """Whether axis ``axis`` of ``tensor`` (or some of its positions) belongs to the group."""
        return (as_tensor(tensor), axis) in self._keys


# ----------------------------------------------------------------------------------------- the walk
class _Walk:
    """Breadth-first closure of one group; rules see it as ``ctx``."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.maps: dict = {}  # (Tensor, axis) -> IndexMap
        self.order: list = []
        self.roles: dict = {}
        self.const_users: dict = {}
        self.shape_members: dict = {}  # node name -> port
        self.slice_members: dict = {}  # Slice/StridedSlice node name -> input axis
        self.count_members: dict = {}  # node name -> (port, element)
        self.stats: dict = {}  # Mean node name -> (role, input tensor, axis, extra)
        self.blockers: list = []
        self.outputs: list = []
        self.inputs: list = []
        self.renorm: list = []
        self.reductions: list = []
        self.ids: list = []  # (ids tensor, reduced tensor, axis)
        self.picks: list = []
        self.queue: deque = deque()

    # ---- for rules
    def in_shape(self, node: Node, port: int) -> tuple:
        s = self.graph.shape(self.graph.input(node, port))
        if s is None:
            raise Blocked(f"input {port} has an unknown rank")
        return s

    def out_shape(self, node: Node, port: int = 0) -> tuple:
        s = node.shapes[port] if port < len(node.shapes) else None
        if s is None:
            raise Blocked(f"output {port} has an unknown rank")
        return s

    def const(self, node: Node, port: int) -> np.ndarray:
        v = constant_value(self.graph, self.graph.input(node, port))
        if v is None:
            raise Blocked(f"input {port} is not a constant")
        return np.asarray(v)

    def shape_member(self, node: Node, port: int, axis: int | None = None) -> None:
        """Input ``port`` of ``node`` is a shape vector rebuilt for the new channel count of its output
        ``axis`` (None: any axis may change)."""
        _check_shape_input(self.graph, node, port, axis)
        self.shape_members[node.name] = port

    def slice_member(self, node: Node, axis: int) -> None:
        self.slice_members[node.name] = axis

    def count_member(self, node: Node, port: int, element: int) -> None:
        """Element ``element`` of constant input ``port`` of ``node`` is the channel count of its
        output axis ``element`` (rewritten when channels go or come). The input may also be a Pack of
        scalars whose element ``element`` is constant (a shape built from the run-time batch size)."""
        t = self.graph.input(node, port)
        if constant_value(self.graph, t) is None:
            src = self.graph.producer(t)
            if src.op != "Pack" or element >= len(self.graph.inputs_of(src)) or \
                    constant_value(self.graph, self.graph.input(src, element)) is None:
                raise Blocked(f"input {port} (the channel count, element {element}) is not a constant")
        self.count_members[node.name] = (port, element)

    def pick(self, node: Node, port: int, axis: int, position: int | None) -> None:
        """``node`` reads position ``position`` (None: positions chosen at run time) of ``axis`` of its
        input ``port``; the rule still blocks the group (see :class:`Pick`)."""
        p = Pick(node.name, str(self.graph.input(node, port)), axis, position)
        if p not in self.picks:
            self.picks.append(p)

    def reduces(self, node: Node, port: int, axis: int, ids_ports=()) -> None:
        """``node`` picks among the channels of its input ``port`` on ``axis`` (ArgMax, TopK, NMS over
        classes); its outputs ``ids_ports`` hold channel indices (positions on that axis). Fine for
        keeping classes, not for pruning."""
        if node.name not in self.reductions:
            self.reductions.append(node.name)
        src = self.graph.input(node, port)
        for p in ids_ports:
            entry = (str(node.output(p)), str(src), axis)
            if entry not in self.ids:
                self.ids.append(entry)

    def renormalizes(self, node: Node) -> None:
        if node.name not in self.renorm:
            self.renorm.append(node.name)

    # ---- engine
    def block(self, node: Node, reason: str) -> None:
        b = Blocker(node.name, node.op, reason)
        if b not in self.blockers:
            self.blockers.append(b)

    def run(self, tensor: Tensor, axis: int, imap: IndexMap) -> None:
        self.queue.append((tensor, axis, imap, None))
        while self.queue:
            self._visit(*self.queue.popleft())

    def _visit(self, t: Tensor, axis: int, imap: IndexMap, via) -> None:
        g = self.graph
        node = g.node(t.node)
        key = (t, axis)
        old = self.maps.get(key)
        if key in self.const_users and via is not None and via not in self.const_users[key]:
            self.const_users[key].append(via)
        if old is not None:
            if old == imap:
                return
            # A map may be partial (one Concat input knows only its own channels): maps of the same
            # (tensor, axis) merge, and the merged map propagates again. Positions claimed by two
            # channels, or channels of different widths, are a contradiction.
            try:
                imap = merge_maps(old, imap)
                check_map(imap, g.shape(t)[axis])
            except Blocked as exc:
                self.block(node, f"inconsistent channel mapping at {node.name} (tensor {t}, axis {axis}): "
                                 f"{exc}; reached as {old!r} and as {imap!r}")
                return
            if imap == old:
                return
        else:
            shape = g.shape(t)
            if shape is None or not 0 <= axis < len(shape) or shape[axis] is None:
                self.block(node, f"tensor {t} has no static length on axis {axis} (shape {shape})")
                return
            try:
                check_map(imap, shape[axis])
            except Blocked as exc:
                self.block(node, f"{exc} (tensor {t}, axis {axis})")
                return
            self.order.append(key)
            self.outputs += [(o.name, axis) for o in g.outputs if o.tensor == t]
            if node.op == "Placeholder":
                names = [a.name for a in g.inputs if a.tensor == t]
                self.inputs += [(n, axis) for n in names]
                if not names:
                    self.block(node, "a Placeholder that is not a signature input")
        self.maps[key] = imap
        if node.op == "Const":
            self.const_users.setdefault(key, [via] if via is not None else [])
            return  # constants are cloned per use: never couple their other readers
        if node.op not in (WEIGHT_OP, "Placeholder"):
            self._apply(node, Out(t.port, axis, imap))
        for consumer, port in g.consumers(t):
            self._apply(consumer, In(port, axis, imap))

    def _apply(self, node: Node, at: Link) -> None:
        rule = CHANNEL_RULES.get(node.op)
        if rule is None:
            self.block(node, f"no channel rule for op type {node.op}")
            return
        try:
            links = rule(self, node, at)
        except Blocked as exc:
            self.block(node, str(exc))
            return
        for link in links:
            if link.io == "out":
                t, via = node.output(link.port), None
            else:
                t, via = self.graph.input(node, link.port), (node.name, link.port)
            if link.role:
                self.roles.setdefault((t, link.axis), set()).add(link.role)
            self.queue.append((t, link.axis, link.imap, via))

    def group(self, seed, size: int) -> ChannelGroup:
        g = self.graph
        members, index = [], {}
        for t, axis in self.order:
            node = g.node(t.node)
            imap = self.maps[(t, axis)]
            dim = g.shape(t)[axis]
            if node.op == WEIGHT_OP:
                m = Member("weight", node.name, axis, imap, dim)
            elif node.op == "Const":
                m = Member("const", node.name, axis, imap, dim, users=tuple(self.const_users[(t, axis)]))
            else:
                m = Member("tensor", str(t), axis, imap, dim)
            members.append(m)
            index[(t, axis)] = m
        for (t, axis), roles in self.roles.items():
            role = "source" if "source" in roles else "sink"
            while True:  # a kernel read through Identity is still the kernel
                m = index.get((t, axis))
                if m is not None and m.role is None:
                    m.role = role
                if g.node(t.node).op != "Identity":
                    break
                t = g.input(t.node, 0)
            if g.node(t.node).op == "Reshape":  # and through Reshape (MultiHeadAttention's kernels)
                w = _reshaped_weight(g, t)
                for m in members:
                    if w is not None and m.kind == "weight" and m.name == w and m.role is None:
                        m.role = role
        for name, port in self.shape_members.items():
            members.append(Member("reshape", name, port=port))
        for name, axis in self.slice_members.items():
            members.append(Member("slice", name, axis))
        for name, (port, element) in self.count_members.items():
            members.append(Member("count", name, element, port=port))
        for name, (role, t, axis, extra) in self.stats.items():
            members.append(Member("stat", name, axis, self.maps[(t, axis)], g.shape(t)[axis], role=role,
                                  users=extra))
        return ChannelGroup(seed=seed, size=size, members=members, blockers=list(self.blockers),
                            touches_outputs=list(dict.fromkeys(self.outputs)),
                            touches_inputs=list(dict.fromkeys(self.inputs)), renormalized_by=list(self.renorm),
                            reduced_by=list(self.reductions), ids=list(self.ids), picks=list(self.picks),
                            _keys=frozenset(self.maps))


# ----------------------------------------------------------------------------------------- public API
def _norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ChannelError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def group_for(graph: Graph, tensor, axis: int) -> ChannelGroup:
    """The group of everything that must shrink together with axis ``axis`` of ``tensor``.

    ``tensor`` is a Tensor, ``"node:port"``, a node name (port 0; a weight name works too) or a Node.
    The group's channels are the positions of that axis (``size`` = its length). Example::

        grp = group_for(g, "model/dense_1/BiasAdd:0", -1)
        [m.name for m in grp.sources]                    # ['dense_1/kernel']
    """
    t = as_tensor(tensor)
    if not graph.has_node(t.node):
        raise ChannelError(f"no node {t.node!r} in the graph")
    shape = graph.shape(t)
    if shape is None:
        raise ChannelError(f"tensor {t} has an unknown rank; run graph.infer_shapes() first")
    axis = _norm_axis(axis, len(shape))
    dim = shape[axis]
    if dim is None:
        raise ChannelError(f"axis {axis} of tensor {t} has no static length (shape {shape})")
    walk = _Walk(graph)
    walk.run(t, axis, IndexMap.identity(dim))
    return walk.group((t, axis), dim)


def channel_groups(graph: Graph) -> list[ChannelGroup]:
    """All groups seeded at the output channels of every seed op (``seed=True`` in
    :mod:`graphslim.ir.ops`: Conv2D, MatMul, BatchMatMul*, Conv2DBackpropInput, Einsum) whose kernel is
    a weight, in graph order, each once (a residual stage is one group); then at every axis of a kernel
    weight (read through Identity or Reshape) that no group covers yet, kept when a kernel's slices
    produce its channels (it has a source): the heads of an attention kernel ``[in, heads, head_dim]``.
    A depthwise conv is no seed: it follows its input. Example::

        for grp in channel_groups(g):
            if grp.prunable:
                print(grp.name, grp.size, [s.name for s in grp.sources])
    """
    groups: list[ChannelGroup] = []
    for node in graph.nodes(op=ops.seed_ops()):
        port = ops.facts(node.op).kernel_port
        if graph.weight_of(node, port) is None or not node.shapes or node.shapes[0] is None:
            continue
        axis = ops.channel_axis(node, len(node.shapes[0]))
        if node.shapes[0][axis] is None or any(grp.covers(node.output(0), axis) for grp in groups):
            continue
        grp = group_for(graph, node.output(0), axis)
        grp.id = len(groups)
        groups.append(grp)
    for w in _kernel_weights(graph):
        t = graph.node(w).output(0)
        for axis, dim in enumerate(graph.shape(t) or ()):
            if dim is None or any(grp.covers(t, axis) for grp in groups):
                continue
            grp = group_for(graph, t, axis)
            if grp.sources:
                grp.id = len(groups)
                groups.append(grp)
    return groups


def hidden_size(graph: Graph, group: ChannelGroup) -> bool:
    """Whether ``group`` is a transformer's hidden size (its residual stream): a layer norm normalizes
    over it (it has ``stat`` members) and an embedding table produces it (a weight member read by a
    GatherV2 as its params, gathered along another axis than the group's: token, position and segment
    embeddings). ``prune`` leaves it alone unless ``hidden=true``."""
    if not group.normalized_by:
        return False
    for m in group.members_of("weight"):
        for node, port in graph.weight_readers(m.name):
            if node.op == "GatherV2" and port == 0:
                axis = constant_value(graph, graph.input(node, 2))
                if axis is not None and int(axis) % graph.weight(m.name).value.ndim != m.axis:
                    return True
    return False


def _reshaped_weight(graph: Graph, t: Tensor) -> str | None:
    """The weight that ``t`` is, through Identity and Reshape, or None."""
    src = graph.node(t.node)
    while src.op in ("Identity", "Reshape"):
        src = graph.input_node(src, 0)
    return src.name if src.op == WEIGHT_OP else None


def _kernel_weights(graph: Graph) -> list[str]:
    """Weights read as kernels (at a kernel op's kernel port, through Identity or Reshape), in graph
    order: their other axes seed groups too (an attention kernel ``[in, heads, head_dim]``: the heads)."""
    out: list[str] = []
    for node in graph.nodes(op=ops.kernel_ops()):
        w = _reshaped_weight(graph, graph.input(node, ops.facts(node.op).kernel_port))
        if w is not None and w not in out:
            out.append(w)
    return out


# ----------------------------------------------------------------------------------------- shape inputs
def _check_shape_input(graph: Graph, node: Node, port: int, axis: int | None = None) -> None:
    """Raise Blocked unless the shape-input rebuild of :mod:`graphslim.analysis.channel_apply` can
    rebuild input ``port`` of ``node``."""
    out = node.shapes[0] if node.shapes else None
    if out is None:
        raise Blocked("unknown output rank")
    unknown = sum(d is None for d in out)
    if node.op == "Reshape" and unknown <= 1:
        return
    src = graph.input_node(node, port)
    if src.op == "Const":
        if unknown == 0:
            return
    elif src.op == "Pack" and len(graph.inputs_of(src)) == len(out):
        return
    elif src.op == "ConcatV2" and all(concat_part(graph, src, i) is not None for i in range(len(out))) and \
            axis is not None and vector_element(graph, src.output(0), axis) is not None:
        return  # tf.tensordot's concat([shape(x)[:2], [C]]): the part holding the count is constant
    raise Blocked(f"its shape input {port} ({src.op} {src.name}) cannot be rebuilt for the new channel count")


# ----------------------------------------------------------------------------------------- report
def format_groups(groups: Sequence[ChannelGroup], verbose: bool = False) -> str:
    """One line per group: id, size, sources, number of members, prunable or why not (for
    ``graphslim inspect --groups``). With ``verbose``, every member follows its group."""
    lines = []
    for grp in groups:
        srcs = ", ".join(m.name for m in grp.sources) or "-"
        status = "prunable" if grp.prunable else f"not prunable: {grp.why_not()}"
        if grp.normalized_by:
            status += f"; {len(grp.normalized_by) // 2 or 1} layer norm(s) over it, corrected when pruned"
        lines.append(f"{grp.name:>4}  C={grp.size:<5} members={len(grp.members):<4} sources: {srcs}  [{status}]")
        if verbose:
            for m in grp.members:
                lines.append(f"        {m!r}")
    return "\n".join(lines)
