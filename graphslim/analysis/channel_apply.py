"""Changing a channel group: keep some channels (:func:`apply_keeps`) or add new ones
(:func:`apply_grows`), editing every member at once and undoing everything on failure. See
:mod:`graphslim.analysis.channels`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from graphslim.analysis.channel_groups import ChannelGroup, Member, Pick
from graphslim.analysis.channel_maps import ChannelError, IndexMap, combined_positions
from graphslim.analysis.channel_rules import concat_part, slice_range, sparse_index
from graphslim.analysis.constants import constant_value
from graphslim.ir.graph import Graph, Node, Tensor

__all__ = ["apply_keep", "apply_keeps", "apply_grow", "apply_grows", "pick_vectors"]


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

    def edit(undo: list) -> list:
        replaced: list[Tensor] = []  # shape vectors no longer read: removed once all went well
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
        return replaced

    _transaction(graph, edit, [(e["member"], len(e["positions"])) for e in entries.values()], "the change")
    _record_kept(graph, entries)


KEPT_META = "kept_channels"
"""``graph.meta`` key: ``{activation tensor: {axis: positions}}``, for every activation a keep list
shrank, the positions along ``axis`` of the graph *before the first change* that the tensor still holds,
in order (composed over successive changes). ``distill`` matches these channels of the original."""


def _record_kept(graph: Graph, entries: dict) -> None:
    kept = graph.meta.setdefault(KEPT_META, {})
    for (kind, name, axis), e in entries.items():
        if kind != "tensor":
            continue
        pos = np.asarray(e["positions"], np.int64)
        per = kept.setdefault(name, {})
        prev = per.get(axis)
        per[axis] = (np.asarray(prev, np.int64)[pos] if prev is not None else pos).tolist()


def _transaction(graph: Graph, edit: Callable, lengths: list, what: str) -> None:
    """Run ``edit(undo)`` (it appends undo steps and returns the shape vectors it no longer reads),
    re-infer shapes and check each weight and tensor member of ``lengths`` (``(member, expected
    length)``); on any failure run the undo steps, last first, and re-raise. Then drop the orphans."""
    undo: list[Callable] = []
    try:
        replaced = edit(undo)
        graph.infer_shapes()
        for m, want in lengths:
            got = _current_dim(graph, m) if m.kind in ("tensor", "weight") else None
            if got is not None and got != want:
                raise ChannelError(f"after {what}, {m.kind} {m.name!r} axis {m.axis} has length {got}, "
                                   f"expected {want}")
    except Exception:
        for fn in reversed(undo):
            fn()
        try:
            graph.infer_shapes()
        except Exception:  # noqa: BLE001 - the graph inferred before: only a broken input gets here
            pass
        raise
    graph.remove_unused([t.node for t in replaced])


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
    i = sparse_index(node, axis, len(graph.shape(src)), len(begin))
    lo, hi = slice_range(node, begin, end, e["member"].dim, i)
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
    i = sparse_index(node, m.axis, len(graph.shape(src)), len(begin))
    lo, hi = slice_range(node, begin, end, dim, i)
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

    def edit(undo: list) -> list:
        return [t for plan, (_, n, init) in zip(plans, changes) for t in _grow(graph, plan, n, init, undo)]

    lengths = [(m, _grown_length(m, lay, n)) for plan, (_, n, _) in zip(plans, changes)
               for m, lay in plan["members"]]
    _transaction(graph, edit, lengths, "growing")


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
    i = sparse_index(node, pick.axis, len(graph.shape(graph.input(node, 0))), len(begin))
    begin[i], end[i] = position, position + 1
    return begin, end


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
    elif src.op == "ConcatV2":  # tf.tensordot's concat([shape(x)[:2], [C]]): a constant part changes
        old = node.shapes[0]
        for i, (a, b) in enumerate(zip(old, new_shape)):
            if a == b:
                continue
            p, off = concat_part(graph, src, i)
            part_t = graph.input(src, p)
            value = np.array(np.atleast_1d(constant_value(graph, part_t)))
            value[off] = b
            c = graph.add_node(f"{src.name}/{p}", "Const", unique=True,
                               attrs={"dtype": graph.dtype(part_t), "value": value})
            undo.append(lambda n=c.name: graph.remove_node(n, safe=False))
            graph.set_input(src, p, c.output(0))
            undo.append(lambda s=src.name, p=p, t=part_t: graph.set_input(s, p, t))
            replaced.append(part_t)
        return replaced
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
