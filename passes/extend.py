"""``extend``: add classes to a trained head, keeping the old ones exactly.

``extend{classes=2}`` or ``extend{labels=zebra,okapi}`` grows the channel group of the class axis by
the new classes (and per-class outputs such as ``[N, K, 4]`` boxes along with it): the producing
kernels and biases get new columns (``init=zeros|normal|mean``, seeded), layers that read the class
axis get zero rows so nothing downstream changes for the old classes. Old logits are identical; the
new weights are trainable so the head can be fine-tuned. The labels asset grows.

Detectors with their post-processing in the graph grow through it:

- per-class box regression coupled to the scores (Mask R-CNN's second stage feeds NMS one box per
  class) and class-indexed heads (its mask of each detection's class, a gather by the class ids)
  grow with the classes. Their new rows start as the mean of the existing classes' (the average
  class's box or mask, a sensible box before fine-tuning); only the class scores use ``init``;
- a post-processing unrolled per class in Python (tf-models-official's 'v1' and 'v2' NMS: one NMS
  per class, concatenated) gets one more chunk per new class, cloned from the last class's once
  every class's chunk is proved the same computation but for the class index;
- row merges around a per-row op (``Reshape([-1, N])``, TopK or a gather, ``Reshape`` back: the
  per-class top-k of 'v2', Keras's ``take_along_axis``) are rewritten as the op on the unmerged
  tensor (exact), so the class axis can be followed through class-agnostic NMS (YOLOv8's max and
  argmax over classes).

Old classes' scores are identical; a detection of an old class can only lose its place in the
top-k to a new class scoring higher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from graphslim.analysis.channels import apply_grows, group_for
from graphslim.analysis.imprint import emit_gated, gated_imprint, head_layer, imprint
from graphslim.analysis.heads import (class_group, class_indexed_gathers, find_class_head, grow_unrolled_classes,
                                      output_tensor, per_class_outputs, unmerge_rows, unrolled_classes)
from graphslim.errors import PassError
from graphslim.pipeline import PassResult, register_pass


@dataclass(frozen=True)
class ExtendOptions:
    classes: int = field(default=0, metadata={"help": "number of classes to add"})
    labels: tuple[str, ...] = field(default=(), metadata={"help": "names of the classes to add"})
    init: str = field(default="normal", metadata={"help": "initial weights of the new classes",
                                                  "choices": ("zeros", "normal", "mean")})
    seed: int = field(default=0, metadata={"help": "random seed for init=normal"})
    labels_file: str | None = field(default=None, metadata={
        "help": "labels file (a path or an asset name); default: the model's labels asset"})
    output: str | None = field(default=None, metadata={
        "help": "signature output holding the class scores (default: the one whose last axis is the class axis)"})
    background: bool = field(default=False, metadata={
        "help": "class 0 of the head is background (per-class outputs without it grow too)"})
    examples: str | None = field(default=None, metadata={
        "help": "imprint the new classes from examples (Qi et al. 2018): a .npz with the model's inputs and "
                "examples_key= holding each example's new class id (K..K+n-1); no training"})
    examples_key: str = field(default="labels", metadata={"help": "key of the class ids in examples="})
    imprint_bias: str = field(default="fit", metadata={
        "help": "imprinted classes' bias: fit (the old mean, raised until every example of the class scores "
                "it at least as high as its best old class) or mean (the old classes' mean)",
        "choices": ("fit", "mean")})
    imprint: str = field(default="discriminant", metadata={
        "help": "with examples=: discriminant (needs calib=: the new classes scored against the old ones on the "
                "head's features) or qi (Qi et al.'s rows alone: for heads trained as cosine classifiers; on a "
                "plain softmax head the new classes can take the old classes' inputs)",
        "choices": ("discriminant", "qi")})
    calib: str | None = field(default=None, metadata={
        "help": "with examples=: unlabeled inputs of the old classes (.npz keyed by input name); the new classes "
                "are then scored by a discriminant on the head's features against the old classes' (fitted on "
                "this data, labelled by the model's own predictions), which keeps the old classes' accuracy "
                "where Qi's rule alone does not"})
    calib_samples: int = field(default=512, metadata={"help": "calibration examples used at most"})
    split_new: bool = field(default=False, metadata={
        "help": "emit the head's old rows and the new rows as two variables joined by a Concat, and make every "
                "weight but the new rows non-trainable: fine-tuning then trains only the new classes"})
    per_class: tuple[str, ...] = field(default=("auto",), metadata={
        "help": "outputs with one slice per class, OUTPUT:AXIS; 'auto' finds them by size, 'none' disables"})
    prior: str = field(default="auto", metadata={
        "help": "new classes' start on sigmoid (focal-loss) heads: bias at -log((1-p)/p), 'auto' when a Sigmoid "
                "scores the classes or the biases sit below -2 (as a focal prior leaves them) with p the existing "
                "classes' mean probability; on softmax heads: the average class's weights with the bias lowered "
                "by -log(p), so a new class's probability is at most p times the best class's and the old "
                "probabilities do not move ('auto': p=1e-9 where the probabilities feed post-processing in the "
                "graph, as a detector's NMS; not on a classifier's softmax output); 'none' (init alone), or a "
                "probability p"})


def _bias_names(graph, group) -> set:
    """Weights of the group added to the class logits (BiasAdd / Add of a weight)."""
    out = set()
    for m in group.members_of("weight"):
        if m.role is None and any(c.op in ("BiasAdd", "AddV2", "Add") for c, _ in graph.consumers(m.name)):
            out.add(m.name)
    return out


def _prior_bias(graph, group, biases: set, prior: str) -> float | None:
    """The logit of the focal-loss prior for new classes (None: not a sigmoid head, or prior=none)."""
    if prior == "none" or not biases:
        return None
    values = np.concatenate([np.ravel(graph.weights[b].value) for b in biases]).astype(np.float64)
    if prior != "auto":
        p = float(prior)
    else:
        sigmoid = any(graph.producer(m.tensor).op == "Sigmoid" for m in group.members_of("tensor")
                      if graph.has_node(m.tensor.node))
        if not sigmoid and values.mean() >= -2.0:
            return None
        p = float(np.mean(1.0 / (1.0 + np.exp(-values))))
    return float(-np.log((1.0 - p) / p))


def _softmax_gap(group, biases: set, prior: str) -> float | None:
    """How far below the average class's logit new classes start on a softmax head: -log(p). The
    average class's logit never exceeds the best class's, so a new class's probability is at most p
    times the best class's. 'auto' (p=1e-9: far below float32 resolution, the old probabilities do
    not move) applies where the probabilities feed post-processing in the graph (a detector's NMS,
    whose detections' scores they are; it is trained on its logits); a classifier's softmax output
    keeps ``init`` (its logits are the contract, and a loss on clipped probabilities would not train
    a class that starts at 1e-9). None: no Softmax over the classes, no bias to lower, prior=none."""
    if prior == "none" or not biases or not group.renormalized_by or (prior == "auto" and group.touches_outputs):
        return None
    return float(-np.log(1e-9 if prior == "auto" else float(prior)))


def _initializer(opts: ExtendOptions, rng: np.random.RandomState, biases=(), prior_bias=None, regression=(),
                 softmax_gap=None):
    def init(member, old: np.ndarray) -> np.ndarray:
        n = init.count
        shape = (n,) + old.shape[1:]
        if member.role == "sink":  # readers of the class axis must not see the new classes yet
            return np.zeros(shape, old.dtype)
        if prior_bias is not None and member.name in biases:  # sigmoid head: start at the prior
            return np.full(shape, prior_bias, old.dtype)
        mean = old.mean(axis=0, keepdims=True)
        if member.name in regression:  # per-class boxes and masks: the average class's
            return np.repeat(mean, n, axis=0).astype(old.dtype)
        if softmax_gap is not None:  # softmax head: the average class, its bias lowered by the gap
            return np.repeat(mean - (softmax_gap if member.name in biases else 0.0), n, axis=0).astype(old.dtype)
        if opts.init == "zeros":
            return np.zeros(shape, old.dtype)
        if opts.init == "mean" or member.role != "source":  # biases, scales: the average class
            return np.repeat(mean, n, axis=0).astype(old.dtype)
        std = float(old.std()) or 1e-2
        return rng.normal(0.0, std, size=shape).astype(old.dtype)

    init.count = 0
    return init


def _split_new_rows(graph, hl, n: int) -> list:
    """``split_new``: the head's kernel (and bias) become their old rows and a new weight
    ``<name>_new`` with the ``n`` new rows, joined by a ConcatV2 on the class axis where the grown weight
    was read; every weight but the new rows becomes non-trainable (fine-tuning then trains only the new
    classes). Returns ``[(old name, new name), ...]``."""
    node = graph.node(hl.node)
    done = []
    for w in graph.weights.values():
        w.trainable = False
    for name in [hl.kernel] + ([hl.bias] if hl.bias else []):
        value = graph.weights[name].value
        if name == hl.kernel:
            axis = 0 if node.op == "MatMul" and node.attr("transpose_b", False) else value.ndim - 1
        else:
            axis = value.ndim - 1
        k = value.shape[axis] - n
        old, new = np.split(value, [k], axis=axis)
        readers = graph.weight_readers(name)
        new_name = graph.unique_name(f"{name}_new")
        graph.set_weight(name, np.ascontiguousarray(old), trainable=False)
        graph.add_weight(new_name, np.ascontiguousarray(new), trainable=True)
        axis_node = graph.add_const(f"{name}/split_new_axis", np.int32(axis), unique=True)
        concat = graph.add_node(graph.unique_name(f"{name}/split_new"), "ConcatV2",
                                [f"{name}:0", f"{new_name}:0", f"{axis_node.name}:0"],
                                {"N": 2, "T": tf.as_dtype(value.dtype), "Tidx": tf.int32})
        for reader, port in readers:
            graph.set_input(reader, port, f"{concat.name}:0")
        done.append((name, new_name))
    graph.infer_shapes()
    return done


def _refuse_picks(picks, where: str) -> None:
    if picks:
        p = picks[0]
        raise PassError(f"extend: the class axis of {where} cannot grow: {p.node} reads "
                        f"{'class ' + str(p.position) if p.position is not None else 'classes chosen at run time'} "
                        f"of {p.tensor} by index, and graphslim cannot tell what it would read for a new class.")


def _expose(graph, head) -> list:
    """Rewrite row merges in the class axis's post-processing until the group no longer meets one."""
    done = []
    for _ in range(8):
        step = unmerge_rows(graph, group_for(graph, head.tensor, head.axis))
        if not step:
            break
        done += step
    return done


@register_pass("extend", options=ExtendOptions)
def extend(graph, opts: ExtendOptions) -> PassResult:
    """Add classes to a classifier or detector head; old logits stay identical, new ones are trainable.

    Example: ``--passes "extend{labels=zebra,okapi init=mean}"``
    """
    if bool(opts.classes) == bool(opts.labels):
        raise PassError("extend: give the new classes either as classes=N or as labels=NAMES (exactly one).")
    if opts.classes < 0:
        raise PassError(f"extend: classes must be positive, got {opts.classes}.")
    if opts.prior not in ("auto", "none"):
        try:
            p = float(opts.prior)
        except ValueError:
            raise PassError(f"extend: prior must be 'auto', 'none' or a probability, got {opts.prior!r}.") from None
        if not 0 < p < 1:
            raise PassError(f"extend: prior must be a probability between 0 and 1, got {p}.")
    n = opts.classes or len(opts.labels)
    head = find_class_head(graph, opts.output, opts.background, opts.labels_file, "extend")
    if head.labels is not None:
        clash = sorted(set(opts.labels) & set(head.labels))
        if clash:
            raise PassError(f"extend: classes {clash} already exist in output {head.output!r}.")
    new_labels = list(opts.labels) or [f"class_{head.size + i}" for i in range(n)]
    rng = np.random.RandomState(opts.seed)
    unmerged = _expose(graph, head) if not graph.is_output(head.tensor) else []
    group = class_group(graph, head.tensor, head.axis, f"output {head.output!r}", "extend", allow_picks=True)
    _refuse_picks([p for p in group.picks if p.position is None], f"output {head.output!r}")
    unrolled = unrolled_classes(graph, group, "extend")  # the fixed picks: one post-processing per class
    groups = [(head.output, group, n)]
    for pc in per_class_outputs(graph, head, opts.per_class, "extend"):
        if group.covers(output_tensor(graph, pc.output), pc.axis):
            continue
        g2 = class_group(graph, output_tensor(graph, pc.output), pc.axis, f"output {pc.output!r}", "extend")
        groups.append((pc.output, g2, n * pc.width))
    gathers = []
    for gather, params, axis in class_indexed_gathers(graph, group):  # the mask of each detection's class
        if any(g.covers(params, axis) for _, g, _ in groups):
            continue
        where = f"{params} (gathered by class id at {gather})"
        g3 = class_group(graph, params, axis, where, "extend", allow_picks=True)
        _refuse_picks([p for p in g3.picks if p.node != gather], where)
        groups.append((None, g3, n))
        gathers.append(gather)
    scores = graph.ancestors([head.tensor.node]) | {head.tensor.node}
    regression = {m.name for _, grp, _ in groups for m in grp.members_of("weight")
                  if m.role != "sink" and m.name not in scores}
    biases = _bias_names(graph, group) - regression
    softmax_gap = _softmax_gap(group, biases, opts.prior)
    prior_bias = None if softmax_gap is not None else _prior_bias(graph, group, biases, opts.prior)
    init = _initializer(opts, rng, biases, prior_bias, regression, softmax_gap)
    imprinted, imprint_stats, hl = {}, None, None
    if opts.calib is not None and (opts.examples is None or opts.imprint != "discriminant"):
        raise PassError("extend: calib= is the old classes' data for imprinting by a discriminant; it needs "
                        "examples= (the new classes' examples) and imprint=discriminant (the default).")
    if opts.examples is not None and opts.imprint == "discriminant" and opts.calib is None:
        raise PassError(f"extend: examples={opts.examples} imprints the new classes against the old ones, which "
                        "needs unlabeled inputs of the old classes: give calib=OLD.npz (a few hundred, keyed by "
                        "input name). imprint=qi takes Qi et al.'s rows alone, without data of the old classes; "
                        "it suits heads trained as cosine classifiers: on a plain softmax head the new classes "
                        "can take the old classes' inputs (on a digits CNN they took all of them).")
    if opts.examples is not None or opts.split_new:
        hl = head_layer(graph, group)
    if opts.examples is not None and opts.calib is not None:
        return _extend_gated(graph, opts, head, group, groups, gathers, unrolled, unmerged, hl, n, new_labels)
    if opts.examples is not None:
        rows, new_biases, imprint_stats = imprint(graph, hl, opts.examples, opts.examples_key, head.size, n,
                                                  opts.imprint_bias)
        imprinted[hl.kernel] = rows
        if hl.bias is not None and new_biases is not None:
            imprinted[hl.bias] = new_biases

    def counted(count):
        def f(member, old):
            init.count = count
            if member.name in imprinted and count == n:
                return imprinted[member.name].reshape((n,) + old.shape[1:])
            return init(member, old)
        return f

    apply_grows(graph, [(grp, count, counted(count)) for _, grp, count in groups], allow_picks=True)
    cloned = grow_unrolled_classes(graph, unrolled, n) if unrolled is not None else []
    grown_weights = []
    for _, grp, _ in groups:
        for m in grp.members:
            if m.kind == "weight" and m.role != "sink":
                graph.weights[m.name].trainable = True
                grown_weights.append(m.name)
    split = _split_new_rows(graph, hl, n) if opts.split_new else []
    if unmerged or cloned:
        graph.remove_dead_nodes()
    if head.labels is not None or opts.labels:
        old = head.labels or [f"class_{i}" for i in range(head.size)]
        graph.assets[head.labels_asset or "labels.txt"] = ("\n".join(old + new_labels) + "\n").encode("utf-8")
    postprocess = []
    if gathers:
        postprocess.append(f"heads gathered by class id grown at {', '.join(gathers)}")
    if unmerged:
        postprocess.append(f"row merges around {', '.join(unmerged)} undone")
    if unrolled is not None:
        postprocess.append(f"unrolled per class ({unrolled.dim} chunks into {', '.join(unrolled.joins)}): "
                           f"{n} chunk(s) cloned from class {unrolled.template}'s ({len(cloned)} nodes)")
    return PassResult(changed=True, stats={
        "output": head.output, "classes_before": head.size, "classes_after": head.size + n,
        "new_labels": new_labels, "init": opts.init, "grown_outputs": [g[0] for g in groups if g[0]],
        "prior_bias": prior_bias, "softmax_gap": softmax_gap, "scores_tensor": str(head.tensor),
        "postprocess": "; ".join(postprocess) or None,
        "regression_weights": sorted(regression), "imprint": imprint_stats, "split_new": split,
        "grown_weights": sorted(set(grown_weights))})


def _extend_gated(graph, opts: ExtendOptions, head, group, groups, gathers, unrolled, unmerged, hl, n: int,
                  new_labels: list) -> PassResult:
    """``examples=`` with ``calib=``: the new classes' logits come from the discriminant branch of
    :func:`graphslim.analysis.imprint.emit_gated`, joined to the untouched old logits after the head."""
    others = [m.name for m in group.members_of("weight") if m.name not in (hl.kernel, hl.bias)]
    if len(groups) > 1 or gathers or unrolled is not None or unmerged or others:
        what = (others and f"weights {', '.join(others[:3])} read the class axis") or \
            "per-class outputs or post-processing follow the class axis"
        raise PassError(f"extend: calib= imprinting joins the new classes' logits to the old ones right after the "
                        f"head {hl.node}, which needs nothing between the head and the outputs but per-element ops; "
                        f"here {what}. Leave out calib= to imprint the head's rows by Qi's rule.")
    node = graph.node(hl.node)
    bias_node, _ = graph.bias_after(node)
    logits = (bias_node or node).output(0)
    gi, stats = gated_imprint(graph, hl, str(logits), opts.examples, opts.examples_key, head.size, n, opts.calib,
                              opts.calib_samples)
    uses = [(c, port) for c, port in graph.consumers(logits)]
    outputs = [o.name for o in graph.outputs if o.tensor == logits]
    base = hl.kernel[:-len("/kernel")] if hl.kernel.endswith("/kernel") else hl.kernel
    joined = emit_gated(graph, gi, base)
    for c, port in uses:
        graph.set_input(c, port, joined)
    for name in outputs:
        graph.set_output(name, joined)
    new_weights = [w for w in graph.weights if w.startswith(f"{base}_imprinted")]
    if opts.split_new:
        for name, w in graph.weights.items():
            w.trainable = name in new_weights
    graph.infer_shapes()
    if head.labels is not None or opts.labels:
        old = head.labels or [f"class_{i}" for i in range(head.size)]
        graph.assets[head.labels_asset or "labels.txt"] = ("\n".join(old + new_labels) + "\n").encode("utf-8")
    return PassResult(changed=True, stats={
        "output": head.output, "classes_before": head.size, "classes_after": head.size + n,
        "new_labels": new_labels, "init": "imprinted", "grown_outputs": [head.output],
        "scores_tensor": str(head.tensor), "imprint": stats,
        "split_new": [(hl.kernel, w) for w in new_weights] if opts.split_new else [],
        "grown_weights": sorted(new_weights)})
