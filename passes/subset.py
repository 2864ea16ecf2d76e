"""``subset``: keep only some classes: dead-output elimination for the classes nobody needs.

``subset{keep=3,7,12}`` (or ``labels=cat,dog``) finds the channel group of the class axis of the
class-score output (see :mod:`graphslim.analysis.heads`) and slices every weight in it: the head's
kernel columns and bias, per-class constants, detection convs whose channels are anchors × classes
(through the Reshape), and the consumers of the class axis. Outputs with one slice per class (e.g.
per-class boxes ``[N, K, 4]``) are sliced consistently (``per_class=``). Kept logits are identical to
the original's kept logits; a Softmax renormalizes over the kept classes. Classes come out in the
order given. The labels asset is rewritten; the report has the old → new index map.
``drop_outputs=`` removes whole outputs with everything only they needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphslim.analysis.channels import apply_keeps
from graphslim.analysis.channels import group_for
from graphslim.analysis.heads import (class_group, class_id_outputs, class_indices, cut, drop_outputs,
                                      drop_unrolled_classes, expand,
                                      expansion_boundary, find_class_head, output_tensor, per_class_outputs,
                                      remap_ids, remap_ids_after, uncut)
from graphslim.pipeline import PassResult, register_pass


@dataclass(frozen=True)
class SubsetOptions:
    keep: tuple[int, ...] = field(default=(), metadata={"help": "class indices to keep, in the new order"})
    labels: tuple[str, ...] = field(default=(), metadata={"help": "class names to keep (from the labels file)"})
    labels_file: str | None = field(default=None, metadata={
        "help": "labels file (one name per line; a path or an asset name); default: the model's labels asset"})
    output: str | None = field(default=None, metadata={
        "help": "signature output holding the class scores (default: the one whose last axis is the class axis)"})
    background: bool = field(default=False, metadata={"help": "class 0 is background: keep it, first"})
    per_class: tuple[str, ...] = field(default=("auto",), metadata={
        "help": "outputs with one slice per class, OUTPUT:AXIS; 'auto' finds them by size, 'none' disables"})
    drop_outputs: tuple[str, ...] = field(default=(), metadata={
        "help": "signature outputs to remove with everything only they need"})
    postprocess: str = field(default="auto", metadata={
        "help": "post-processing the class axis cannot be followed through (NMS loops unrolled per class, "
                "take_along_axis...): 'auto' slices the network up to it and puts the kept classes back in "
                "their places before it (dropped ones never win), 'follow' refuses instead",
        "choices": ("auto", "follow")})
    unrolled: bool = field(default=True, metadata={
        "help": "with post-processing kept whole: remove the dropped classes' branches of post-processing "
                "unrolled per class (tf-models-official's v2 NMS), whose results are concatenated class "
                "by class"})
    ids: str = field(default="new", metadata={
        "help": "class ids in detection outputs (detection_classes, labels): 'new' (indices among the kept "
                "classes) or 'original' (the model's own ids, by a gather of the kept ids)",
        "choices": ("new", "original")})


@register_pass("subset", options=SubsetOptions)
def subset(graph, opts: SubsetOptions) -> PassResult:
    """Keep only the given classes of a classifier or detector head (smaller and faster model).

    Example: ``--passes "subset{keep=3,7,12},dce"`` or ``"subset{labels=cat,dog}"``.
    """
    before = graph.cost()
    dropped = drop_outputs(graph, opts.drop_outputs, "subset") if opts.drop_outputs else []
    if dropped:
        graph.remove_dead_nodes()
    head = find_class_head(graph, opts.output, opts.background, opts.labels_file, "subset")
    keep = class_indices(head, opts.keep, opts.labels, "subset")
    expanded = None
    group = group_for(graph, head.tensor, head.axis)
    if group.blockers and opts.postprocess == "auto" and not graph.is_output(head.tensor):
        expanded = expansion_boundary(graph, group)
    if expanded is not None:
        old_positions = expanded.positions(keep)
        tensor = expanded.tensor
        id_outputs = class_id_outputs(graph, tensor)
        stand_in = cut(graph, tensor)
        try:
            group = class_group(graph, head.tensor, head.axis, f"output {head.output!r} (up to {tensor})",
                                "subset")
        except Exception:
            uncut(graph, stand_in, tensor)
            raise
    else:
        group = class_group(graph, head.tensor, head.axis, f"output {head.output!r}", "subset")
    changes = [(group, keep)]
    sliced = {head.output: -1} if graph.is_output(head.tensor) else {}
    for pc in per_class_outputs(graph, head, opts.per_class, "subset"):
        if group.covers(output_tensor(graph, pc.output), pc.axis):
            continue
        classes = [k - pc.offset for k in keep if k - pc.offset >= 0]
        idx = [k * pc.width + j for k in classes for j in range(pc.width)]
        g2 = class_group(graph, output_tensor(graph, pc.output), pc.axis, f"output {pc.output!r}", "subset")
        changes.append((g2, idx))
        sliced[pc.output] = pc.axis
    for name, axis in group.touches_outputs:
        sliced.setdefault(name, axis)
    ids_map = remap_ids(graph, group, keep)
    if expanded is not None:  # the post-processing computes the original ids
        ids_map = {name: {int(k): j for j, k in enumerate(keep)} for name in id_outputs}
    try:
        apply_keeps(graph, changes)
    except Exception:
        if expanded is not None:
            uncut(graph, stand_in, tensor)
        raise
    postprocess = None
    if expanded is not None:
        back, fill = expand(graph, expanded, stand_in, old_positions)
        postprocess = f"kept whole: classes put back in place after {tensor} (dropped ones at {fill})"
        if opts.unrolled:
            survivors = {int(p) for p in old_positions}
            concats = drop_unrolled_classes(graph, back, expanded.dim,
                                            [p for p in range(expanded.dim) if p not in survivors])
            if concats:
                postprocess += (f"; the dropped classes' per-class post-processing left {len(concats)} "
                                f"concatenation(s) unrolled per class")
        if opts.ids == "new":
            remap_ids_after(graph, {name: {j: k for k, j in m.items()} for name, m in ids_map.items()},
                            missing=-1)
    elif opts.ids == "original":
        remap_ids_after(graph, ids_map)
    removed = graph.remove_dead_nodes()
    kept_labels = None
    if head.labels is not None:
        kept_labels = [head.labels[k] for k in keep]
        if head.labels_asset is not None:
            graph.assets[head.labels_asset] = ("\n".join(kept_labels) + "\n").encode("utf-8")
        else:
            graph.assets["labels.txt"] = ("\n".join(kept_labels) + "\n").encode("utf-8")
    after = graph.cost()
    return PassResult(changed=True, stats={
        "output": head.output, "classes_before": head.size, "classes_after": len(keep),
        "index_map": {int(old): new for new, old in enumerate(keep)},
        "labels": kept_labels, "sliced_outputs": sliced, "dropped_outputs": dropped,
        "ids_outputs": {name: {"ids": opts.ids, "map": m} for name, m in ids_map.items()},
        "postprocess": postprocess,
        "removed_nodes": len(removed),
        "params": [before.params, after.params], "macs": [before.macs, after.macs]})
