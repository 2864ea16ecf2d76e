"""Class axes through detection post-processing, for ``subset`` and ``extend`` (see Detection heads in
docs/ARCHITECTURE.md).

Kept whole (``subset``): :func:`expansion_boundary` finds the last tensor of a class group that every
class path runs through when post-processing blocks the group; :func:`cut` detaches its readers onto a
stand-in, and after the group shrank :func:`expand` puts the classes back in their places (or
:func:`uncut` undoes the cut). :func:`drop_unrolled_classes` drops the chunks of removed classes from a
post-processing unrolled per class.

Grown (``extend``): :func:`unmerge_rows` rewrites ``Reshape([-1, N])`` → row-wise op → ``Reshape`` back
into the op on the unmerged tensor; :func:`unrolled_classes` proves a per-class unrolled post-processing
regular and :func:`grow_unrolled_classes` clones a chunk per new class.

Example::

    member = expansion_boundary(g, group)
    stand_in = cut(g, member.tensor)
    ...                                    # shrink the group upstream of the cut
    expand(g, member, stand_in, old_positions)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from graphslim.errors import PassError
from graphslim.ir.graph import WEIGHT_OP, Graph

# Ops that turn class logits into class scores (probabilities): a class put back after one reads 0.
SCORE_OPS = ("Softmax", "Sigmoid", "LogSoftmax")


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
