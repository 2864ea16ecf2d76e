"""Class heads: which signature output holds class scores, its labels, and the outputs that carry one
slice per class (per-class box regression ``[N, K, 4]`` or ``[N, 4K]``). Shared by ``subset`` and
``extend``. What they do through detection post-processing (cut and put back, unrolled per-class NMS,
row unmerging) is :mod:`graphslim.analysis.postprocess`, whose functions are importable from here too.

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
from graphslim.analysis.postprocess import (CLASS_ID_NAMES, SCORE_OPS, UnrolledClasses, class_id_outputs, cut,
                                            drop_unrolled_classes, expand, expansion_boundary,
                                            grow_unrolled_classes, uncut, unmerge_rows, unrolled_classes)
from graphslim.errors import PassError
from graphslim.ir.graph import WEIGHT_OP, Graph

__all__ = [
    "ClassHead", "IdsOutput", "PerClassOutput", "SCORE_OPS", "CLASS_NAMES", "NOT_CLASS_NAMES", "SELECTION_OPS",
    "find_class_head", "ids_outputs", "class_indexed_gathers", "remap_ids", "remap_ids_after", "class_indices",
    "per_class_outputs", "drop_outputs", "class_group", "output_tensor",
    # graphslim.analysis.postprocess
    "CLASS_ID_NAMES", "UnrolledClasses", "class_id_outputs", "cut", "drop_unrolled_classes", "expand",
    "expansion_boundary", "grow_unrolled_classes", "uncut", "unmerge_rows", "unrolled_classes",
]


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
