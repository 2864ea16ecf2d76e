"""Class heads: which signature output holds class scores, its labels, and the outputs that carry one
slice per class (per-class box regression ``[N, K, 4]`` or ``[N, 4K]``). Shared by ``subset`` and
``extend``.

Example::

    head = find_class_head(g, output=None, background=False, labels_file=None)
    head.output, head.size, head.labels
    for pc in per_class_outputs(g, head, ("auto",)): ...
"""

from __future__ import annotations

import difflib
import re

import numpy as np
from dataclasses import dataclass
from pathlib import Path

from graphslim.analysis.channels import group_for
from graphslim.errors import PassError
from graphslim.ir.graph import WEIGHT_OP, Graph

SCORE_OPS = ("Softmax", "Sigmoid", "LogSoftmax")


@dataclass
class ClassHead:
    output: str  # signature output name (the class ids' output when the class axis is internal)
    size: int  # classes on the class axis (including a background class if any)
    labels: list | None  # one name per class, or None
    labels_asset: str | None  # asset file the labels came from (rewritten by the pass)
    background: bool
    tensor: object = None  # the tensor whose ``axis`` is the class axis (an output, or inside the graph)
    axis: int = -1


@dataclass
class IdsOutput:
    """A signature output whose values are class ids: positions on the class axis ``axis`` of
    ``tensor`` (what an ArgMax/TopK/NMS picked from) plus ``offset`` (e.g. +1 past a background)."""
    output: str
    tensor: str
    axis: int
    offset: int


@dataclass
class PerClassOutput:
    output: str
    axis: int
    width: int  # positions per class on that axis (4 for a flat [N, 4K] box output)
    offset: int  # 1 when this output has no background class but the head does


def _describe_outputs(graph: Graph) -> str:
    return ", ".join(f"{o.name} {list(graph.shape(o.tensor) or [])}" for o in graph.outputs)


def _read_labels(text: bytes, where: str) -> list:
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise PassError(f"labels file {where} is not UTF-8 text with one class name per line.") from None
    return [ln.strip() for ln in lines if ln.strip()]


def _labels(graph: Graph, size: int | None, labels_file: str | None):
    """(labels, asset name) from ``labels_file`` (a path or an asset name) or the model's assets."""
    if labels_file:
        if labels_file in graph.assets:
            return _read_labels(graph.assets[labels_file], labels_file), labels_file
        path = Path(labels_file)
        if not path.is_file():
            raise PassError(f"labels_file {labels_file!r} is neither a file nor one of the model's assets "
                            f"({', '.join(sorted(graph.assets)) or 'none'}).")
        return _read_labels(path.read_bytes(), labels_file), None
    for name, data in sorted(graph.assets.items()):
        if "label" in name.lower() or name.endswith(".txt"):
            labels = _read_labels(data, name)
            if size is None or len(labels) == size:
                return labels, name
    return None, None


# Output names that say "class scores" and names that say "not class scores" (boxes, masks, ...).
CLASS_NAMES = re.compile(r"(cls|class|logit|score|confidence|conf\b|prob|label|pred(ictions)?$|output_0$)", re.I)
NOT_CLASS_NAMES = re.compile(r"(box|bbox|regress|delta|anchor|mask|landmark|keypoint|kpt|coord|offset|"
                             r"centerness|objectness|depth|embed|feature|num_det|valid)", re.I)


# Ops that select detections: an output computed after one of them is not a class-score output.
SELECTION_OPS = ("CombinedNonMaxSuppression", "NonMaxSuppression", "NonMaxSuppressionV2", "NonMaxSuppressionV3",
                 "NonMaxSuppressionV4", "NonMaxSuppressionV5", "NonMaxSuppressionWithOverlaps", "TopKV2", "TopK",
                 "While", "StatelessWhile")


def _after_selection(graph: Graph, tensor) -> bool:
    return any(graph.node(n).op in SELECTION_OPS for n in graph.ancestors([tensor.node]))


def _internal_class_tensors(graph: Graph) -> list:
    """``(tensor, axis)`` class axes inside the graph, ahead of the detection outputs: the scores input
    of NMS over classes, and what an ArgMax (the class of a detection) or a Max (its score) reduce."""
    from graphslim.analysis.constants import constant_value

    found = [(graph.input(n, 1), 2) for n in graph.nodes("CombinedNonMaxSuppression")]
    for n in graph.nodes(SCORE_OPS):  # per-anchor class scores [N, anchors, K] (not a swish gate)
        shape = n.shapes[0] if n.shapes else None
        if not shape or len(shape) != 3 or not shape[-1] or shape[-1] <= 1:
            continue
        if any(c.op == "Mul" and graph.input(n, 0) in graph.inputs_of(c) for c, _ in graph.consumers(n.output(0))):
            continue
        found.append((n.output(0), len(shape) - 1))
    for n in graph.nodes(("ArgMax", "Max")):
        shape = graph.shape(graph.input(n, 0))
        axis = constant_value(graph, graph.input(n, 1))
        if shape is None or axis is None or np.size(axis) != 1:
            continue
        a = int(np.ravel(axis)[0]) % len(shape)
        if a == len(shape) - 1 and shape[a] and shape[a] > 1 and len(shape) >= 2:
            found.append((graph.input(n, 0), a))
    return found


def _widest(graph: Graph, tensor, axis: int):
    """The seed to use for an internal class axis: the widest plain class axis of its group (the scores
    before ``[..., 1:]`` dropped the background), so that class indices count every class. A wider
    axis that other convolutions fill too (``[boxes | classes]`` concatenated) is not the class axis."""
    grp = group_for(graph, tensor, axis)
    own = {m.name for m in grp.sources}
    cands = sorted((m for m in grp.members_of("tensor") if m.index_map.width == 1 and m.dim > grp.size
                    and graph.node(m.tensor.node).op not in (WEIGHT_OP, "Const")), key=lambda m: -m.dim)
    for m in cands:
        wider = group_for(graph, m.tensor, m.axis)
        if own and {w.name for w in wider.sources} <= own:
            return m.tensor, m.axis
    return tensor, axis % len(graph.shape(tensor))


def _class_candidates(graph: Graph, labels_file: str | None) -> list[tuple[int, str, str]]:
    """``(score, name, why)`` for every output that could hold class scores on its last axis, best
    first. An output qualifies when it has rank ≥ 2 and a static last axis longer than 1 and its name
    does not say boxes, masks, landmarks...; names like ``cls_logits``/``probs``, a Softmax/Sigmoid
    producer and a labels file of the right length add to its score; a last axis of 4 (box
    coordinates) counts against it."""
    labels, _ = _labels(graph, None, labels_file)
    out = []
    for o in graph.outputs:
        shape = graph.shape(o.tensor) or ()
        if len(shape) < 2 or not shape[-1] or shape[-1] <= 1:
            continue
        if NOT_CLASS_NAMES.search(o.name) and not CLASS_NAMES.search(o.name.replace("num_det", "")):
            continue
        if _after_selection(graph, o.tensor):  # detection_scores [N, 100]: its last axis is detections
            continue
        score, why = 0, []
        if CLASS_NAMES.search(o.name):
            score, why = score + 4, why + ["named like class scores"]
        if graph.producer(o.tensor).op in SCORE_OPS:
            score, why = score + 2, why + [f"produced by {graph.producer(o.tensor).op}"]
        if labels and shape[-1] in (len(labels), len(labels) + 1):
            score, why = score + 2, why + ["as many classes as the labels file"]
        if shape[-1] in (4, 5) and not CLASS_NAMES.search(o.name):
            score, why = score - 3, why + ["4/5 values per row look like box coordinates"]
        out.append((score, o.name, ", ".join(why) or "a last axis longer than 1"))
    out.sort(key=lambda c: -c[0])
    return out


def find_class_head(graph: Graph, output: str | None, background: bool, labels_file: str | None,
                    pass_name: str) -> ClassHead:
    """The output whose last axis is the class axis: ``output=`` if given; else the best of
    :func:`_class_candidates` (by name, producer and labels file; never an output named like boxes,
    masks or landmarks). When two candidates tie, the error lists them all with their shapes and
    asks for ``output=``."""
    names = [o.name for o in graph.outputs]
    if output is not None:
        if output not in names:
            raise PassError(f"{pass_name}: the signature has no output {output!r}; its outputs are "
                            f"{_describe_outputs(graph)}.")
        chosen = output
    else:
        cands = _class_candidates(graph, labels_file)
        internal = _internal_heads(graph) if not cands else []
        if len(internal) == 1:
            return _internal_head(graph, internal[0], background, labels_file, pass_name)
        if not cands or (len(cands) > 1 and cands[0][0] == cands[1][0]):
            listed = "; ".join(f"{n} {list(graph.shape(output_tensor(graph, n)) or [])} ({why})"
                               for _, n, why in cands) or "none"
            raise PassError(f"{pass_name}: cannot tell which output holds the class scores "
                            f"({'no output has' if not cands else 'several outputs have'} a class axis last; "
                            f"candidates: {listed}; all outputs: {_describe_outputs(graph)}). Pass "
                            f"output=NAME.")
        chosen = cands[0][1]
    t = next(o.tensor for o in graph.outputs if o.name == chosen)
    shape = graph.shape(t)
    if not shape or shape[-1] is None:
        raise PassError(f"{pass_name}: output {chosen!r} has no static class axis (shape {shape}).")
    labels, asset = _labels(graph, shape[-1], labels_file)
    if labels is not None and len(labels) != shape[-1]:
        raise PassError(f"{pass_name}: the labels file {labels_file or asset} has {len(labels)} names but output "
                        f"{chosen!r} has {shape[-1]} classes.")
    return ClassHead(chosen, shape[-1], labels, asset, background, t, len(shape) - 1)


def _internal_heads(graph: Graph) -> list:
    """Distinct widest class axes behind the internal class tensors (several picks, one head)."""
    out, groups = [], {}  # widest (tensor, axis) -> its group
    for t, axis in _internal_class_tensors(graph):
        if any(grp.covers(t, axis) for grp in groups.values()):  # one head shared by several levels
            continue
        try:
            w = _widest(graph, t, axis)
            groups.setdefault(w, group_for(graph, *w))
        except Exception:  # noqa: BLE001 - a candidate whose group cannot be formed is no head
            continue
        if w not in out:
            out.append(w)
    if len(out) > 1:  # several picks: the one the network's class convolutions produce
        produced = [w for w in out if groups[w].sources]
        out = produced or out
    if len(out) > 1:  # 4 per anchor are box coordinates (or named so)
        classes = [w for w in out if graph.shape(w[0])[w[1]] != 4 and not NOT_CLASS_NAMES.search(w[0].node)]
        out = classes or out
    return out


def _internal_head(graph: Graph, found, background: bool, labels_file, pass_name: str) -> ClassHead:
    """A detector whose class axis ends inside the graph (NMS in the graph): the head is the widest
    plain class axis feeding the NMS; ``output`` names the class-ids output (for messages/reports)."""
    t, axis = found
    size = graph.shape(t)[axis]
    grp = group_for(graph, t, axis)
    ids = ids_outputs(graph, grp)
    name = ids[0].output if ids else next(
        (o.name for o in graph.outputs if CLASS_NAMES.search(o.name)), graph.outputs[0].name)
    labels, asset = _labels(graph, size, labels_file)
    if labels is not None and len(labels) != size:
        labels, asset = None, None
    return ClassHead(name, size, labels, asset, background, t, axis)


# Ops a class id passes through unchanged (or shifted by a constant: ``classes + 1`` past a background).
_IDS_PASS = ("Cast", "Identity", "Reshape", "ExpandDims", "Squeeze", "StopGradient", "Snapshot")


def _ids_flow(graph: Graph, group):
    """``(tensor, offset, src, axis)`` for every tensor holding the class ids of ``group``'s picks (an
    ArgMax/TopK/NMS's ids output and what follows it unchanged: Cast, Reshape, gathers of detections,
    ``+ c`` / ``- c``; ``offset`` is the constant added on the way)."""
    from graphslim.analysis.constants import constant_value

    for ids, src, axis in group.ids:
        todo, seen = [(ids, 0)], set()
        while todo:
            t, off = todo.pop()
            if (t, off) in seen:
                continue
            seen.add((t, off))
            yield t, off, src, axis
            for c, port in graph.consumers(t):
                nxt = None
                if c.op in _IDS_PASS and port == 0:
                    nxt = off
                elif c.op in ("GatherV2", "Gather", "ResourceGather") and port == 0:
                    nxt = off
                elif c.op in ("AddV2", "Add", "Sub") and len(graph.inputs_of(c)) == 2:
                    v = constant_value(graph, graph.input(c, 1 - port))
                    if v is not None and np.ndim(v) == 0 and (c.op != "Sub" or port == 0):
                        nxt = off + int(v) * (-1 if c.op == "Sub" else 1)
                if nxt is not None:
                    todo.append((str(c.output(0)), nxt))


def ids_outputs(graph: Graph, group) -> list:
    """Signature outputs holding class ids of ``group`` (from its ArgMax/TopK/NMS picks), each with
    the constant added on the way (:class:`IdsOutput`), following Cast, Reshape, gathers of detections
    (GatherV2 of the ids) and ``+ c`` / ``- c``."""
    out, seen_names = [], set()
    for t, off, src, axis in _ids_flow(graph, group):
        for o in graph.outputs:
            if str(o.tensor) == t and o.name not in seen_names:
                seen_names.add(o.name)
                out.append(IdsOutput(o.name, src, axis, off))
    return out


def class_indexed_gathers(graph: Graph, group) -> list:
    """Gathers whose indices are ``group``'s class ids, along an axis holding one slice per id (the
    mask of each detection's class in Mask R-CNN: ``masks[..., class]`` with ``batch_dims``):
    ``(GatherV2 node, params tensor, axis)``. The axis must hold exactly the ids' range (the class
    axis the ids were picked from, plus their offset), so that ids of classes added at the end index
    slices added at its end."""
    from graphslim.analysis.constants import constant_value

    found = []
    for t, off, src, axis in _ids_flow(graph, group):
        for c, port in graph.consumers(t):
            if c.op != "GatherV2" or port != 1 or c.name in [f[0] for f in found]:
                continue
            params = graph.input(c, 0)
            shape = graph.shape(params)
            gax = constant_value(graph, graph.input(c, 2))
            if shape is None or gax is None:
                continue
            gax = int(gax) % len(shape)
            if shape[gax] is not None and shape[gax] == graph.shape(src)[axis] + off:
                found.append((c.name, params, gax))
    return found


def remap_ids(graph: Graph, group, keep) -> dict:
    """Class ids in ``group``'s ids outputs once ``keep`` is applied: ``{output: {old id: new id}}``
    (new ids are positions among the kept classes, plus the same offset). Call before applying."""
    maps = {}
    for io in ids_outputs(graph, group):
        old_pos = np.asarray(group.member(io.tensor, io.axis).positions(keep))
        maps[io.output] = {int(p) + io.offset: j + io.offset for j, p in enumerate(old_pos)}
    return maps


def remap_ids_after(graph: Graph, maps: dict, missing: int | None = None) -> None:
    """Wrap each ids output of ``maps`` (``{output: {old id: new id}}`` from :func:`remap_ids`) in a
    gather that turns its new ids back into the old ones, so that code knowing the model's ids (COCO's,
    say) keeps working. Ids outside the map (below the offset, e.g. padding) pass unchanged, or become
    ``missing`` when given. (Given the inverse map, the same gather turns old ids into new ones.)"""
    import tensorflow as tf

    for name, m in maps.items():
        arg = next(o for o in graph.outputs if o.name == name)
        table = np.arange(max(list(m.values()) + [-1]) + 1, dtype=np.int64)
        if missing is not None:
            table[:] = missing
        for old, new in m.items():
            table[new] = old
        dtype = graph.dtype(arg.tensor)
        base = f"{name}/original_ids"

        def add(suffix, op, inputs=(), **attrs):
            return graph.add_node(f"{base}/{suffix}" if suffix else base, op, inputs, attrs=attrs, unique=True)

        i64 = add("cast", "Cast", [arg.tensor], SrcT=dtype, DstT=tf.int64, Truncate=False)
        lo = add("lo", "Const", dtype=tf.int64, value=np.array(0, np.int64))
        hi = add("hi", "Const", dtype=tf.int64, value=np.array(len(table) - 1, np.int64))
        clip = add("clip", "ClipByValue", [i64, lo, hi], T=tf.int64)
        tab = add("table", "Const", dtype=tf.int64, value=table)
        axis = add("axis", "Const", dtype=tf.int32, value=np.array(0, np.int32))
        gather = add("gather", "GatherV2", [tab, clip, axis], Tparams=tf.int64, Tindices=tf.int64, Taxis=tf.int32,
                     batch_dims=0)
        arg.tensor = add("", "Cast", [gather], SrcT=tf.int64, DstT=dtype, Truncate=False).output(0)
    graph.infer_shapes()


def class_indices(head: ClassHead, keep=(), labels=(), pass_name: str = "subset") -> list[int]:
    """Validated class indices from ``keep=`` indices or ``labels=`` names (background first if asked)."""
    if bool(keep) == bool(labels):
        raise PassError(f"{pass_name}: give the classes either as keep=INDICES or as labels=NAMES (exactly one).")
    if labels:
        if head.labels is None:
            raise PassError(f"{pass_name}: labels= needs a labels file: the model has no labels asset; pass "
                            f"labels_file=PATH (one class name per line) or use keep=INDICES.")
        idx = []
        for name in labels:
            if name not in head.labels:
                close = difflib.get_close_matches(name, head.labels, n=3)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise PassError(f"{pass_name}: no class labelled {name!r} in output {head.output!r}.{hint}")
            idx.append(head.labels.index(name))
    else:
        idx = [int(k) for k in keep]
    bad = [k for k in idx if not 0 <= k < head.size]
    if bad:
        raise PassError(f"{pass_name}: class indices {bad} are out of range: output {head.output!r} has classes "
                        f"0..{head.size - 1}.")
    dup = sorted({k for k in idx if idx.count(k) > 1})
    if dup:
        raise PassError(f"{pass_name}: class indices {dup} are given twice.")
    if head.background:
        idx = [0] + [k for k in idx if k != 0]
    return idx


def per_class_outputs(graph: Graph, head: ClassHead, spec: tuple, pass_name: str) -> list[PerClassOutput]:
    """Outputs with one slice per class besides the head. ``spec``: ``("auto",)`` finds outputs with
    exactly one axis of length K (or K−1 without the background class, or 4K / 4(K−1) on a last axis
    of a rank-2 output); ``("none",)`` none; else ``"name:axis"`` entries."""
    size, bg = head.size, head.background
    found = []
    if spec in ((), ("none",)):
        return found
    if spec == ("auto",):
        for o in graph.outputs:
            if o.name == head.output:
                continue
            shape = graph.shape(o.tensor) or ()
            hits = []
            for a in range(1, len(shape)):
                d = shape[a]
                if d == size:
                    hits.append(PerClassOutput(o.name, a, 1, 0))
                elif bg and d == size - 1:
                    hits.append(PerClassOutput(o.name, a, 1, 1))
                elif len(shape) == 2 and a == 1 and d == 4 * size:
                    hits.append(PerClassOutput(o.name, a, 4, 0))
                elif len(shape) == 2 and a == 1 and bg and d == 4 * (size - 1):
                    hits.append(PerClassOutput(o.name, a, 4, 1))
            if len(hits) == 1:
                found.append(hits[0])
        return found
    for entry in spec:
        name, _, ax = entry.rpartition(":")
        if not name or not ax.lstrip("-").isdigit():
            raise PassError(f"{pass_name}: per_class entries look like OUTPUT:AXIS (e.g. class_boxes:1), got {entry!r}.")
        outs = {o.name: o for o in graph.outputs}
        if name not in outs:
            raise PassError(f"{pass_name}: per_class names output {name!r}, but the outputs are {_describe_outputs(graph)}.")
        shape = graph.shape(outs[name].tensor)
        a = int(ax) % len(shape)
        d = shape[a]
        for width in (1, 4):
            for offset in ((0, 1) if bg else (0,)):
                if d == width * (size - offset):
                    found.append(PerClassOutput(name, a, width, offset))
                    break
            else:
                continue
            break
        else:
            raise PassError(f"{pass_name}: axis {a} of output {name!r} has length {d}, which matches neither "
                            f"{size} classes nor 4 positions per class.")
    return found


def drop_outputs(graph, names, pass_name: str) -> list:
    have = [o.name for o in graph.outputs]
    missing = [n for n in names if n not in have]
    if missing:
        raise PassError(f"{pass_name}: drop_outputs names {missing}, but the outputs are {have}.")
    if set(names) >= set(have):
        raise PassError(f"{pass_name}: drop_outputs would remove every output; keep at least one.")
    graph.outputs = [o for o in graph.outputs if o.name not in names]
    return list(names)


def class_group(graph, tensor, axis, where: str, pass_name: str, allow_picks: bool = False):
    """The channel group of a class axis, refused (naming the op and the reason) when it is blocked,
    reaches a signature input or is normalized by a layer norm. With ``allow_picks`` (``extend``), ops
    reading class positions by index (:class:`~graphslim.analysis.channels.Pick`) are no blockers."""
    group = group_for(graph, tensor, axis)
    picked = {p.node for p in group.picks} if allow_picks else set()
    blockers = [b for b in group.blockers if b.node not in picked]
    if blockers:
        shown = "; ".join(str(b) for b in blockers[:3])
        more = f" (and {len(blockers) - 3} more)" if len(blockers) > 3 else ""
        raise PassError(f"{pass_name}: the class axis of {where} cannot be changed: blocked at " + shown + more
                        + ". graphslim has no channel rule for that op; remove it from the head, or open an "
                          "issue naming the op.")
    if group.touches_inputs:
        raise PassError(f"{pass_name}: the class axis of {where} reaches signature input "
                        f"{group.touches_inputs[0][0]!r}; it cannot be changed without changing the input.")
    if group.normalized_by:
        raise PassError(f"{pass_name}: the class axis of {where} is normalized by layer norm "
                        f"{group.normalized_by[0]!r}, which averages over the classes: removing or adding classes "
                        "would change the scores of the others.")
    return group


def output_tensor(graph, name):
    return next(o.tensor for o in graph.outputs if o.name == name)


# ------------------------------------------------------------------------- post-processing kept whole
CLASS_ID_NAMES = re.compile(r"(classes|class_ids?|labels?)$", re.I)


def expansion_boundary(graph: Graph, group):
    """Where to cut a class group that its post-processing blocks: the most downstream tensor of the
    group (class axis last, one position per class) through which every path from the class
    convolutions to the blocking ops runs. The network up to it is sliced; after it the classes are
    put back in their places (dropped ones at a score that never wins), so the post-processing runs
    unchanged. Returns the group member, or None."""
    order = {n.name: i for i, n in enumerate(graph.topo_order())}
    blockers = {b.node for b in group.blockers}
    starts = [m.name for m in group.sources]
    if not starts:
        return None

    carrying = {m.tensor.node for m in group.members_of("tensor")} | blockers  # where the classes flow

    def reaches_blocker_avoiding(cut_node: str) -> bool:
        seen, todo = set(), [s for s in starts if s != cut_node]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in blockers:
                return True
            todo += [c.name for c, _ in graph.consumers(n)
                     if c.name != cut_node and c.name not in seen and c.name in carrying]
        return False

    best = None
    for m in group.members_of("tensor"):
        node = graph.node(m.tensor.node)
        if m.index_map.width != 1 or node.op in (WEIGHT_OP, "Const") or m.tensor.port != 0 \
                or m.axis != len(graph.shape(m.tensor)) - 1 or node.num_outputs != 1:
            continue
        if best is not None and order[node.name] <= order[best.tensor.node]:
            continue
        if blockers <= graph.descendants([node.name]) and not reaches_blocker_avoiding(node.name):
            best = m
    return best


def cut(graph: Graph, tensor):
    """Detach ``tensor``'s readers onto a stand-in Placeholder (so a channel group seeded at ``tensor``
    stays upstream); returns the stand-in's name. :func:`expand` rewires them."""
    readers = list(graph.consumers(tensor))
    outs = [o for o in graph.outputs if o.tensor == tensor]
    ph = graph.add_node(f"{tensor.node}/graphslim_cut", "Placeholder", unique=True,
                        attrs={"dtype": graph.dtype(tensor), "shape": tuple(graph.shape(tensor))},
                        dtypes=[graph.dtype(tensor)], shapes=[tuple(graph.shape(tensor))])
    for node, port in readers:
        graph.set_input(node, port, ph.output(0))
    for o in outs:
        o.tensor = ph.output(0)
    return ph.name


def uncut(graph: Graph, stand_in: str, tensor) -> None:
    """Undo :func:`cut`: the stand-in's readers read ``tensor`` again."""
    graph.replace_all_uses(graph.node(stand_in).output(0), tensor)
    graph.remove_node(stand_in)


def expand(graph: Graph, member, stand_in: str, old_positions) -> tuple[str, str]:
    """After the group's change, the readers of ``stand_in`` read ``member``'s tensor with every
    position back in its place: ``old_positions`` (from ``member.positions(keep)``, taken before the
    change) are the old positions the new tensor holds; the others read 0 after a Sigmoid/Softmax and
    -1e4 before (a score that never wins). Returns the new node's name and the fill's description."""
    import tensorflow as tf

    tensor, axis = member.tensor, member.axis
    dtype = graph.dtype(tensor)
    probs = graph.producer(tensor).op in SCORE_OPS
    fill = 0.0 if probs else -1e4
    where = {int(p): j for j, p in enumerate(old_positions)}
    idx = np.array([where.get(p, 0) for p in range(member.dim)], np.int32)
    mask = np.array([p in where for p in range(member.dim)])
    base = f"{tensor.node}/classes_back"

    def add(suffix, op, inputs=(), **attrs):
        return graph.add_node(f"{base}/{suffix}" if suffix else base, op, inputs, attrs=attrs, unique=True)

    gathered = add("gather", "GatherV2", [tensor, add("idx", "Const", dtype=tf.int32, value=idx),
                                          add("axis", "Const", dtype=tf.int32, value=np.array(axis, np.int32))],
                   Tparams=dtype, Tindices=tf.int32, Taxis=tf.int32, batch_dims=0)
    out = add("", "SelectV2", [add("mask", "Const", dtype=tf.bool, value=mask), gathered,
                               add("fill", "Const", dtype=dtype, value=np.array(fill, dtype.as_numpy_dtype))],
              T=dtype)
    graph.replace_all_uses(graph.node(stand_in).output(0), out.output(0))
    graph.remove_node(stand_in)
    return out.name, "0 (probabilities)" if probs else "-1e4 (logits)"


def drop_unrolled_classes(graph: Graph, start: str, dim: int, dropped) -> list:
    """Post-processing unrolled per class in Python (tf-models-official's 'v2' NMS: one NMS per class,
    its results concatenated class after class): the chunks of the dropped classes leave every such
    Concat, so their branches die and ``dce`` removes them. A Concat of ``dim`` inputs after ``start``
    qualifies when each input ``j`` is provably class ``j``'s: everything it is computed from takes
    position ``j`` of the class axis (StridedSlices that shrink an axis of length ``dim`` at ``j``), or
    it takes none and is a constant equal to ``j`` (the class ids, ``tf.fill(.., j)``). The
    downstream reads the concatenated candidates whatever their number (a top-k). Returns the
    Concats rewritten; on any doubt nothing is changed."""
    from graphslim.analysis.constants import constant_value

    dropped = set(int(p) for p in dropped)
    if not dropped:
        return []
    graph.infer_shapes()
    region = graph.descendants([start])
    memo: dict = {}

    def owner(t) -> set:
        """Class positions that ``t`` is computed from (within the post-processing), or {"const"}."""
        key = str(t)
        if key in memo:
            return memo[key]
        memo[key] = set()
        out, todo, seen = set(), [graph.producer(t)], set()
        while todo:
            n = todo.pop()
            if n.name in seen or n.name not in region or n.name == start:
                continue
            seen.add(n.name)
            if n.op == "StridedSlice" and n.attr("shrink_axis_mask", 0):
                src = graph.shape(graph.input(n, 0)) or ()
                begin = constant_value(graph, graph.input(n, 1))
                if begin is not None:
                    mask = n.attr("shrink_axis_mask", 0)
                    for i, b in enumerate(np.atleast_1d(begin)):
                        if mask >> i & 1 and i < len(src) and src[i] == dim and not n.attr("ellipsis_mask", 0):
                            out.add(int(b) % dim)
            todo += [graph.producer(x) for x in graph.inputs_of(n)]
        memo[key] = out
        return out

    def is_class_id(t, j) -> bool:
        node = graph.producer(t)
        v = constant_value(graph, graph.input(node, 1) if node.op == "Fill" else t)
        return v is not None and bool(np.all(v == j))

    plans = [n for n in graph.nodes("ConcatV2") if n.name in region and len(graph.inputs_of(n)) - 1 == dim]
    for node in plans:  # every Concat of one chunk per class must qualify, or none is touched
        for j, t in enumerate(graph.inputs_of(node)[:-1]):
            own = owner(t)
            if own != {j} and not (not own and is_class_id(t, j)):
                return []
    if not any(any(owner(t) for t in graph.inputs_of(n)[:-1]) for n in plans):
        return []  # the class ids alone are no proof: some chunk must take class positions
    undo = []
    for node in plans:
        data = graph.inputs_of(node)
        undo.append((node, data, node.attr("N")))
        graph.set_inputs(node, [t for j, t in enumerate(data[:-1]) if j not in dropped] + [data[-1]])
        node.set_attr("N", len(data) - 1 - len(dropped & set(range(dim))))
    try:
        graph.infer_shapes()  # something downstream may need every chunk (a fixed reshape): undo
    except Exception:  # noqa: BLE001
        for node, data, n in undo:
            graph.set_inputs(node, data)
            node.set_attr("N", n)
        graph.infer_shapes()
        return []
    return [n.name for n in plans]


def class_id_outputs(graph: Graph, tensor) -> list:
    """Outputs named like class ids (detection_classes, classes, labels) computed from ``tensor``."""
    return [o.name for o in graph.outputs if CLASS_ID_NAMES.search(o.name)
            and tensor.node in graph.ancestors([o.tensor.node])]


# ------------------------------------------------------------------- growing through post-processing
def _copied_attrs(node) -> dict:
    """A node's attrs as fresh protos (a clone must not share them with its original)."""
    out = {}
    for k, v in node.attrs.items():
        out[k] = type(v)()
        out[k].CopyFrom(v)
    return out


def unmerge_rows(graph: Graph, group) -> list:
    """Undo the row merges that block ``group`` in post-processing: ``Reshape(x [B, C, N] → [-1, N])``,
    a row-wise op, ``Reshape(→ [B, C, k])`` back (``_select_top_k_scores`` of tf-models-official's
    NMS: a TopK per class and image; Keras's ``take_along_axis``: a gather with ``batch_dims=1`` of
    indices merged the same way) become the op on the unmerged tensors (TopKV2 on ``[B, C, N]``;
    GatherV2 with ``batch_dims`` = every leading axis), so that the class axis can be followed. Exact:
    the op treats each row alone either way. Returns the ops rewritten (their old forms die)."""
    from graphslim.analysis.constants import constant_value
    import tensorflow as tf

    def merged(t):
        """(x, leading dims) when ``t`` is ``Reshape(x, [-1, last])`` of a rank ≥ 3 ``x``."""
        r = graph.producer(t)
        if r.op != "Reshape" or t.port:
            return None
        x = graph.input(r, 0)
        xs, out = graph.shape(x), r.shapes[0] if r.shapes else None
        if xs is None or out is None or len(xs) < 3 or len(out) != 2 or xs[-1] is None or out[1] != xs[-1] \
                or any(d is None for d in xs[1:-1]):
            return None
        return x, tuple(xs[:-1])

    def split_back(t, lead) -> list | None:
        """The Reshapes restoring ``lead`` that are all the readers of ``t`` (or None)."""
        readers = graph.consumers(t)
        if not readers or graph.is_output(t):
            return None
        last = graph.shape(t)[-1]
        for r, port in readers:
            shape = r.shapes[0] if r.shapes else None
            if r.op != "Reshape" or port != 0 or shape is None or tuple(shape[1:]) != lead[1:] + (last,) \
                    or shape[0] not in (None, lead[0]):
                return None
        return [r for r, _ in readers]

    done = []
    for b in list(group.blockers):
        if not graph.has_node(b.node) or graph.node(b.node).op != "Reshape":
            continue
        t = graph.node(b.node).output(0)
        m = merged(t)
        readers = graph.consumers(t)
        if m is None or len(readers) != 1:
            continue
        (x, lead), (w, port) = m, readers[0]
        if w.op == "TopKV2" and port == 0:
            backs = [split_back(w.output(p), lead) for p in (0, 1)]
            if any(r is None for r in backs):
                continue
            new = graph.add_node(f"{w.name}/unmerged", "TopKV2", [x, graph.input(w, 1)],
                                 attrs=_copied_attrs(w), unique=True)
        elif w.op == "GatherV2" and port == 0 and int(w.attr("batch_dims", 0) or 0) == 1 \
                and constant_value(graph, graph.input(w, 2)) is not None \
                and int(constant_value(graph, graph.input(w, 2))) == 1:
            mi = merged(graph.input(w, 1))
            backs = [split_back(w.output(0), lead)]
            if mi is None or mi[1][1:] != lead[1:] or backs[0] is None:
                continue
            axis = graph.add_node(f"{w.name}/unmerged/axis", "Const", unique=True,
                                  attrs={"dtype": tf.int32, "value": np.array(len(lead), np.int32)})
            new = graph.add_node(f"{w.name}/unmerged", "GatherV2", [x, mi[0], axis.output(0)],
                                 attrs={**_copied_attrs(w), "Taxis": tf.int32, "batch_dims": len(lead)}, unique=True)
        else:
            continue
        for p, rs in enumerate(backs):
            for r in rs:
                graph.replace_all_uses(r.output(0), new.output(p))
        done.append(w.name)
    if done:
        graph.remove_dead_nodes()
        graph.infer_shapes()
    return done


@dataclass
class UnrolledClasses:
    """A post-processing unrolled per class in Python (tf-models-official's 'v1' and 'v2' NMS): for
    each of the ``dim`` classes, a *chunk* of ops starting at slices ``x[..., j]`` of class axes of
    the group (its fixed :class:`~graphslim.analysis.channels.Pick` s) and ending in Concats of one
    result per class (``joins``), plus the class ids (``tf.fill(.., j)``) concatenated the same way.
    Found and checked by :func:`unrolled_classes`; :func:`grow_unrolled_classes` adds chunks."""

    dim: int  # classes unrolled
    picks: dict  # position -> [Pick]
    joins: list  # Concat node names, one input per class
    chunks: dict  # position -> node names of its chunk (topological order)
    template: int  # the class whose chunk new classes are cloned from


def _is_index(value: np.ndarray, i: int) -> bool:
    """A numeric constant all of whose elements are ``i`` (a class index: ``tf.fill(.., i)``)."""
    return value.dtype.kind in "iuf" and value.size > 0 and bool(np.all(value == i))


def unrolled_classes(graph: Graph, group, pass_name: str) -> UnrolledClasses | None:
    """The post-processing of ``group`` unrolled per class, proved regular: each class's chunk is the
    same computation (ops, attrs, the functions they call up to their names) but for the class index
    (the position its slices take, constants equal to it). None when the group has no fixed picks;
    PassError naming the node when the chunks are not one per class or not alike."""
    fixed = [p for p in group.picks if p.position is not None]
    if not fixed:
        return None
    dims = sorted({graph.shape(p.tensor)[p.axis] for p in fixed})
    if len(dims) != 1:
        raise PassError(f"{pass_name}: ops take single classes of class axes of different lengths {dims} "
                        f"({', '.join(sorted({p.node for p in fixed})[:3])}, ...): not one post-processing per class.")
    dim = dims[0]
    picks: dict = {}
    for p in fixed:
        picks.setdefault(p.position, []).append(p)
    if sorted(picks) != list(range(dim)):
        missing = sorted(set(range(dim)) - set(picks))
        raise PassError(f"{pass_name}: ops take single classes of a class axis of {dim} (e.g. "
                        f"{fixed[0].node}), but none takes classes {missing[:5]}: the post-processing is "
                        f"not unrolled once per class.")
    pick_names = {p.node for p in fixed}
    concats = {n.name for n in graph.nodes("ConcatV2") if len(graph.inputs_of(n)) - 1 == dim}

    # Forward from each class's picks to the Concats of one result per class.
    while True:
        label: dict = {}
        for j in range(dim):
            todo = [p.node for p in picks[j]]
            while todo:
                n = todo.pop()
                if n in concats and n not in pick_names:
                    continue
                if label.get(n, j) != j:
                    raise PassError(f"{pass_name}: the post-processing of classes {label[n]} and {j} meet at "
                                    f"{n} ({graph.node(n).op}) before a concatenation of one result per class.")
                if n in label:
                    continue
                label[n] = j
                node = graph.node(n)
                if any(graph.is_output(node.output(q)) for q in range(node.num_outputs)):
                    raise PassError(f"{pass_name}: class {j}'s post-processing reaches signature output at "
                                    f"{n} without a concatenation of one result per class.")
                todo += [c.name for c, _ in graph.consumers(n)]
        inner = [c for c in concats if len({label.get(graph.input(c, i).node) for i in range(dim)} - {None}) == 1]
        if not inner:
            break
        concats -= set(inner)  # a Concat inside one class's chunk (box coordinates): not a join
    joins = sorted(c for c in concats if any(graph.input(c, i).node in label for i in range(dim)))
    if not joins:
        raise PassError(f"{pass_name}: ops take single classes (e.g. {fixed[0].node}) but their results are not "
                        f"concatenated class by class.")
    for c in joins:
        for i in range(dim):
            src = graph.input(c, i).node
            if src in label and label[src] != i:
                raise PassError(f"{pass_name}: input {i} of {c} (ConcatV2) comes from class {label[src]}'s "
                                f"post-processing, not class {i}'s.")
    after = graph.descendants(joins)
    for c in sorted(concats - set(joins)):  # the class ids, concatenated alike (tf.fill(.., j) per class)
        if all(graph.input(c, i).node not in label for i in range(dim)) and graph.descendants([c]) & after:
            joins.append(c)

    order = {node.name: k for k, node in enumerate(graph.topo_order())}
    chunks = {i: _chunk_nodes(graph, label, joins, pick_names, i, order) for i in range(dim)}
    # Class indices that are also constants of the ops (an axis 2, a top-k of 5: values in the chunks
    # of several classes) would read them as the class index: those classes are neither compared nor
    # the template, which the others prove.
    seen: dict = {}
    for i, nodes in chunks.items():
        for n in nodes:
            if graph.node(n).op == "Const":
                v = np.ravel(np.asarray(graph.node(n).attr("value")))
                if v.dtype.kind in "iuf" and v.size and np.all(v == v[0]) and float(v[0]).is_integer():
                    seen.setdefault(int(v[0]), set()).add(i)
    taken = {v for v, where in seen.items() if len(where) > 1}
    free = [i for i in range(dim) if i not in taken]
    if len(free) < 2:
        raise PassError(f"{pass_name}: the post-processing is unrolled per class (Concats {', '.join(joins[:3])}), "
                        f"but the class indices are also constants of its ops: graphslim cannot tell which "
                        f"constants are the class index.")
    memo: dict = {}
    template, compared = free[-1], free[:-1]
    ref = _chunk_signature(graph, chunks[template], picks[template], joins, template, memo)
    for i in compared:
        if _chunk_signature(graph, chunks[i], picks[i], joins, i, memo) != ref:
            raise PassError(f"{pass_name}: the post-processing is unrolled per class (Concats {', '.join(joins[:3])}), "
                            f"but class {i}'s ops differ from class {template}'s by more than the class index: "
                            f"graphslim cannot tell how a new class's would look.")
    return UnrolledClasses(dim, picks, joins, chunks, template)


def _chunk_nodes(graph: Graph, label: dict, joins: list, pick_names: set, i: int, order: dict) -> list:
    """Class ``i``'s chunk: its labelled ops and the ancestors that only it reads (per-class constants,
    its ids), in topological order. A pick's begin/end are not part of it (rewritten, not cloned)."""
    def inputs(n):
        ins = graph.inputs_of(n)
        return ins[:1] if n in pick_names else ins

    want = {(c, i) for c in joins}
    joined = set(joins)
    nodes = {n for n, j in label.items() if j == i}
    todo = [graph.input(c, i).node for c in joins] + [t.node for n in nodes for t in inputs(n)]
    while todo:  # to a fixpoint: an ancestor joins once all its readers have
        changed = False
        for a in sorted(set(todo)):
            if a in nodes or a in label or a in joined or graph.node(a).op in (WEIGHT_OP, "Placeholder"):
                continue
            readers = graph.consumers(a)
            if readers and all(c.name in nodes or (c.name, port) in want for c, port in readers):
                nodes.add(a)
                todo += [t.node for t in inputs(a)]
                changed = True
        if not changed:
            break
    return sorted(nodes, key=order.__getitem__)


def _chunk_signature(graph: Graph, nodes: list, picks: list, joins: list, i: int, memo: dict,
                     keys: dict | None = None) -> tuple:
    """What class ``i``'s chunk computes with its class index abstracted (its picks' position,
    constants equal to ``i``): one key per Concat input; ``keys`` collects each node's."""
    from graphslim.analysis.constants import constant_value
    from graphslim.ir.functions import attrs_fingerprint

    inside, keys = set(nodes), {} if keys is None else keys
    pks = {p.node: p for p in picks}

    def inkey(t):
        return (keys[t.node], t.port) if t.node in inside else ("ext", str(t))

    for n in nodes:
        node = graph.node(n)
        if n in pks:
            strides = constant_value(graph, graph.input(node, 3))
            k = ("pick", attrs_fingerprint(node.attrs, graph.functions, memo), inkey(graph.input(node, 0)),
                 pks[n].axis, None if strides is None else np.asarray(strides).tobytes())
        elif node.op == "Const":
            v = np.asarray(node.attr("value"))
            k = ("index", str(v.dtype), v.shape) if _is_index(v, i) else ("const", str(v.dtype), v.shape, v.tobytes())
        else:
            k = (node.op, attrs_fingerprint(node.attrs, graph.functions, memo),
                 tuple(inkey(t) for t in graph.inputs_of(node)))
        keys[n] = hash(k)
    return tuple(inkey(graph.input(c, i)) for c in joins)


def grow_unrolled_classes(graph: Graph, unrolled: UnrolledClasses, n: int) -> list:
    """Add the post-processing of ``n`` new classes (positions ``dim`` … ``dim+n-1`` of the grown class
    axes) to ``unrolled``: the template class's chunk cloned with its slices and its constants equal to
    its index moved to the new class, each result appended to its Concat. Returns the new nodes."""
    from graphslim.analysis.channels import pick_vectors

    t = unrolled.template
    pks = {p.node: p for p in unrolled.picks[t]}
    added = []
    new_inputs = {c: [] for c in unrolled.joins}
    for c in range(unrolled.dim, unrolled.dim + n):
        clone: dict = {}
        for name in unrolled.chunks[t]:
            node = graph.node(name)
            attrs = _copied_attrs(node)
            attrs.pop("_class", None)
            ins = [clone[x.node].output(x.port) if x.node in clone else x for x in graph.inputs_of(node)]
            if name in pks:
                begin, end = pick_vectors(graph, pks[name], c)
                for port, v in ((1, begin), (2, end)):
                    dtype = graph.dtype(graph.input(node, port))
                    k = graph.add_node(f"{name}/class_{c}/{'begin' if port == 1 else 'end'}", "Const", unique=True,
                                       attrs={"dtype": dtype, "value": v.astype(dtype.as_numpy_dtype)})
                    added.append(k.name)
                    ins[port] = k.output(0)
            elif node.op == "Const" and _is_index(np.asarray(node.attr("value")), t):
                attrs["value"] = np.full_like(np.asarray(node.attr("value")), c)
            new = graph.add_node(f"{name}/class_{c}", node.op, ins, attrs=attrs, device=node.device, unique=True)
            clone[name] = new
            added.append(new.name)
        for j in unrolled.joins:
            x = graph.input(j, t)
            new_inputs[j].append(clone[x.node].output(x.port) if x.node in clone else x)
    for j in unrolled.joins:
        node = graph.node(j)
        data = graph.inputs_of(node)
        graph.set_inputs(node, data[:-1] + new_inputs[j] + data[-1:])
        node.set_attr("N", len(data) - 1 + n)
    graph.infer_shapes()
    return added
