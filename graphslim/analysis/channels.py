"""Channel-dependency analysis: what must shrink together when one axis of one tensor shrinks.

A :class:`ChannelGroup` is everything tied to one channel axis: the weight slices that produce the
channels (a conv's output filters: the *sources*), the per-channel weights and constants applied to
them (bias, batch norm, ``Mul`` by a scale), the activations that carry them (coupled through residual
``Add``, ``Concat`` with offsets, depthwise convs, ``Reshape``/``Flatten``, ``Transpose``...) and the
weight slices that read them (the next conv's input channels: the *sinks*). Each member has an
:class:`IndexMap`: for every group channel ``c``, the positions along that member's axis that belong to
``c`` (one for a plain op; all spatial positions for Flatten→Dense; ``c·m … c·m+m−1`` after a depthwise
conv with multiplier ``m``; shifted by an offset after Concat; none for a Concat input that holds other
channels).

The analysis walks the graph in both directions from a seed (tensor, axis). What each op does with an
axis is a *rule* in a registry (``@channel_rule("Conv2D")``): given the (port, axis, index map) at which
the walk reaches the op, it returns the other ports and axes the channels continue to. An op without a
rule, or a rule that cannot carry the axis (a Split on the channel axis, a Reshape that splits it...),
*blocks* the group with a reason; nothing is guessed. A map may be partial (the group seeded on one
Concat input knows only its own positions of the Concat output); maps reaching the same (tensor, axis)
by different paths merge, and a contradiction (one position claimed by two channels) blocks as an
"inconsistent channel mapping". The same groups serve ``subset`` (seed: an output's class axis, keep an
explicit list) and ``prune`` (seed: every conv/matmul output, keep the important channels; all groups
in one :func:`apply_keeps`).

Example::

    from graphslim.analysis.channels import apply_keep, channel_groups, format_groups, group_for
    g = graphslim.load("resnet/")
    print(format_groups(channel_groups(g)))        # one line per group: size, sources, prunable or why not
    head = group_for(g, g.outputs[0].tensor, -1)   # the class axis of the first output
    apply_keep(g, head, [3, 7, 1])                 # classes 3, 7, 1, in that order

Static shapes must be current (the loader and every pass leave them so; else ``graph.infer_shapes()``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np

from graphslim.analysis.constants import constant_value
from graphslim.errors import PassError
from graphslim.ir.graph import WEIGHT_OP, Graph, Node, Tensor, as_tensor

__all__ = ["ChannelError", "Blocked", "IndexMap", "Link", "In", "Out", "Member", "Blocker", "ChannelGroup",
           "CHANNEL_RULES", "channel_rule", "group_for", "channel_groups", "apply_keep", "apply_keeps",
           "combined_positions", "format_groups", "apply_grow", "apply_grows", "Pick", "pick_vectors"]


class ChannelError(PassError):
    """A channel group cannot be changed as asked (blocked group, bad keep list, stale group)."""


class Blocked(Exception):
    """Raised by a channel rule: the op cannot carry this axis. The message says why."""


# ----------------------------------------------------------------------------------------- index maps
class IndexMap:
    """For each of the ``C`` group channels, the positions along one axis of one member.

    Stored as an int64 array ``rows`` of shape ``[C, k]``: row ``c`` lists channel ``c``'s ``k``
    positions in ascending order, or is all ``-1`` when channel ``c`` has no position on this axis.
    Non-empty rows are translates of each other (``rows[c] - rows[c][0]`` is the same for every c):
    sub-index ``j`` is the same "rest" coordinate (spatial position, anchor, multiplier slot) for all
    channels, which is what makes reordering channels well defined.

    Example: a conv with 3 output channels flattened from a 2×2 feature map into a Dense layer: the
    Dense kernel's axis 0 has ``IndexMap([[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])``.
    """

    __slots__ = ("rows",)

    def __init__(self, rows):
        arr = np.array(rows, dtype=np.int64)
        if arr.ndim == 1:
            arr = arr[:, None]
        arr.setflags(write=False)
        self.rows = arr

    @classmethod
    def identity(cls, n: int) -> "IndexMap":
        return cls(np.arange(n)[:, None])

    @property
    def size(self) -> int:
        """Number of group channels ``C``."""
        return self.rows.shape[0]

    @property
    def width(self) -> int:
        """Positions per (present) channel."""
        return self.rows.shape[1]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, c: int) -> np.ndarray:
        """The positions of group channel ``c`` (empty if it has none on this axis)."""
        r = self.rows[c]
        return r[r >= 0]

    @property
    def present(self) -> np.ndarray:
        """Boolean mask: which group channels have positions on this axis."""
        return self.rows[:, 0] >= 0

    def covered(self) -> np.ndarray:
        """All positions that belong to some group channel, ascending."""
        return np.sort(self.rows[self.rows >= 0])

    def tolist(self) -> list[list[int]]:
        return [self[c].tolist() for c in range(self.size)]

    def __eq__(self, other) -> bool:
        return isinstance(other, IndexMap) and self.rows.shape == other.rows.shape and bool(
            np.array_equal(self.rows, other.rows))

    __hash__ = None

    def __repr__(self) -> str:
        if self.width == 1 and np.array_equal(self.rows[:, 0], np.arange(self.size)):
            return f"IndexMap(identity {self.size})"
        head = ", ".join(str(r) for r in self.tolist()[:4])
        return f"IndexMap(C={self.size}, k={self.width}: {head}{', ...' if self.size > 4 else ''})"

    def positions(self, keep: Sequence[int], dim: int) -> np.ndarray:
        """Old positions, in new order, along an axis of length ``dim`` after keeping group channels
        ``keep`` (in that order).

        Positions of no group channel stay where they are; those of removed channels go. For a sorted
        ``keep`` this is just the surviving positions in ascending order. For a reordering, each slot
        that held channel ``sorted(keep)[i]`` (sub-index ``j``) now holds channel ``keep[i]`` (same
        ``j``): the layout of the axis is unchanged except for which channel sits where. Raises
        ValueError when the order cannot be realized on this axis (e.g. it would move a channel from
        one Concat input into another's range).
        """
        return combined_positions(dim, [(self, keep)])


def combined_positions(dim: int, parts: Sequence[tuple]) -> np.ndarray:
    """Old positions, in new order, along an axis of length ``dim`` shared by several groups: ``parts``
    is a list of ``(IndexMap, keep)``, one per group, owning disjoint positions (e.g. the branches of a
    Concat). Positions no group owns stay in place. See :meth:`IndexMap.positions`."""
    owner = np.full(dim, -1, dtype=np.int64)  # part index
    chan = np.full(dim, -1, dtype=np.int64)
    sub = np.zeros(dim, dtype=np.int64)
    kept = np.ones(dim, dtype=bool)
    for i, (imap, keep) in enumerate(parts):
        rows = imap.rows
        valid = rows >= 0
        pos = rows[valid]
        if (owner[pos] >= 0).any():
            raise ValueError("two groups own the same position on this axis")
        c_idx, j_idx = np.nonzero(valid)
        owner[pos], chan[pos], sub[pos] = i, c_idx, j_idx
        keep_mask = np.zeros(imap.size, dtype=bool)
        keep_mask[np.asarray(keep, dtype=np.int64)] = True
        kept[pos] = keep_mask[c_idx]
    out = np.arange(dim)[kept]
    for i, (imap, keep) in enumerate(parts):
        keep = np.asarray(keep, dtype=np.int64)
        skeep = np.sort(keep)
        if np.array_equal(skeep, keep):
            continue
        present = imap.present
        bad = np.nonzero(present[skeep] != present[keep])[0]
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"group channel {int(keep[j])} cannot take the place of channel {int(skeep[j])}: "
                             f"only one of them has positions on this axis (e.g. they come from different "
                             f"Concat inputs); keep them in an order that leaves each part's channels together")
        rank = np.zeros(imap.size, dtype=np.int64)
        rank[skeep] = np.arange(len(skeep))
        mine = owner[out] == i
        q = out[mine]
        out[mine] = imap.rows[keep[rank[chan[q]]], sub[q]]
    return out


def _normalize(rows, what: str = "this axis") -> IndexMap:
    """Rows with -1 holes → an IndexMap (each row sorted, empty rows all -1); every non-empty row must
    have the same number of positions."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim == 1:
        rows = rows[:, None]
    valid = rows >= 0
    counts = valid.sum(axis=1)
    widths = np.unique(counts[counts > 0])
    if widths.size > 1:
        raise Blocked(f"group channels cover different numbers of positions on {what} "
                      f"({', '.join(str(int(w)) for w in widths)})")
    k = int(widths[0]) if widths.size else 1
    big = np.iinfo(np.int64).max
    s = np.sort(np.where(valid, rows, big), axis=1)[:, :k]
    s[s == big] = -1
    return IndexMap(s)


def _rows_from_labels(labels: np.ndarray, size: int, what: str) -> IndexMap:
    """``labels[q]`` = group channel owning position q (or -1) → IndexMap."""
    pos = np.nonzero(labels >= 0)[0]
    lab = labels[pos]
    counts = np.bincount(lab, minlength=size)
    widths = np.unique(counts[counts > 0])
    if widths.size > 1:
        raise Blocked(f"group channels cover different numbers of positions on {what}")
    k = int(widths[0]) if widths.size else 1
    rows = np.full((size, k), -1, dtype=np.int64)
    order = np.lexsort((pos, lab))
    lab, pos = lab[order], pos[order]
    if pos.size:
        rows[lab, np.arange(pos.size) - np.repeat(np.cumsum(counts) - counts, counts)] = pos
    return IndexMap(rows)


def _check_map(imap: IndexMap, dim: int) -> None:
    rows = imap.rows
    pos = rows[rows >= 0]
    if pos.size and (pos.max() >= dim):
        raise Blocked(f"channel positions up to {int(pos.max())} on an axis of length {dim}")
    if np.unique(pos).size != pos.size:
        raise Blocked("two group channels share a position on this axis")
    full = rows[imap.present]
    if len(full) > 1:
        rel = full - full[:, :1]
        if not (rel == rel[0]).all():
            raise Blocked("irregular channel layout (channels' positions are not translates of each other)")


def _merge(a: IndexMap, b: IndexMap) -> IndexMap:
    """Union of two maps of the same group channels (each channel's positions from both)."""
    if a.size != b.size:
        raise Blocked(f"maps of {a.size} and {b.size} channels")
    both = np.sort(np.concatenate([a.rows, b.rows], axis=1), axis=1)
    dup = np.zeros_like(both, dtype=bool)
    dup[:, 1:] = both[:, 1:] == both[:, :-1]
    return _normalize(np.where(dup, -1, both))


def _shift(imap: IndexMap, delta: int) -> IndexMap:
    return IndexMap(np.where(imap.rows >= 0, imap.rows + delta, -1))


def _restrict(imap: IndexMap, lo: int, hi: int, what: str) -> IndexMap:
    r = imap.rows
    return _normalize(np.where((r >= lo) & (r < hi), r - lo, -1), what)


def _expand(imap: IndexMap, mult: int) -> IndexMap:
    """Each position i → positions i·mult … i·mult+mult−1 (depthwise multiplier)."""
    r = imap.rows
    out = (r[:, :, None] * mult + np.arange(mult)).reshape(r.shape[0], -1)
    return _normalize(np.where(np.repeat(r >= 0, mult, axis=1), out, -1))


def _collapse(imap: IndexMap, mult: int) -> IndexMap:
    """Inverse of :func:`_expand`; every channel must own whole blocks of ``mult`` positions."""
    r = imap.rows
    if mult == 1:
        return imap
    if r.shape[1] % mult:
        raise Blocked(f"group channels split the depthwise multiplier blocks of {mult}")
    blocks = r.reshape(r.shape[0], -1, mult)
    base = blocks[:, :, :1]
    ok = (blocks < 0).all(axis=2) | ((base % mult == 0) & (blocks == base + np.arange(mult))).all(axis=2)
    if not ok.all():
        raise Blocked(f"group channels split the depthwise multiplier blocks of {mult}")
    return _normalize(np.where(base[:, :, 0] >= 0, base[:, :, 0] // mult, -1))


# ----------------------------------------------------------------------------------------- rule API
class Link(NamedTuple):
    """One end of a channel relation at a node: input or output ``port``, ``axis`` and index map.

    ``role`` marks weight positions: ``"source"`` (the slice that produces the channels, e.g. a conv
    kernel's output axis) or ``"sink"`` (the slice that reads them, e.g. the next kernel's input axis).
    """

    io: str  # "in" | "out"
    port: int
    axis: int
    imap: IndexMap
    role: str | None = None


def In(port: int, axis: int, imap: IndexMap, role: str | None = None) -> Link:
    return Link("in", port, axis, imap, role)


def Out(port: int, axis: int, imap: IndexMap, role: str | None = None) -> Link:
    return Link("out", port, axis, imap, role)


#: op type → rule ``(ctx, node, at: Link) -> list[Link]``; ``at`` is where the walk reached the node.
CHANNEL_RULES: dict[str, Callable] = {}


def channel_rule(*ops: str):
    """Register a channel rule for op types ``ops``.

    A rule gets the walk context (``ctx.graph``, ``ctx.in_shape(node, port)``, ``ctx.const(node,
    port)``, ``ctx.shape_member(node, port)``, ``ctx.renormalizes(node)``), the node, and the
    :class:`Link` at which the channels arrive (an input port, or an output port when walking
    backwards). It returns the links the channels continue to (it may include ``at`` itself, e.g. to
    give it a role), or raises :class:`Blocked` with the reason. Example::

        @channel_rule("MyScale")              # y = x * s, per channel, like Mul
        def _my_scale(ctx, node, at):
            return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]
    """

    def deco(fn):
        for op in ops:
            CHANNEL_RULES[op] = fn
        return fn

    return deco


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

    def shape_member(self, node: Node, port: int) -> None:
        _check_shape_input(self.graph, node, port)
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
                imap = _merge(old, imap)
                _check_map(imap, g.shape(t)[axis])
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
                _check_map(imap, shape[axis])
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


#: op type → its output channel axis (the kernel is input 1)
SEED_OPS = {
    "Conv2D": lambda node: _channel_axis(node, 4),
    "Conv2DBackpropInput": lambda node: _channel_axis(node, 4),
    "MatMul": lambda node: 1,
    "BatchMatMulV2": lambda node: len(node.shapes[0]) - 1,
}


def channel_groups(graph: Graph) -> list[ChannelGroup]:
    """All groups seeded at the output channels of every Conv2D / MatMul / BatchMatMulV2 /
    Conv2DBackpropInput whose kernel (input 1) is a weight, in graph order, each once (a residual stage
    is one group). A depthwise conv is no seed: it follows its input. Example::

        for grp in channel_groups(g):
            if grp.prunable:
                print(grp.name, grp.size, [s.name for s in grp.sources])
    """
    groups: list[ChannelGroup] = []
    for node in graph.nodes(op=SEED_OPS):
        if graph.weight_of(node, 1) is None or not node.shapes or node.shapes[0] is None:
            continue
        axis = SEED_OPS[node.op](node)
        if node.shapes[0][axis] is None or any(grp.covers(node.output(0), axis) for grp in groups):
            continue
        grp = group_for(graph, node.output(0), axis)
        grp.id = len(groups)
        groups.append(grp)
    return groups


def _current_dim(graph: Graph, m: Member) -> int | None:
    if m.kind == "stat":
        if not graph.has_node(m.name):
            return None
        s = graph.shape(graph.input(m.name, 0))
        return None if s is None or len(s) <= m.axis else s[m.axis]
    if m.kind == "weight":
        w = graph.weights.get(m.name)
        return None if w is None or w.value.ndim <= m.axis else w.value.shape[m.axis]
    if not graph.has_node(m.tensor.node):
        return None
    s = graph.shape(m.tensor)
    return None if s is None or len(s) <= m.axis else s[m.axis]


def _check_keep(keep, size: int) -> np.ndarray:
    try:
        arr = np.asarray(list(keep))
    except TypeError:
        raise ChannelError(f"keep must be a sequence of channel indices, got {keep!r}") from None
    if arr.size == 0:
        raise ChannelError("keep is empty: at least one channel must remain")
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ChannelError(f"keep must be a list of integer channel indices, got {list(keep)!r}")
    bad = [int(k) for k in arr if not 0 <= k < size]
    if bad:
        raise ChannelError(f"keep has indices {bad} outside the group's channels 0..{size - 1}")
    if np.unique(arr).size != arr.size:
        dup = sorted({int(k) for k in arr if (arr == k).sum() > 1})
        raise ChannelError(f"keep repeats channels {dup}; each channel may be kept once")
    return arr.astype(np.int64)


def apply_keep(graph: Graph, group: ChannelGroup, keep: Sequence[int]) -> None:
    """Keep group channels ``keep`` (in that order) in every member of ``group``; mutate ``graph``.

    Weights and Consts are sliced with :meth:`Member.positions` along their axis (weights keep their
    names; a Const also read outside the group is cloned), shape vectors of Reshapes are rebuilt from
    the new static shapes (batch dim −1), then shapes re-infer and every weight and activation member
    is checked to have its expected new length. Everything is validated before the first edit, and a
    failure while editing restores the graph: it is never left half-changed. Raises
    :class:`ChannelError`. Example::

        grp = group_for(g, "conv1/kernel", 3)
        apply_keep(g, grp, [0, 2, 5])          # conv1 keeps filters 0, 2, 5; its readers follow
    """
    apply_keeps(graph, [(group, keep)])


def apply_keeps(graph: Graph, changes: Sequence[tuple]) -> None:
    """:func:`apply_keep` for several groups at once: ``changes`` is a list of ``(group, keep)``, all
    computed on the current graph (one shape inference; groups sharing a member, like the branches of
    a Concat, are combined on it). This is how ``prune`` changes every group in one step. Example::

        groups = [grp for grp in channel_groups(g) if grp.prunable]
        apply_keeps(g, [(grp, range(grp.size // 2)) for grp in groups])
    """
    entries: dict[tuple, dict] = {}
    reshapes: dict[str, int] = {}
    slices: dict[str, int] = {}
    counts: dict[str, tuple] = {}
    seen: set[int] = set()
    for group, keep in changes:
        if id(group) in seen:
            raise ChannelError(f"channel group {group.name} is given twice")
        seen.add(id(group))
        if group.blockers:
            raise ChannelError(f"channel group {group.name} (seed {group.seed[0]} axis {group.seed[1]}) cannot be "
                               f"changed: blocked at " + "; ".join(str(b) for b in group.blockers))
        keep = _check_keep(keep, group.size)
        for m in group.members:
            if m.kind in ("reshape", "slice", "count"):
                if not graph.has_node(m.name):
                    raise ChannelError(f"channel group {group.name} is stale: node {m.name!r} is gone")
                if m.kind == "reshape":
                    reshapes[m.name] = m.port
                elif m.kind == "slice":
                    slices[m.name] = m.axis
                else:
                    counts[m.name] = (m.port, m.axis)
                continue
            cur = _current_dim(graph, m)
            if cur != m.dim:
                raise ChannelError(f"channel group {group.name} is stale: {m.kind} {m.name!r} axis {m.axis} has "
                                   f"length {cur}, the group was computed for {m.dim}; recompute the group")
            e = entries.setdefault((m.kind, m.name, m.axis), {"member": m, "parts": [], "users": []})
            e["parts"].append((m.index_map, keep))
            e["users"] += [u for u in m.users if u not in e["users"]]
    for (kind, name, axis), e in entries.items():
        try:
            e["positions"] = combined_positions(e["member"].dim, e["parts"])
        except ValueError as exc:
            raise ChannelError(f"cannot apply the keep lists to {kind} {name!r} axis {axis}: {exc}") from None
    undo: list[Callable] = []
    replaced: list[Tensor] = []  # shape vectors no longer read: removed once all went well
    try:
        _slice_values(graph, entries, undo)
        _correct_stats(graph, entries, undo)
        for name, axis in slices.items():
            _rebuild_slice(graph, graph.node(name), axis, entries, undo)
        for name, (port, element) in counts.items():
            e = entries.get(("tensor", str(graph.node(name).output(0)), element))
            if e is not None:
                _set_count(graph, graph.node(name), port, element, len(e["positions"]), undo)
        for name, port in reshapes.items():
            node = graph.node(name)
            out = str(node.output(0))
            new = tuple(len(entries[("tensor", out, a)]["positions"]) if ("tensor", out, a) in entries else d
                        for a, d in enumerate(node.shapes[0]))
            replaced += _rebuild_shape_input(graph, node, port, new, undo)
        graph.infer_shapes()
        for (kind, name, axis), e in entries.items():
            got = _current_dim(graph, e["member"]) if kind in ("tensor", "weight") else None
            if got is not None and got != len(e["positions"]):
                raise ChannelError(f"after the change, {kind} {name!r} axis {axis} has length {got}, expected "
                                   f"{len(e['positions'])}")
    except Exception:
        for fn in reversed(undo):
            fn()
        try:
            graph.infer_shapes()
        except Exception:  # the graph inferred before: only a broken input gets here
            pass
        raise
    _remove_orphans(graph, [t.node for t in replaced])


def _correct_stats(graph: Graph, entries: dict, undo: list) -> None:
    """Make each layer-norm statistic over pruned channels average over all its original channels,
    the removed ones counting as zero: mean' = mean·C'/C and variance' = variance·C'/C + (C−C')/C·mean'²
    (the removed channels' squared deviation from the mean). Means first: the variance reads the
    corrected mean."""
    stats = [e for (kind, _, _), e in entries.items() if kind == "stat"]
    stats.sort(key=lambda e: e["member"].role != "mean")
    for e in stats:
        m = e["member"]
        total, kept = m.dim, len(e["positions"])
        if kept == total:
            continue
        node = graph.node(m.name)
        dtype = node.attr("T")
        np_dtype = np.dtype(dtype.as_numpy_dtype) if hasattr(dtype, "as_numpy_dtype") else np.float32
        added = []

        def add(op, inputs, value=None, base=node.name):
            attrs = {"dtype": dtype, "value": np.asarray(value, np_dtype)} if op == "Const" else {"T": dtype}
            n = graph.add_node(f"{base}/pruned_{len(added)}", op, inputs, attrs=attrs, unique=True)
            added.append(n.name)
            # Undone in reverse, readers before what they read; registered at once, so a failure
            # partway through a statistic leaves no node behind.
            undo.append(lambda name=n.name: graph.remove_node(name, safe=False))
            return n.output(0)

        out = add("Mul", [node.output(0), add("Const", [], kept / total)])
        if m.role == "variance":
            sd_name, port = m.users[0]
            mean = graph.input(sd_name, port)
            extra = add("Mul", [add("Square", [mean]), add("Const", [], (total - kept) / total)])
            out = add("AddV2", [out, extra])
        for consumer, port in list(graph.consumers(node.output(0))):
            if consumer.name in added:
                continue
            graph.set_input(consumer, port, out)
            undo.append(lambda c=consumer, p=port, t=node.output(0): graph.set_input(c, p, t))


def _sparse_index(node: Node, axis: int, rank: int, n_spec: int) -> int | None:
    """The entry of a StridedSlice's begin/end/strides vectors that governs input axis ``axis`` (None
    when an ellipsis covers it, or no entry does: the whole axis). Slice: the axis itself."""
    if node.op == "Slice":
        return axis
    ell = node.attr("ellipsis_mask", 0)
    if not ell:
        return axis if axis < n_spec else None
    e = (ell & -ell).bit_length() - 1  # the first ellipsis entry
    after = n_spec - e - 1
    if axis < e:
        return axis
    if axis >= rank - after:
        return e + 1 + axis - (rank - after)
    return None


def _slice_range(node: Node, begin, end_or_size, dim: int, i: int) -> tuple[int, int]:
    """``[lo, hi)`` that Slice/StridedSlice ``node`` takes (stride 1) of a length-``dim`` axis whose
    begin/end entry is ``i`` (see :func:`_sparse_index`)."""
    b = int(begin[i])
    if node.op == "Slice":
        size = int(end_or_size[i])
        return b, dim if size == -1 else b + size
    lo = 0 if node.attr("begin_mask", 0) >> i & 1 else (b + dim if b < 0 else min(b, dim))
    e = int(end_or_size[i])
    hi = dim if node.attr("end_mask", 0) >> i & 1 else (e + dim if e < 0 else min(e, dim))
    return lo, hi


def _rebuild_slice(graph: Graph, node: Node, axis: int, entries: dict, undo: list) -> None:
    """New begin and end/size of a slice member along input ``axis``: the surviving input positions
    inside its old range, which must be contiguous in the new order (else ChannelError)."""
    src = graph.input(node, 0)
    e = entries.get(("tensor", str(src), axis))
    if e is None:
        return
    pos = np.asarray(e["positions"])
    begin = np.atleast_1d(constant_value(graph, graph.input(node, 1))).astype(np.int64)
    end = np.atleast_1d(constant_value(graph, graph.input(node, 2))).astype(np.int64)
    i = _sparse_index(node, axis, len(graph.shape(src)), len(begin))
    lo, hi = _slice_range(node, begin, end, e["member"].dim, i)
    inside = np.nonzero((pos >= lo) & (pos < hi))[0]
    if inside.size == 0:
        raise ChannelError(f"{node.op} {node.name!r} would take nothing of axis {axis}: every channel in its "
                           f"range [{lo}, {hi}) goes")
    if not np.array_equal(inside, np.arange(inside[0], inside[-1] + 1)):
        raise ChannelError(f"{node.op} {node.name!r} takes positions [{lo}, {hi}) of axis {axis}; the channels "
                           "kept there would not be contiguous in the new order (keep the classes of each "
                           "slice together, e.g. background=true keeps class 0 first)")
    new_begin, new_end = begin.copy(), end.copy()
    new_begin[i] = inside[0]
    new_end[i] = inside.size if node.op == "Slice" else inside[-1] + 1
    for port, value in ((1, new_begin), (2, new_end)):
        old_t = graph.input(node, port)
        dtype = graph.dtype(old_t)
        c = graph.add_node(f"{node.name}/{'begin' if port == 1 else 'end'}", "Const", unique=True,
                           attrs={"dtype": dtype, "value": value.astype(dtype.as_numpy_dtype)})
        undo.append(lambda n=c.name: graph.remove_node(n, safe=False))
        graph.set_input(node, port, c.output(0))
        undo.append(lambda p=port, t=old_t: graph.set_input(node, p, t))
    if node.op == "StridedSlice":  # the range is explicit now
        for mask in ("begin_mask", "end_mask"):
            old = node.attr(mask, 0)
            if old >> i & 1:
                node.set_attr(mask, old & ~(1 << i))
                undo.append(lambda m=mask, v=old: node.set_attr(m, v))


def _set_count(graph: Graph, node: Node, port: int, element: int, count: int, undo: list) -> None:
    """Point constant input ``port`` of ``node`` at a copy whose element ``element`` is ``count`` (for a
    Pack of scalars: a copy of the Pack with that element replaced)."""
    old_t = graph.input(node, port)
    value = constant_value(graph, old_t)
    if value is None:  # Pack(batch, ..., C, ...): the count is one constant element
        pack = graph.producer(old_t)
        elems = graph.inputs_of(pack)
        et = graph.dtype(elems[element])
        e = graph.add_node(f"{pack.name}/count", "Const", unique=True,
                           attrs={"dtype": et, "value": np.array(count, dtype=et.as_numpy_dtype)})
        undo.append(lambda n=e.name: graph.remove_node(n, safe=False))
        c = graph.add_node(f"{pack.name}/counted", "Pack", elems[:element] + [e.output(0)] + elems[element + 1:],
                           attrs={k: v for k, v in pack.attrs.items()}, unique=True)
    else:
        value = np.array(value)
        value[element] = count
        c = graph.add_node(f"{node.name}/count", "Const", unique=True,
                           attrs={"dtype": graph.dtype(old_t), "value": value})
    undo.append(lambda n=c.name: graph.remove_node(n, safe=False))
    graph.set_input(node, port, c.output(0))
    undo.append(lambda: graph.set_input(node, port, old_t))


def _remove_orphans(graph: Graph, names: list) -> None:
    """Remove nodes nothing reads any more (the old shape vectors: Pack ← StridedSlice ← Shape), and
    then their inputs that became unread. Weights and Placeholders stay."""
    todo = list(names)
    while todo:
        name = todo.pop()
        if not graph.has_node(name):
            continue
        node = graph.node(name)
        if node.op in (WEIGHT_OP, "Placeholder") or graph.consumers(node) or graph.control_consumers(node) \
                or any(o.tensor.node == name for o in graph.outputs):
            continue
        todo += [t.node for t in graph.inputs_of(node)] + graph.control_inputs_of(node)
        graph.remove_node(name)


def _slice_values(graph: Graph, entries: dict, undo: list) -> None:
    by_value: dict[tuple, list] = {}
    for (kind, name, axis), e in entries.items():
        if kind in ("weight", "const"):
            by_value.setdefault((kind, name), []).append(e)
    for (kind, name), es in by_value.items():
        if kind == "weight":
            old = graph.weight(name).value
            new = old
            for e in es:
                new = np.take(new, e["positions"], axis=e["member"].axis)
            graph.set_weight(name, new)
            undo.append(lambda name=name, old=old: graph.set_weight(name, old))
            continue
        node = graph.node(name)
        new = node.attr("value")
        users = []
        for e in es:
            new = np.take(new, e["positions"], axis=e["member"].axis)
            users += [u for u in e["users"] if u not in users]
        readers = {(c.name, p) for c, p in graph.consumers(node.output(0))}
        if readers <= set(users) and not graph.is_output(node.output(0)):
            old_attr = node.attrs["value"]
            node.set_attr("value", np.ascontiguousarray(new))
            undo.append(lambda node=node, a=old_attr: node.attrs.__setitem__("value", a))
        else:  # other readers keep the original constant
            clone = graph.add_node(f"{name}/kept", "Const", attrs={"dtype": node.attr("dtype"),
                                                                   "value": np.ascontiguousarray(new)}, unique=True)
            undo.append(lambda c=clone.name: graph.remove_node(c, safe=False))
            for user, port in users:
                graph.set_input(user, port, clone.output(0))
                undo.append(lambda u=user, p=port, t=node.output(0): graph.set_input(u, p, t))


class _Layout(NamedTuple):
    """How a member's channels sit on an axis that can grow (see :func:`_grow_layout`)."""

    kind: str  # "tail" | "interleaved" | "blocked"
    csize: int  # channels the layout counts (the group's, or those past a background slice)
    start: int  # "tail": the position of the first present channel


def _grow_layout(imap: IndexMap, dim: int) -> _Layout | None:
    """How channels sit on an axis that can grow, or None when they do not fill it regularly:

    * ``tail``: one position per channel, consecutive, up to the end of the axis (plain channels; past
      a slice that dropped the background; the last part of a Concat, ``[boxes | classes]``): new
      channels are appended at the end;
    * ``interleaved``: position ``c + C·j`` (Flatten, the detection reshape ``[N, H·W·A, K]``, boxes
      decoded per anchor and class ``[N, anchors·K, 4]``);
    * ``blocked``: position ``c·k + j`` (depthwise multiplier, ``[N, 4K]`` per-class boxes).

    Channels the group does not reach may lead (a background class that only the scores have): with
    ``C·k`` positions they are counted as the group's (their slices stay as they are), with
    ``(C − absent)·k`` the layout counts only the present ones."""
    rows = imap.rows
    size, k = rows.shape
    present = imap.present
    if not present.any():
        return None
    off = int(np.argmax(present))
    if not present[off:].all():
        return None
    r = rows[off:]
    if k == 1:
        p0 = int(r[0, 0])
        if p0 + size - off == dim and np.array_equal(r[:, 0], np.arange(p0, dim)):
            return _Layout("tail", size - off, p0)
    j = np.arange(k)[None, :]
    for cs, c in ((size, np.arange(off, size)[:, None]), (size - off, np.arange(size - off)[:, None])):
        if dim != cs * k or (cs != size and not off):
            continue
        if np.array_equal(r, c + cs * j):
            return _Layout("interleaved", cs, 0)
        if np.array_equal(r, c * k + j):
            return _Layout("blocked", cs, 0)
    return None


def _grown_length(m, lay: _Layout, n: int) -> int:
    return m.dim + n if lay.kind == "tail" else m.dim // lay.csize * (lay.csize + n)


def _grow_value(value: np.ndarray, axis: int, lay: _Layout, k: int, new: np.ndarray) -> np.ndarray:
    v = np.moveaxis(value, axis, 0)
    rest = v.shape[1:]
    size = lay.csize
    if lay.kind == "tail":  # [..., C] → [..., C, n]
        v = np.concatenate([v, new.reshape(-1, *rest)], axis=0)
    elif lay.kind == "interleaved":  # [k, C, ...] → [k, C+n, ...]
        v = v.reshape(k, size, *rest)
        v = np.concatenate([v, np.swapaxes(new, 0, 1)], axis=1).reshape(-1, *rest)
    else:  # [C, k, ...] → [C+n, k, ...]
        v = np.concatenate([v.reshape(size, k, *rest), new], axis=0).reshape(-1, *rest)
    return np.ascontiguousarray(np.moveaxis(v, 0, axis))


def _channel_blocks(value: np.ndarray, axis: int, lay: _Layout, k: int) -> np.ndarray:
    """The existing channels' slices as ``[C, k, ...rest]`` (channel first)."""
    v = np.moveaxis(value, axis, 0)
    rest = v.shape[1:]
    if lay.kind == "tail":
        return v[lay.start:lay.start + lay.csize].reshape(lay.csize, 1, *rest)
    if lay.kind == "interleaved":
        return np.swapaxes(v.reshape(k, lay.csize, *rest), 0, 1)
    return v.reshape(lay.csize, k, *rest)


def _grow_slice(graph: Graph, group: ChannelGroup, m: Member, n: int, plan: list) -> None:
    """Check a slice member before growing. New channels come at the end of the axis (or, interleaved,
    between the old ones): a range up to the end of the axis takes them (an explicit end is moved by
    ``n``: appended to ``plan``), a range ending before it (the boxes of ``[boxes | classes]``) does
    not need them; a range of an interleaved axis cannot follow."""
    node = graph.node(m.name)
    src = graph.input(node, 0)
    dim = graph.shape(src)[m.axis]
    begin = np.atleast_1d(constant_value(graph, graph.input(node, 1))).astype(np.int64)
    end = np.atleast_1d(constant_value(graph, graph.input(node, 2))).astype(np.int64)
    i = _sparse_index(node, m.axis, len(graph.shape(src)), len(begin))
    lo, hi = _slice_range(node, begin, end, dim, i)
    try:
        lay = _grow_layout(group.member(str(src), m.axis).index_map, dim)
    except KeyError:
        lay = None
    if lay is None or (lay.kind == "interleaved" and lay.csize != dim):
        raise ChannelError(f"cannot add channels to channel group {group.name}: {node.op} {m.name!r} takes positions "
                           f"[{lo}, {hi}) of axis {m.axis}, where the new channels would not come at the end")
    if hi == dim:
        open_end = (node.op == "Slice" and end[i] == -1) or \
            (node.op == "StridedSlice" and node.attr("end_mask", 0) >> i & 1)
        if not open_end:
            plan.append((node, i, n if lay.kind == "tail" else dim // lay.csize * n))


def _move_slice_end(graph: Graph, node: Node, i: int, n: int, undo: list) -> None:
    """Move the explicit end (Slice: size) of entry ``i`` of a slice by ``n``."""
    old_t = graph.input(node, 2)
    value = np.array(np.atleast_1d(constant_value(graph, old_t)))
    if value[i] >= 0:  # a negative end counts from the end, which moves with it
        value[i] += n
    c = graph.add_node(f"{node.name}/end", "Const", unique=True,
                       attrs={"dtype": graph.dtype(old_t), "value": value})
    undo.append(lambda n=c.name: graph.remove_node(n, safe=False))
    graph.set_input(node, 2, c.output(0))
    undo.append(lambda: graph.set_input(node, 2, old_t))


def apply_grow(graph: Graph, group: ChannelGroup, n: int, init: Callable, allow_picks: bool = False) -> None:
    """Add ``n`` channels after the group's ``C`` (the inverse of :func:`apply_keep`): every weight and
    Const member grows along its axis, activations and Reshape targets follow, old channels keep
    their values exactly. ``init(member, existing)`` gets the member and its existing channels as an
    array ``[C, k, ...]`` and returns the new ones ``[n, k, ...]``. Only axes the group covers in a
    regular layout can grow (plain channels, the last part of a Concat, Flatten, detection reshapes,
    depthwise multipliers: see :func:`_grow_layout`); otherwise :class:`ChannelError` names the member.
    With ``allow_picks``, blockers that read positions by index (:class:`Pick`: ``x[..., j]`` of a
    post-processing unrolled per class, a gather by class ids) do not stop the growth: they read the
    same old positions afterwards, and the caller makes the new channels reach them (it clones the
    unrolled classes, grows the gathered axis). Validated first, undone on failure. Example::

        head = group_for(g, g.outputs[0].tensor, -1)
        apply_grow(g, head, 2, lambda m, old: np.zeros((2,) + old.shape[1:], old.dtype))
    """
    apply_grows(graph, [(group, n, init)], allow_picks)


def apply_grows(graph: Graph, changes: Sequence[tuple], allow_picks: bool = False) -> None:
    """:func:`apply_grow` for several groups at once (``changes``: ``(group, n, init)`` each, computed
    on the current graph): all are validated before the first edit, and a failure undoes them all."""
    plans = [_plan_grow(graph, group, n, allow_picks) for group, n, _ in changes]
    undo: list[Callable] = []
    replaced: list[Tensor] = []
    try:
        for plan, (_, n, init) in zip(plans, changes):
            replaced += _grow(graph, plan, n, init, undo)
        graph.infer_shapes()
        for plan, (_, n, _) in zip(plans, changes):
            for m, lay in plan["members"]:
                got = _current_dim(graph, m) if m.kind in ("tensor", "weight") else None
                want = _grown_length(m, lay, n)
                if got is not None and got != want:
                    raise ChannelError(f"after growing, {m.kind} {m.name!r} axis {m.axis} has length {got}, "
                                       f"expected {want}")
    except Exception:
        for fn in reversed(undo):
            fn()
        try:
            graph.infer_shapes()
        except Exception:  # noqa: BLE001 - the graph inferred before: only a broken input gets here
            pass
        raise
    _remove_orphans(graph, [t.node for t in replaced])


def _plan_grow(graph: Graph, group: ChannelGroup, n: int, allow_picks: bool) -> dict:
    """Validate growing ``group`` by ``n``: its members with their layouts, Reshapes, counts and
    slice ends to rewrite (raises :class:`ChannelError`)."""
    if n < 1:
        raise ChannelError(f"the number of channels to add must be at least 1, got {n}")
    picked = {p.node for p in group.picks} if allow_picks else set()
    blockers = [b for b in group.blockers if b.node not in picked]
    if blockers:
        raise ChannelError(f"channel group {group.name} (seed {group.seed[0]} axis {group.seed[1]}) cannot be "
                           f"changed: blocked at " + "; ".join(str(b) for b in blockers))
    if group.normalized_by:
        raise ChannelError(f"channel group {group.name} (seed {group.seed[0]} axis {group.seed[1]}) cannot grow: "
                           f"layer norm {group.normalized_by[0]!r} averages over its channels, so new channels "
                           "would change the existing ones")
    plan = {"members": [], "reshapes": {}, "counts": {}, "slice_ends": []}
    for m in group.members:
        if m.kind == "reshape":
            plan["reshapes"][m.name] = m.port
            continue
        if m.kind == "count":
            plan["counts"][m.name] = (m.port, m.axis)
            continue
        if m.kind == "slice":
            _grow_slice(graph, group, m, n, plan["slice_ends"])
            continue
        if _current_dim(graph, m) != m.dim:
            raise ChannelError(f"channel group {group.name} is stale: {m.kind} {m.name!r} changed; recompute it")
        layout = _grow_layout(m.index_map, m.dim)
        if layout is None:
            raise ChannelError(f"cannot add channels to {m.kind} {m.name!r} axis {m.axis}: the group's channels "
                               f"do not fill that axis in a regular layout (e.g. it is one input of a Concat)")
        plan["members"].append((m, layout))
    layouts = {(m.name, m.axis): lay for m, lay in plan["members"]}
    for p in group.picks if allow_picks else ():
        lay = layouts.get((p.tensor, p.axis))
        if lay is None or lay.kind != "tail":
            raise ChannelError(f"cannot add channels to channel group {group.name}: {p.node!r} reads positions of "
                               f"axis {p.axis} of {p.tensor}, where new channels would not come after the old ones")
    return plan


def _grow(graph: Graph, plan: dict, n: int, init: Callable, undo: list) -> list:
    """Apply one group's plan (undo steps appended); returns the shape vectors no longer read."""
    replaced: list[Tensor] = []
    for m, lay in plan["members"]:
        if m.kind not in ("weight", "const"):
            continue
        k = m.index_map.width
        old = graph.weight(m.name).value if m.kind == "weight" else graph.node(m.name).attr("value")
        blocks = _channel_blocks(old, m.axis, lay, k)
        new = np.asarray(init(m, blocks), dtype=old.dtype)
        if new.shape != (n,) + blocks.shape[1:]:
            raise ChannelError(f"init for {m.kind} {m.name!r} returned shape {new.shape}, expected "
                               f"{(n,) + blocks.shape[1:]}")
        grown = _grow_value(old, m.axis, lay, k, new)
        if m.kind == "weight":
            graph.set_weight(m.name, grown)
            undo.append(lambda name=m.name, old=old: graph.set_weight(name, old))
        else:
            node = graph.node(m.name)
            clone = graph.add_node(f"{m.name}/grown", "Const", unique=True,
                                   attrs={"dtype": node.attr("dtype"), "value": grown})
            undo.append(lambda c=clone.name: graph.remove_node(c, safe=False))
            for user, port in m.users:
                graph.set_input(user, port, clone.output(0))
                undo.append(lambda u=user, p=port, t=node.output(0): graph.set_input(u, p, t))
    lengths = {(m.name, m.axis): _grown_length(m, lay, n) for m, lay in plan["members"] if m.kind == "tensor"}
    for name, (port, element) in plan["counts"].items():
        node = graph.node(name)
        new_len = lengths.get((str(node.output(0)), element))
        if new_len is not None:
            _set_count(graph, node, port, element, new_len, undo)
    for node, i, k in plan["slice_ends"]:
        _move_slice_end(graph, node, i, k, undo)
    for name, port in plan["reshapes"].items():
        node = graph.node(name)
        out = str(node.output(0))
        new_shape = tuple(lengths.get((out, a), d) for a, d in enumerate(node.shapes[0]))
        replaced += _rebuild_shape_input(graph, node, port, new_shape, undo)
    return replaced


def pick_vectors(graph: Graph, pick: Pick, position: int) -> tuple[np.ndarray, np.ndarray]:
    """The begin and end vectors of StridedSlice ``pick`` (``x[..., j]``) reading ``position``
    instead: to clone a post-processing unrolled per class for a new class."""
    node = graph.node(pick.node)
    begin = np.array(np.atleast_1d(constant_value(graph, graph.input(node, 1))))
    end = np.array(np.atleast_1d(constant_value(graph, graph.input(node, 2))))
    i = _sparse_index(node, pick.axis, len(graph.shape(graph.input(node, 0))), len(begin))
    begin[i], end[i] = position, position + 1
    return begin, end


# ----------------------------------------------------------------------------------------- shape inputs
def _check_shape_input(graph: Graph, node: Node, port: int) -> None:
    """Raise Blocked unless :func:`_rebuild_shape_input` can rebuild input ``port`` of ``node``."""
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
    raise Blocked(f"its shape input {port} ({src.op} {src.name}) cannot be rebuilt for the new channel count")


def _rebuild_shape_input(graph: Graph, node: Node, port: int, new_shape: tuple, undo: list) -> list:
    """Point input ``port`` of ``node`` at a shape vector for ``new_shape``; returns the tensors it no
    longer reads."""
    old_t = graph.input(node, port)
    src = graph.producer(old_t)
    dtype = graph.dtype(old_t)
    replaced = []
    if node.op == "Reshape" and sum(d is None for d in new_shape) <= 1:
        vec = np.array([-1 if d is None else d for d in new_shape], dtype=dtype.as_numpy_dtype)
    elif src.op == "Const":
        vec = np.array(new_shape, dtype=dtype.as_numpy_dtype)
    else:  # Pack of scalars (batch read from Shape): replace only the elements that change
        old = node.shapes[0]
        for i, (a, b) in enumerate(zip(old, new_shape)):
            if a == b:
                continue
            elem_t = graph.input(src, i)
            et = graph.dtype(elem_t)
            c = graph.add_node(f"{src.name}/{i}", "Const", unique=True,
                               attrs={"dtype": et, "value": np.array(b, dtype=et.as_numpy_dtype)})
            undo.append(lambda n=c.name: graph.remove_node(n, safe=False))
            graph.set_input(src, i, c.output(0))
            undo.append(lambda s=src.name, i=i, t=elem_t: graph.set_input(s, i, t))
            replaced.append(elem_t)
        return replaced
    c = graph.add_node(f"{node.name}/shape", "Const", attrs={"dtype": dtype, "value": vec}, unique=True)
    undo.append(lambda n=c.name: graph.remove_node(n, safe=False))
    graph.set_input(node, port, c.output(0))
    undo.append(lambda: graph.set_input(node, port, old_t))
    return [old_t]


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


# ========================================================================================== rules
def _channel_axis(node: Node, rank: int = 4) -> int:
    fmt = node.attr("data_format", "NHWC") or "NHWC"
    return 1 if str(fmt).startswith("NC") else rank - 1


def _side(node: Node, at: Link) -> str:
    return f"{'input' if at.io == 'in' else 'output'} {at.port}"


def _not_channel(node: Node, at: Link) -> Blocked:
    return Blocked(f"axis {at.axis} of {_side(node, at)} is not an axis that {node.op} carries channel-wise")


UNARY = ("Identity", "Snapshot", "StopGradient", "PreventGradient", "CheckNumerics", "Cast",
         "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Sigmoid", "Tanh", "Softplus", "Softsign", "Erf", "Erfc",
         "Neg", "Abs", "Square", "Sqrt", "Rsqrt", "Reciprocal", "Inv", "Exp", "Expm1", "Log", "Log1p", "Sign",
         "Floor", "Ceil", "Round", "Rint", "Sin", "Cos", "IsNan", "IsFinite", "LogicalNot")
BINARY = ("AddV2", "Add", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "MulNoNan", "Maximum", "Minimum",
          "SquaredDifference", "Pow", "FloorDiv", "FloorMod", "Greater", "GreaterEqual", "Less", "LessEqual",
          "Equal", "NotEqual", "LogicalAnd", "LogicalOr", "BitwiseAnd", "BitwiseOr", "BitwiseXor")


@channel_rule(*UNARY, *BINARY, "AddN", "ClipByValue", "SelectV2")
def _elementwise(ctx, node, at):
    """Broadcasting element-wise ops: inputs that have the axis (not broadcast along it) and the output
    share the channels (per-channel constants, coupled activations: residual Add, x·sigmoid(x)...)."""
    out = ctx.out_shape(node)
    ins = [ctx.in_shape(node, p) for p in range(len(ctx.graph.inputs_of(node)))]
    R = len(out)
    A = at.axis + R - len(ins[at.port]) if at.io == "in" else at.axis
    if out[A] is None:
        raise Blocked(f"output axis {A} has no static length")
    if at.io == "in" and ins[at.port][at.axis] == 1 and out[A] != 1:
        raise Blocked(f"input {at.port} is broadcast along axis {at.axis}")
    links = [Out(0, A, at.imap)]
    for p, s in enumerate(ins):
        a = A - (R - len(s))
        if a < 0:
            continue
        if s[a] == out[A]:
            links.append(In(p, a, at.imap))
        elif s[a] != 1:
            raise Blocked(f"input {p} has length {s[a]} on axis {a}, the output {out[A]}")
    return links


@channel_rule("IdentityN")
def _identity_n(ctx, node, at):
    return [In(at.port, at.axis, at.imap), Out(at.port, at.axis, at.imap)]


@channel_rule("BiasAdd", "BiasAddV1")
def _bias_add(ctx, node, at):
    rank = len(ctx.in_shape(node, 0))
    ca = _channel_axis(node, rank) if node.op == "BiasAdd" else rank - 1
    if at.io == "in" and at.port == 1:
        return [In(0, ca, at.imap), Out(0, ca, at.imap), In(1, 0, at.imap)]
    links = [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]
    return links + [In(1, 0, at.imap)] if at.axis == ca else links


@channel_rule("Conv2D")
def _conv2d(ctx, node, at):
    ca = _channel_axis(node)
    x, k = ctx.in_shape(node, 0), ctx.in_shape(node, 1)
    if x[ca] is not None and k[2] is not None and x[ca] != k[2]:
        raise Blocked(f"grouped convolution (input has {x[ca]} channels, kernel {k[2]})")
    m = at.imap
    side = (at.io, at.port, at.axis)
    if side in (("in", 0, ca), ("in", 1, 2)):
        return [In(0, ca, m), In(1, 2, m, "sink")]
    if side in (("out", 0, ca), ("in", 1, 3)):
        return [Out(0, ca, m), In(1, 3, m, "source")]
    raise _not_channel(node, at)


@channel_rule("DepthwiseConv2dNative")
def _depthwise(ctx, node, at):
    """Input channel c ↔ kernel axis 2 position c ↔ output channels c·m … c·m+m−1."""
    ca = _channel_axis(node)
    mult = ctx.in_shape(node, 1)[3]
    if mult is None:
        raise Blocked("unknown depth multiplier")
    side = (at.io, at.port, at.axis)
    if side in (("in", 0, ca), ("in", 1, 2)):
        m_in = at.imap
    elif side == ("out", 0, ca):
        m_in = _collapse(at.imap, mult)
    else:
        raise _not_channel(node, at)
    return [In(0, ca, m_in), In(1, 2, m_in), Out(0, ca, _expand(m_in, mult))]


@channel_rule("MatMul")
def _matmul(ctx, node, at):
    """a[M,K] · b[K,N]: a's K ↔ b's K (sink), b's N ↔ output axis 1 (source), a's M ↔ output axis 0."""
    ka = 0 if node.attr("transpose_a", False) else 1
    kb = 1 if node.attr("transpose_b", False) else 0
    m = at.imap
    side = (at.io, at.port, at.axis)
    if side in (("in", 0, ka), ("in", 1, kb)):
        return [In(0, ka, m), In(1, kb, m, "sink")]
    if side in (("out", 0, 1), ("in", 1, 1 - kb)):
        return [Out(0, 1, m), In(1, 1 - kb, m, "source")]
    if side in (("out", 0, 0), ("in", 0, 1 - ka)):
        return [Out(0, 0, m), In(0, 1 - ka, m)]
    raise _not_channel(node, at)


@channel_rule("BatchMatMulV2", "BatchMatMulV3", "BatchMatMul")
def _batch_matmul(ctx, node, at):
    """x[..., M, K] · y[..., K, N] (adj_x / adj_y transpose the last two axes of x / y); batch axes
    broadcast and couple like element-wise ops."""
    rx, ry, ro = len(ctx.in_shape(node, 0)), len(ctx.in_shape(node, 1)), len(ctx.out_shape(node))
    kx = rx - 2 if node.attr("adj_x", False) else rx - 1
    ky = ry - 1 if node.attr("adj_y", False) else ry - 2
    mx, ny = (2 * rx - 3) - kx, (2 * ry - 3) - ky
    m = at.imap
    side = (at.io, at.port, at.axis)
    if side in (("in", 0, kx), ("in", 1, ky)):
        return [In(0, kx, m), In(1, ky, m, "sink")]
    if side in (("out", 0, ro - 1), ("in", 1, ny)):
        return [Out(0, ro - 1, m), In(1, ny, m, "source")]
    if side in (("out", 0, ro - 2), ("in", 0, mx)):
        return [Out(0, ro - 2, m), In(0, mx, m)]
    rank = {0: rx, 1: ry}.get(at.port) if at.io == "in" else ro
    b = at.axis + ro - rank  # a batch axis, aligned from the end
    if b < 0 or b >= ro - 2:
        raise _not_channel(node, at)
    out = ctx.out_shape(node)
    links = [Out(0, b, m)]
    for p, r in ((0, rx), (1, ry)):
        a = b - (ro - r)
        if a >= 0 and ctx.in_shape(node, p)[a] == out[b]:
            links.append(In(p, a, m))
    return links


@channel_rule("Conv2DBackpropInput")
def _conv_transpose(ctx, node, at):
    """Inputs (input_sizes, filter[h,w,out,in], x[...,in]); output channels ↔ filter axis 2 (source)."""
    ca = _channel_axis(node)
    m = at.imap
    side = (at.io, at.port, at.axis)
    if side in (("out", 0, ca), ("in", 1, 2)):
        ctx.shape_member(node, 0)
        return [Out(0, ca, m), In(1, 2, m, "source")]
    if side in (("in", 2, ca), ("in", 1, 3)):
        return [In(2, ca, m), In(1, 3, m, "sink")]
    raise _not_channel(node, at)


@channel_rule("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
def _fused_bn(ctx, node, at):
    """x/y channel axis ↔ scale, offset, mean, variance (and batch mean/variance outputs) axis 0."""
    ca = _channel_axis(node)
    m = at.imap
    if (at.io == "in" and at.port == 0) or (at.io == "out" and at.port == 0):
        if at.axis != ca:
            return [In(0, at.axis, m), Out(0, at.axis, m)]
    elif not (at.port in ((1, 2, 3, 4) if at.io == "in" else (1, 2)) and at.axis == 0):
        raise _not_channel(node, at)
    dim = ctx.in_shape(node, 0)[ca]
    links = [In(0, ca, m), Out(0, ca, m)]
    links += [In(p, 0, m) for p in (1, 2, 3, 4) if ctx.in_shape(node, p)[0] == dim]
    links += [Out(p, 0, m) for p in (1, 2) if p < len(node.shapes) and node.shapes[p] and node.shapes[p][0] == dim]
    return links


def _data_port(node: Node, at: Link, port: int = 0) -> None:
    if at.io == "in" and at.port != port:
        raise Blocked(f"a group tensor feeds input {at.port} (not the data input)")


@channel_rule("Pad", "PadV2", "MirrorPad")
def _pad(ctx, node, at):
    _data_port(node, at)
    pads = ctx.const(node, 1)
    if (pads[at.axis] != 0).any():
        raise Blocked(f"pads axis {at.axis}")
    return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]


@channel_rule("MaxPool", "AvgPool", "MaxPoolV2")
def _pool(ctx, node, at):
    _data_port(node, at)
    ksize = node.attr("ksize") if node.op != "MaxPoolV2" else ctx.const(node, 1).tolist()
    strides = node.attr("strides") if node.op != "MaxPoolV2" else ctx.const(node, 2).tolist()
    if ksize[at.axis] != 1 or strides[at.axis] != 1:
        raise Blocked(f"pools along axis {at.axis}")
    return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]


@channel_rule("Mean", "Sum", "Max", "Min", "Prod", "All", "Any")
def _reduce(ctx, node, at):
    """Reductions over other axes pass the channels on (axis renumbered without keep_dims)."""
    _data_port(node, at)
    rank = len(ctx.in_shape(node, 0))
    red = sorted({int(a) % rank for a in np.atleast_1d(ctx.const(node, 1))})
    keep = node.attr("keep_dims", False)
    kept_axes = list(range(rank)) if keep else [a for a in range(rank) if a not in red]
    if at.io == "in":
        if at.axis in red:
            if node.op in ("Max", "Min") and red == [at.axis]:  # the best class's score
                ctx.reduces(node, 0, at.axis)
                return []
            stat = _layernorm_stat(ctx, node, red, keep) if red == [at.axis] else None
            if stat is None:
                raise Blocked(f"reduces over axis {at.axis} (the channel axis)")
            ctx.stats[node.name] = (stat[0], ctx.graph.input(node, 0), at.axis, stat[1])
            return []
        a = at.axis
    else:
        a = kept_axes[at.axis]
        if a in red:
            raise _not_channel(node, at)
    return [In(0, a, at.imap), Out(0, kept_axes.index(a), at.imap)]


_PASS_THROUGH = ("Identity", "StopGradient", "PreventGradient", "Snapshot")  # tf.nn.moments: StopGradient


def _passes_value(g: Graph, node: Node, port: int) -> bool:
    """``node`` hands input ``port`` on unchanged but for a scalar factor: identity-like ops, and a
    ``Mul`` by a scalar constant (the correction an earlier prune put after a layer-norm mean)."""
    if node.op in _PASS_THROUGH:
        return port == 0
    if node.op == "Mul" and len(g.inputs_of(node)) == 2:
        other = constant_value(g, g.input(node, 1 - port))
        return other is not None and np.ndim(other) == 0
    return False


def _layernorm_stat(ctx, node: Node, red: list, keep_dims: bool):
    """``("mean", ())`` if ``node`` is a layer norm's ``Mean(x)`` over the channels (read by a
    ``SquaredDifference(x, ·)``), ``("variance", ((sqdiff node, port of the mean),))`` if it is
    ``Mean(SquaredDifference(x, mean))`` with such a mean, else None. Identity-like ops (tf.nn.moments
    puts a StopGradient on the mean) and scalar factors (an earlier prune's correction) may sit between
    the mean and the SquaredDifference."""
    g = ctx.graph
    if node.op != "Mean" or not keep_dims or g.is_output(node.output(0)):
        return None
    x = g.input(node, 0)
    todo, seen = [node.output(0)], set()
    while todo:
        t = todo.pop()
        for c, p in g.consumers(t):
            if _passes_value(g, c, p) and c.name not in seen:
                seen.add(c.name)
                todo.append(c.output(0))
            elif c.op == "SquaredDifference" and g.input(c, 1 - p) == x:
                return ("mean", ())
    sd = g.producer(x)
    if sd.op != "SquaredDifference" or x.port != 0:
        return None
    for p in (0, 1):
        t = g.input(sd, p)
        while True:
            prev = g.producer(t)
            port = next((q for q in range(len(g.inputs_of(prev))) if _passes_value(g, prev, q)), None)
            if port is None:
                break
            t = g.input(prev, port)
        m = g.producer(t)
        if m.op == "Mean" and t.port == 0 and m.attr("keep_dims", False) and g.input(m, 0) == g.input(sd, 1 - p):
            rank = len(ctx.in_shape(m, 0))
            if sorted({int(a) % rank for a in np.atleast_1d(ctx.const(m, 1))}) == red:
                return ("variance", ((sd.name, p),))
    return None


@channel_rule("ConcatV2", "Concat")
def _concat(ctx, node, at):
    """On the concat axis each input's channels sit at its offset; on other axes all are coupled."""
    n = len(ctx.graph.inputs_of(node)) - 1
    axis_port, data = (n, list(range(n))) if node.op == "ConcatV2" else (0, list(range(1, n + 1)))
    if at.io == "in" and at.port == axis_port:
        raise Blocked("a group tensor is the concat axis")
    rank = len(ctx.out_shape(node))
    cax = int(ctx.const(node, axis_port)) % rank
    if at.axis != cax:
        return [In(p, at.axis, at.imap) for p in data] + [Out(0, at.axis, at.imap)]
    dims = [ctx.in_shape(node, p)[cax] for p in data]
    if any(d is None for d in dims):
        raise Blocked("an input has no static length on the concat axis")
    offsets = np.concatenate([[0], np.cumsum(dims)]).astype(int)
    out_map = at.imap if at.io == "out" else _shift(at.imap, offsets[data.index(at.port)])
    links = [Out(0, cax, out_map)]
    for i, p in enumerate(data):
        part = _restrict(out_map, offsets[i], offsets[i + 1], f"concat input {p}")
        if part.present.any():
            links.append(In(p, cax, part))
    return links


@channel_rule("Split", "SplitV")
def _split(ctx, node, at):
    value_port, dim_port = (1, 0) if node.op == "Split" else (0, 2)
    _data_port(node, at, value_port)
    rank = len(ctx.in_shape(node, value_port))
    sax = int(ctx.const(node, dim_port)) % rank
    if at.axis == sax:
        raise Blocked(f"splits along axis {sax}, the channel axis")
    return [In(value_port, at.axis, at.imap)] + [Out(i, at.axis, at.imap) for i in range(node.num_outputs)]


def _concrete(shape: tuple, fill: int) -> list:
    return [fill if d is None else int(d) for d in shape]


def _complete(known_side: list, other: tuple) -> list | None:
    """``other`` with its one unknown dim solved so that both sides hold the same element count."""
    total = int(np.prod(known_side))
    d = list(other)
    unknown = [i for i, x in enumerate(d) if x is None]
    known = int(np.prod([x for x in d if x is not None]))
    if len(unknown) > 1:
        return None
    if unknown:
        if known == 0 or total % known:
            return None
        d[unknown[0]] = total // known
    elif known != total:
        return None
    return d


def _concretize(src: tuple, dst: tuple, fill: int) -> tuple[list, list]:
    """Concrete ``(src, dst)`` shapes of a reshape: the unknown dims of one side set to ``fill`` and the
    other side's one unknown dim solved (``[N,H,W,C] → [N·H·W, C]`` works from either side)."""
    for a, b, flip in ((src, dst, False), (dst, src, True)):
        x = _concrete(a, fill)
        y = _complete(x, b)
        if y is not None:
            return (y, x) if flip else (x, y)
    if sum(d is None for d in src) > 1 and sum(d is None for d in dst) > 1:
        raise Blocked("more than one dim has no static length on both sides")
    raise Blocked("element counts do not match")


def _unsqueeze_axis(src: tuple, src_axis: int, dst: tuple) -> int | None:
    """The destination axis of ``src_axis`` when the reshape only adds or drops size-1 dims (batch-norm
    parameters ``[C] → [1, 1, 1, C]``, ``[N, C] → [N, 1, 1, C]``), else None (take the general path)."""
    if src[src_axis] == 1 or sum(d is None for d in src) > 1 or sum(d is None for d in dst) > 1:
        return None
    s_keep = [i for i, d in enumerate(src) if d != 1]
    d_keep = [i for i, d in enumerate(dst) if d != 1]
    if [src[i] for i in s_keep] != [dst[i] for i in d_keep]:
        return None
    return d_keep[s_keep.index(src_axis)]


def _reshape_map(src: tuple, src_axis: int, imap: IndexMap, dst: tuple, concrete=None) -> tuple[int, IndexMap]:
    """Follow channels through a row-major reshape: the destination axis whose positions each hold one
    group channel's elements (or none), and the map there. Checked with batch (unknown dims) 1 and 2.
    ``concrete(fill)`` may give the concrete ``(src, dst)`` shapes for unknown dims taken as ``fill``
    (when both sides have several unknown dims, e.g. from the reshape's computed target vector)."""
    fast = _unsqueeze_axis(tuple(src), src_axis, tuple(dst))
    if fast is not None:
        return fast, imap
    found = []
    for fill in (1, 2):
        pair = concrete(fill) if concrete is not None else None
        s, d = pair if pair is not None else _concretize(src, dst, fill)
        lab = np.full(s[src_axis], -1, dtype=np.int64)
        valid = imap.rows >= 0
        lab[imap.rows[valid]] = np.nonzero(valid)[0]
        view = [1] * len(s)
        view[src_axis] = s[src_axis]
        labels = np.broadcast_to(lab.reshape(view), s).reshape(d)
        cands = []
        for b in range(len(d)):
            if dst[b] is None or d[b] == 0:
                continue
            mat = np.moveaxis(labels, b, 0).reshape(d[b], -1)
            if mat.shape[1] and (mat == mat[:, :1]).all():
                cands.append(b)
        if not cands:
            raise Blocked("the channel axis is split or merged with another axis in a way that does not "
                          "factorize (no output axis holds whole channels)")
        same = len(dst) - len(src) + src_axis
        b = same if same in cands else next((c for c in cands if d[c] > 1), cands[0])
        col = np.moveaxis(labels, b, 0).reshape(d[b], -1)[:, 0]
        found.append((b, _rows_from_labels(col, imap.size, f"output axis {b}")))
    if found[0][0] != found[1][0] or found[0][1] != found[1][1]:
        raise Blocked("where the channels land depends on the batch size")
    return found[0]


@channel_rule("Reshape")
def _reshape(ctx, node, at):
    """Index arithmetic: Flatten (channel c → positions p·C + c), detection heads ([N,H,W,A·(K+1)] →
    [N,H·W·A,K+1]: class k ↔ channels a·(K+1)+k), per-class boxes ([N,4K] → [N,K,4]: class k ↔ columns
    4k…4k+3), BN weights reshaped to [1,1,1,C]. The shape input is rebuilt (a ``reshape`` member)."""
    _data_port(node, at)
    src, dst = ctx.in_shape(node, 0), ctx.out_shape(node)

    def concrete(fill, flip=False):
        pair = _reshape_concrete(ctx.graph, node, src, dst, fill)
        return None if pair is None else (pair[::-1] if flip else pair)

    if at.io == "in":
        b, m = _reshape_map(src, at.axis, at.imap, dst, concrete)
        links = [In(0, at.axis, at.imap), Out(0, b, m)]
    else:
        a, m = _reshape_map(dst, at.axis, at.imap, src, lambda fill: concrete(fill, flip=True))
        links = [In(0, a, m), Out(0, at.axis, at.imap)]
    ctx.shape_member(node, 1)
    return links


def _reshape_concrete(graph: Graph, node: Node, src: tuple, dst: tuple, fill: int):
    """Concrete ``(src, dst)`` of a Reshape whose target vector is computed at run time from its
    input's shape (Keras: ``Reshape((-1, K))`` packs ``shape(x)[0]``, -1 and K), when both sides have
    more than one unknown dim: the input's unknown dims are taken as ``fill``, 2·fill+1, ... (distinct,
    so that no two coincide by accident) and the target vector is evaluated for that input shape.
    None when it cannot be evaluated."""
    if sum(d is None for d in src) <= 1 or sum(d is None for d in dst) <= 1:
        return None
    sizes = iter([fill] + [2 * fill + 1 + 2 * i for i in range(len(src))])
    s = [next(sizes) if d is None else int(d) for d in src]
    vec = constant_value(graph, graph.input(node, 1), assume={graph.input(node, 0): s})
    if vec is None:
        return None
    d = [int(v) for v in np.atleast_1d(vec)]
    if len(d) != len(dst) or d.count(-1) > 1:
        return None
    if -1 in d:
        known = int(np.prod([v for v in d if v != -1]))
        if known == 0 or int(np.prod(s)) % known:
            return None
        d[d.index(-1)] = int(np.prod(s)) // known
    if int(np.prod(d)) != int(np.prod(s)) or any(b is not None and b != v for b, v in zip(dst, d)):
        return None
    return s, d


@channel_rule("Transpose")
def _transpose(ctx, node, at):
    _data_port(node, at)
    perm = [int(p) for p in ctx.const(node, 1)]
    if at.io == "in":
        return [In(0, at.axis, at.imap), Out(0, perm.index(at.axis), at.imap)]
    return [In(0, perm[at.axis], at.imap), Out(0, at.axis, at.imap)]


@channel_rule("Squeeze")
def _squeeze(ctx, node, at):
    src = ctx.in_shape(node, 0)
    dims = {int(d) % len(src) for d in (node.attr("squeeze_dims") or [])}
    if not dims:
        dims = {i for i, d in enumerate(src) if d == 1}
    kept = [i for i in range(len(src)) if i not in dims]
    a = at.axis if at.io == "in" else kept[at.axis]
    if a in dims:
        raise Blocked(f"squeezes axis {a}")
    return [In(0, a, at.imap), Out(0, kept.index(a), at.imap)]


@channel_rule("ExpandDims")
def _expand_dims(ctx, node, at):
    _data_port(node, at)
    rank = len(ctx.out_shape(node))
    d = int(ctx.const(node, 1)) % rank
    if at.io == "in":
        a = at.axis
    elif at.axis == d:
        raise _not_channel(node, at)
    else:
        a = at.axis if at.axis < d else at.axis - 1
    return [In(0, a, at.imap), Out(0, a if a < d else a + 1, at.imap)]


@channel_rule("Softmax", "LogSoftmax")
def _softmax(ctx, node, at):
    """Pass-through; over the channel axis it renormalizes (right for subset, inexact for pruning)."""
    if at.axis == len(ctx.out_shape(node)) - 1:
        ctx.renormalizes(node)
    return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]


def _slice_elements(ctx, ss: Node, rank: int) -> list[int] | None:
    """Elements of a rank-``rank`` shape vector a constant 1-D StridedSlice reads (None if unknown)."""
    try:
        b, e, s = (int(np.atleast_1d(ctx.const(ss, p))[0]) for p in (1, 2, 3))
    except Blocked:
        return None
    if ss.attr("ellipsis_mask", 0) or ss.attr("new_axis_mask", 0):
        return None
    idx = np.arange(rank)
    if ss.attr("shrink_axis_mask", 0) & 1:
        return [int(idx[b])] if -rank <= b < rank else None
    lo = None if ss.attr("begin_mask", 0) & 1 else b
    hi = None if ss.attr("end_mask", 0) & 1 else e
    return idx[slice(lo, hi, s)].tolist()


@channel_rule("Shape", "ShapeN")
def _shape(ctx, node, at):
    """Reading a group tensor's shape is fine when only other dims are used (Keras Flatten reads the
    batch size); anything reading the channel count would silently keep the old count: block."""
    t = node.output(at.port if node.op == "ShapeN" else 0)
    rank = len(ctx.in_shape(node, at.port))
    if ctx.graph.is_output(t):
        raise Blocked("the shape of a group tensor is a signature output")
    for user, port in ctx.graph.consumers(t):
        elems = _slice_elements(ctx, user, rank) if user.op == "StridedSlice" and port == 0 else None
        if elems is None or at.axis in elems:
            raise Blocked(f"the shape of a group tensor is read by {user.name} ({user.op}), which may use "
                          f"the length of axis {at.axis}")
    return []


@channel_rule("Rank")
def _rank(ctx, node, at):
    return []


@channel_rule("Size")
def _size(ctx, node, at):
    raise Blocked("reads the element count of a group tensor, which changes with the channel count")


def _range_links(ctx, node, at, a: int, out_axis: int, lo: int, hi: int) -> list:
    """Links of a slice taking ``[lo, hi)`` of channel axis ``a``: the input's map restricted to the
    range and shifted to start at 0 (a ``slice`` member rebuilds begin and end)."""
    if lo == 0 and hi == ctx.in_shape(node, 0)[a]:
        return [In(0, a, at.imap), Out(0, out_axis, at.imap)]
    ctx.slice_member(node, a)
    if at.io == "in":
        part = _restrict(at.imap, lo, hi, f"the slice [{lo}, {hi})")
        if not part.present.any():
            return []  # none of the group's channels is in the range (the other half of a split)
        return [Out(0, out_axis, part)]
    return [In(0, a, _shift(at.imap, lo)), Out(0, out_axis, at.imap)]


@channel_rule("StridedSlice")
def _strided_slice(ctx, node, at):
    """Pass-through when the slice takes the whole channel axis (axis renumbered for shrunk axes); a
    stride-1 range of it (``x[..., 4:]`` of ``[boxes | classes]``) carries the channels in the range."""
    _data_port(node, at)
    if node.attr("new_axis_mask", 0):
        raise Blocked("StridedSlice with a new-axis mask")
    src = ctx.in_shape(node, 0)
    rank = len(src)
    begin, end, strides = (np.atleast_1d(ctx.const(node, p)).astype(int) for p in (1, 2, 3))
    shrink = node.attr("shrink_axis_mask", 0)
    index = [_sparse_index(node, a, rank, len(begin)) for a in range(rank)]
    kept = [a for a in range(rank) if index[a] is None or not shrink >> index[a] & 1]
    a = at.axis if at.io == "in" else kept[at.axis]
    i = index[a]
    if i is None:
        return [In(0, a, at.imap), Out(0, kept.index(a), at.imap)]
    if shrink >> i & 1:
        if at.io == "in" and src[a] is not None and -src[a] <= begin[i] < src[a]:
            ctx.pick(node, 0, a, int(begin[i]) % src[a])
        raise Blocked(f"takes one position of axis {a} (the channel axis)")
    if strides[i] != 1 or src[a] is None:
        raise Blocked(f"slices axis {a} (the channel axis) with stride {strides[i]}")
    lo, hi = _slice_range(node, begin, end, src[a], i)
    return _range_links(ctx, node, at, a, kept.index(a), lo, hi)


@channel_rule("Slice")
def _slice(ctx, node, at):
    """Whole channel axis: pass-through; a range of it (``tf.slice(scores, [0, 0, 1], [-1, -1, -1])``
    drops a background class): the channels in the range."""
    _data_port(node, at)
    begin, size = (np.atleast_1d(ctx.const(node, p)).astype(int) for p in (1, 2))
    dim = ctx.in_shape(node, 0)[at.axis]
    if dim is None:
        raise Blocked(f"slices axis {at.axis} (the channel axis), which has no static length")
    lo, hi = _slice_range(node, begin, size, dim, at.axis)
    return _range_links(ctx, node, at, at.axis, at.axis, lo, hi)


@channel_rule("GatherV2")
def _gather(ctx, node, at):
    """Gathering along another axis passes the channels on; the batch axes of a gather with
    ``batch_dims`` couple params, indices and output. Along the channel axis it blocks; with indices
    computed at run time (the mask of each detection's class) it is a :class:`Pick`."""
    rank, irank = len(ctx.in_shape(node, 0)), len(ctx.in_shape(node, 1))
    bd = int(node.attr("batch_dims", 0) or 0) % (irank + 1)
    if at.io == "in" and at.port == 2:
        raise Blocked("a group tensor is the gather axis")
    gax = int(ctx.const(node, 2)) % rank
    nidx = irank - bd  # index dims in the output
    if at.io == "in" and at.port == 1:
        if at.axis >= bd:
            raise Blocked(f"a group tensor feeds input {at.port} (not the data input)")
        a = at.axis
    elif at.io == "in":
        a = at.axis
    elif gax <= at.axis < gax + nidx:
        raise _not_channel(node, at)
    else:
        a = at.axis if at.axis < gax else at.axis - nidx + 1
    if a == gax:
        if constant_value(ctx.graph, ctx.graph.input(node, 1)) is None:
            ctx.pick(node, 0, a, None)
        raise Blocked(f"gathers along axis {a} (the channel axis)")
    links = [In(0, a, at.imap), Out(0, a if a < gax else a + nidx - 1, at.imap)]
    return links + [In(1, a, at.imap)] if a < bd else links


@channel_rule("ArgMax", "ArgMin")
def _argmax(ctx, node, at):
    """Over the channel axis: the output holds channel indices (class ids); over another axis the
    channels pass on (that axis removed)."""
    _data_port(node, at)
    rank = len(ctx.in_shape(node, 0))
    dim = int(ctx.const(node, 1)) % rank
    if at.io == "in" and at.axis == dim:
        ctx.reduces(node, 0, dim, ids_ports=(0,))
        return []
    a = at.axis if at.io == "in" else (at.axis if at.axis < dim else at.axis + 1)
    return [In(0, a, at.imap), Out(0, a if a < dim else a - 1, at.imap)]


@channel_rule("TopKV2", "TopK")
def _top_k(ctx, node, at):
    """Over the last axis when it is the channel axis: values and indices are the best channels'
    (indices are class ids); other axes pass on to both outputs. A last axis that holds more than the
    channels (anchors × classes flattened) blocks: its indices would need decoding."""
    if at.io == "in":
        _data_port(node, at)
    rank = len(ctx.in_shape(node, 0))
    if at.axis != rank - 1:
        return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap), Out(1, at.axis, at.imap)]
    if at.io == "out" or at.imap.width != 1:
        raise Blocked("top-k over an axis that holds more than the channels (its indices are positions "
                      "that would need re-decoding)")
    ctx.reduces(node, 0, at.axis, ids_ports=(1,))
    return []


@channel_rule("CombinedNonMaxSuppression")
def _combined_nms(ctx, node, at):
    """Scores ``[N, anchors, K]`` over the class axis: NMS per class, output 2 holds class ids; boxes
    ``[N, anchors, q, 4]`` with one box per class (q = K) follow the classes."""
    if at.io != "in" or at.port not in (0, 1) or at.axis != 2:
        raise Blocked(f"axis {at.axis} of {_side(node, at)} is not the class axis")
    q = ctx.in_shape(node, 0)[2]
    k = ctx.in_shape(node, 1)[2]
    if at.port == 0 and q != k:
        raise Blocked("boxes are per class but the scores have another class count")
    ctx.reduces(node, 1, 2, ids_ports=(2,))
    return [In(0, 2, at.imap), In(1, 2, at.imap)] if q == k and q != 1 else []


@channel_rule("Tile")
def _tile(ctx, node, at):
    """Multiples of 1 pass the channels on; tiling the channel axis repeats each channel's positions
    (``c + C·j``); an axis of length 1 tiled to the channel count (one class-agnostic box per class)
    starts the channels there: its multiple is rewritten with the count."""
    _data_port(node, at)
    mult = [int(m) for m in np.atleast_1d(ctx.const(node, 1))]
    src = ctx.in_shape(node, 0)
    a = at.axis
    if mult[a] == 1:
        return [In(0, a, at.imap), Out(0, a, at.imap)]
    if at.io == "out":
        if src[a] == 1:
            ctx.count_member(node, 1, a)
            return [Out(0, a, at.imap)]
        raise Blocked(f"tiles axis {a} (the channel axis) {mult[a]} times")
    if src[a] is None:
        raise Blocked(f"tiles axis {a}, which has no static length")
    rows = at.imap.rows
    tiled = np.concatenate([np.where(rows >= 0, rows + src[a] * j, -1) for j in range(mult[a])], axis=1)
    return [Out(0, a, _normalize(tiled))]


@channel_rule("Pack")
def _pack(ctx, node, at):
    """Stacking along a new axis: every input's channels are the output's (axis renumbered)."""
    rank = len(ctx.out_shape(node))
    axis = int(node.attr("axis", 0) or 0) % rank
    if at.io == "out":
        if at.axis == axis:
            raise _not_channel(node, at)
        a = at.axis if at.axis < axis else at.axis - 1
    else:
        a = at.axis
    n = len(ctx.graph.inputs_of(node))
    return [In(p, a, at.imap) for p in range(n)] + [Out(0, a if a < axis else a + 1, at.imap)]


@channel_rule("Unpack")
def _unpack(ctx, node, at):
    """Unstacking along another axis than the channels': every output carries them (renumbered)."""
    _data_port(node, at)
    rank = len(ctx.in_shape(node, 0))
    axis = int(node.attr("axis", 0) or 0) % rank
    a = at.axis if at.io == "in" else (at.axis if at.axis < axis else at.axis + 1)
    if a == axis:
        raise Blocked(f"unstacks along axis {a} (the channel axis)")
    return [In(0, a, at.imap)] + [Out(p, a if a < axis else a - 1, at.imap) for p in range(node.num_outputs)]


@channel_rule("Bitcast")
def _bitcast(ctx, node, at):
    """Same-width reinterpretation (float32 → int32: Keras's argmax tells -0.0 from 0.0) is
    element-wise; a width change adds or removes an axis: blocks."""
    if len(ctx.in_shape(node, 0)) != len(ctx.out_shape(node)):
        raise Blocked("changes the element width (and the rank)")
    return [In(0, at.axis, at.imap), Out(0, at.axis, at.imap)]


@channel_rule("BroadcastTo")
def _broadcast_to(ctx, node, at):
    """Broadcasting other axes passes the channels on (the target shape's element for the channel axis
    is a ``count`` member); an axis of length 1 broadcast to the channel count (Keras's
    ``take_along_axis`` broadcasts one index per detection to every class) starts the channels there."""
    _data_port(node, at)
    out, src = ctx.out_shape(node), ctx.in_shape(node, 0)
    lead = len(out) - len(src)
    A = at.axis + lead if at.io == "in" else at.axis
    a = A - lead
    d = src[a] if a >= 0 else 1
    if out[A] is None:
        raise Blocked(f"output axis {A} has no static length")
    if d == out[A]:
        ctx.count_member(node, 1, A)
        return [In(0, a, at.imap), Out(0, A, at.imap)]
    if at.io == "out" and d == 1:
        ctx.count_member(node, 1, A)
        return [Out(0, A, at.imap)]
    raise Blocked(f"broadcasts axis {A} (the channel axis)")
