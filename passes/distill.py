"""``distill``: train the model's weights to mimic the original on calibration data (no training pipeline).

Run it after the passes that changed the model (``prune``, ``separable``, ``lowrank``, ``subset``,
``extend``...): the original is the pipeline's input (or ``teacher=PATH``, a SavedModel). It matches the
outputs (KL on softmax logits, cross-entropy on sigmoid logits, scaled squared error otherwise) and, with
``features=N`` (default 8), up to N tensors both models share on every input-to-output path; with
``labels=KEY`` (integer classes in the calibration file) it adds the task loss. Adam, warm-up and cosine
decay; a held-out split picks the best weights, so the result is never worse than the start on it;
Ctrl-C ends training early with the best weights so far. See :mod:`graphslim.analysis.distill`.

Example: ``--passes "fold-batchnorm,prune{macs=0.5 criterion=thinet reconstruct=true calib=c.npz},distill{calib=c.npz steps=400}"``
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphslim.analysis.calibration import load_calibration
from graphslim.analysis.distill import DistillConfig, distill, load_labels
from graphslim.errors import GraphslimError
from graphslim.ir.graph import Graph
from graphslim.pipeline import PassResult, pipeline_input, register_pass


@dataclass(frozen=True)
class DistillOptions:
    """Options of ``distill`` (see the module docstring)."""

    calib: str | None = field(default=None, metadata={
        "help": "calibration inputs (.npz or dir of .npy keyed by input name); required"})
    labels: str | None = field(default=None, metadata={
        "help": "key of integer class labels in the calibration file: adds the task loss"})
    teacher: str | None = field(default=None, metadata={
        "help": "the original model (SavedModel dir); default: the pipeline's input"})
    steps: int = field(default=300, metadata={"help": "training steps at most"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (Adam; warm-up, cosine decay)"})
    batch: int = field(default=32, metadata={"help": "examples per step"})
    holdout: float = field(default=0.2, metadata={"help": "fraction of the examples held out to pick the best weights"})
    eval_every: int = field(default=0, metadata={"help": "steps between held-out evaluations (0: steps/20)"})
    patience: int = field(default=5, metadata={"help": "evaluations without improvement before stopping"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the output matching"})
    features: int = field(default=8, metadata={"help": "intermediate tensors matched at most (0: outputs only)"})
    feature_weight: float = field(default=1.0, metadata={"help": "weight of the feature terms (together)"})
    label_weight: float = field(default=1.0, metadata={"help": "weight of the labels term"})
    calib_samples: int = field(default=4096, metadata={"help": "calibration examples used at most"})
    blockwise: bool = field(default=False, metadata={
        "help": "train part by part from input to output, each part against the original's features at its "
                "end (the shared tensors of features=), the last against the outputs"})
    seed: int = field(default=0, metadata={"help": "seed of the split and the batch order"})
    allow_ops: tuple[str, ...] = field(default=(), metadata={
        "help": "ops the safety check accepts before the models run"})

    def __post_init__(self):
        for name in ("steps", "batch", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError("lr and temperature must be positive")
        if self.features < 0 or self.eval_every < 0:
            raise ValueError("features and eval_every must be at least 0")


@register_pass("distill", options=DistillOptions)
def distill_pass(graph: Graph, opts: DistillOptions) -> PassResult:
    """Train the weights to mimic the original model on calibration data (output and feature matching,
    optional labels); the best held-out weights are kept."""
    from graphslim.pipeline.progress import progress

    if opts.calib is None:
        raise GraphslimError("distill needs calibration inputs: distill{calib=data.npz} (a .npz keyed by "
                             "input name, or a directory of .npy files)")
    if opts.teacher is not None:
        import graphslim

        teacher = graphslim.load(opts.teacher)
    else:
        teacher = pipeline_input()
        if teacher is None:
            raise GraphslimError("distill outside a pipeline needs teacher=PATH (the original SavedModel)")
    data = load_calibration(opts.calib, graph, max_examples=opts.calib_samples)
    labels = None
    if opts.labels is not None:
        count = len(next(iter(data.values())))
        out = graph.outputs[0]
        shape = graph.shape(out.tensor)
        classes = shape[-1] if shape and shape[-1] else None
        labels = load_labels(opts.calib, opts.labels, count, classes, out.name)
    cfg = DistillConfig(steps=opts.steps, lr=opts.lr, batch=opts.batch, holdout=opts.holdout,
                        eval_every=opts.eval_every, patience=opts.patience, temperature=opts.temperature,
                        features=opts.features, feature_weight=opts.feature_weight,
                        label_weight=opts.label_weight, seed=opts.seed, blockwise=opts.blockwise,
                        allow_ops=opts.allow_ops)
    stats = distill(graph, teacher, data, labels, cfg, progress)
    warnings = []
    if stats["interrupted"]:
        warnings.append(f"interrupted at step {stats['steps']}: kept the weights of step {stats['best_step']}")
    if not stats["improved"] and not stats["interrupted"]:
        warnings.append((stats["stopped"] if stats["stopped"].startswith("the parts together") else
                         "training never improved the held-out loss: the weights are unchanged")
                        + " (try a smaller lr=, more calibration data or more steps=)")
    if opts.blockwise and not stats["blockwise"]:
        warnings.append("blockwise=true found no feature point to train part by part against (no tensor on "
                        "every path to the outputs that the original holds with the same shape, or with its "
                        "pruned channels recorded in this pipeline): the whole model was trained at once")
    return PassResult(changed=stats["improved"], stats=stats, warnings=warnings)
