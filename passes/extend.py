"""``extend``: add classes to a trained head, keeping the old ones exactly.

``extend{classes=2}`` or ``extend{labels=zebra,okapi}`` grows the channel group of the class axis by
the new classes (and per-class outputs such as ``[N, K, 4]`` boxes along with it): the producing
kernels and biases get new columns (``init=zeros|normal|mean``, seeded), layers that read the class
axis get zero rows so nothing downstream changes for the old classes. Old logits are identical; the
new weights are trainable so the head can be fine-tuned. The labels asset grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphslim.analysis.channels import apply_grow
from graphslim.analysis.heads import class_group, find_class_head, output_tensor, per_class_outputs
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
    per_class: tuple[str, ...] = field(default=("auto",), metadata={
        "help": "outputs with one slice per class, OUTPUT:AXIS; 'auto' finds them by size, 'none' disables"})
    prior: str = field(default="auto", metadata={
        "help": "new classes' bias on sigmoid (focal-loss) heads: 'auto' (when a Sigmoid scores the classes or "
                "the biases sit below -2, as a focal prior leaves them: -log((1-p)/p) with p the existing "
                "classes' mean probability), 'none', or a probability p"})


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
        try:
            p = float(prior)
        except ValueError:
            raise PassError(f"extend: prior must be 'auto', 'none' or a probability, got {prior!r}.") from None
        if not 0 < p < 1:
            raise PassError(f"extend: prior must be a probability between 0 and 1, got {p}.")
    else:
        sigmoid = any(graph.producer(m.tensor).op == "Sigmoid" for m in group.members_of("tensor")
                      if graph.has_node(m.tensor.node))
        if not sigmoid and values.mean() >= -2.0:
            return None
        p = float(np.mean(1.0 / (1.0 + np.exp(-values))))
    return float(-np.log((1.0 - p) / p))


def _initializer(opts: ExtendOptions, rng: np.random.RandomState, biases=(), prior_bias=None):
    def init(member, old: np.ndarray) -> np.ndarray:
        n = init.count
        shape = (n,) + old.shape[1:]
        if member.role == "sink":  # readers of the class axis must not see the new classes yet
            return np.zeros(shape, old.dtype)
        if prior_bias is not None and member.name in biases:  # sigmoid head: start at the prior
            return np.full(shape, prior_bias, old.dtype)
        if opts.init == "zeros":
            return np.zeros(shape, old.dtype)
        mean = old.mean(axis=0, keepdims=True)
        if opts.init == "mean" or member.role != "source":  # biases, scales: the average class
            return np.repeat(mean, n, axis=0).astype(old.dtype)
        std = float(old.std()) or 1e-2
        return rng.normal(0.0, std, size=shape).astype(old.dtype)

    init.count = 0
    return init


@register_pass("extend", options=ExtendOptions)
def extend(graph, opts: ExtendOptions) -> PassResult:
    """Add classes to a classifier or detector head; old logits stay identical, new ones are trainable.

    Example: ``--passes "extend{labels=zebra,okapi init=mean}"``
    """
    if bool(opts.classes) == bool(opts.labels):
        raise PassError("extend: give the new classes either as classes=N or as labels=NAMES (exactly one).")
    if opts.classes < 0:
        raise PassError(f"extend: classes must be positive, got {opts.classes}.")
    n = opts.classes or len(opts.labels)
    head = find_class_head(graph, opts.output, opts.background, opts.labels_file, "extend")
    if head.labels is not None:
        clash = sorted(set(opts.labels) & set(head.labels))
        if clash:
            raise PassError(f"extend: classes {clash} already exist in output {head.output!r}.")
    new_labels = list(opts.labels) or [f"class_{head.size + i}" for i in range(n)]
    rng = np.random.RandomState(opts.seed)
    group = class_group(graph, head.tensor, head.axis, f"output {head.output!r}", "extend")
    groups = [(head.output, group, n)]
    for pc in per_class_outputs(graph, head, opts.per_class, "extend"):
        if group.covers(output_tensor(graph, pc.output), pc.axis):
            continue
        g2 = class_group(graph, output_tensor(graph, pc.output), pc.axis, f"output {pc.output!r}", "extend")
        groups.append((pc.output, g2, n * pc.width))
    grown_weights = []
    biases = _bias_names(graph, group)
    prior_bias = _prior_bias(graph, group, biases, opts.prior)
    init = _initializer(opts, rng, biases, prior_bias)
    for _, grp, count in groups:
        init.count = count
        apply_grow(graph, grp, count, init)
        for m in grp.members:
            if m.kind == "weight" and m.role != "sink":
                graph.weights[m.name].trainable = True
                grown_weights.append(m.name)
    if head.labels is not None or opts.labels:
        old = head.labels or [f"class_{i}" for i in range(head.size)]
        graph.assets[head.labels_asset or "labels.txt"] = ("\n".join(old + new_labels) + "\n").encode("utf-8")
    return PassResult(changed=True, stats={
        "output": head.output, "classes_before": head.size, "classes_after": head.size + n,
        "new_labels": new_labels, "init": opts.init, "grown_outputs": [g[0] for g in groups],
        "prior_bias": prior_bias,
        "grown_weights": sorted(set(grown_weights))})
