"""Distillation: train the current graph's weights to mimic the original model on calibration data.

After ``prune``, ``separable``, ``lowrank`` and the like, the closed-form refits leave an error that
compounds layer after layer. :func:`distill` trains the graph's trainable weights (the *student*)
against the model it came from (the *teacher*, normally the pipeline's input,
:func:`graphslim.pipeline.pipeline_input`) on the user's unlabeled calibration inputs:

* **outputs**: every signature output the teacher has with the same shape. A Softmax output is matched
  by KL divergence on its logits (temperature ``T``, scaled by T²), a Sigmoid output by binary
  cross-entropy on its logits (less its minimum, so a perfect match is 0), anything else by squared error
  divided by the teacher's variance;
* **features**: tensors on every path from the input to the outputs (the post-dominators of the input:
  the residual stream between blocks, a chain's layers) that both graphs hold under the same name with
  the same shape, up to ``features`` of them spread evenly, squared error over the teacher's variance;
* **labels** (optional, the calibration file's ``labels=`` key): cross-entropy of the softmax output's
  logits against the integer classes.

A held-out part of the data (``holdout``) is evaluated before training and every ``eval_every`` steps;
the weights of the best held-out loss are kept, so the result is never worse than the start on that
split, and training stops after ``patience`` evaluations without improvement. Adam with a linear warm-up
and a cosine decay. Memory stays bounded: the teacher runs batch by batch next to the student (only the
held-out targets are kept). Ctrl-C ends training early with the best weights so far (the run goes on; a
second Ctrl-C aborts it).

Everything runs in the contained child (:mod:`graphslim.sandbox`) after the safety scan: the teacher as
the graph engine, the student as the ``trainer`` engine (:mod:`graphslim._trainer`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from graphslim.analysis.calibration import CalibrationError, load_class_ids, output_logits, through_identity
from graphslim.errors import GraphslimError
from graphslim.ir.graph import Graph

__all__ = ["DistillConfig", "Term", "distill", "feature_points", "load_labels", "output_terms"]

#: ops whose output is never a feature worth matching (plumbing, constants, the inputs themselves)
_NOT_FEATURES = {"Identity", "IdentityN", "Placeholder", "Const", "Shape", "Reshape", "Squeeze",
                 "ExpandDims", "StopGradient", "NoOp"}


@dataclass
class Term:
    """One loss term: ``tensor`` of the student against ``reference`` (a teacher tensor, or ``None``
    for labels)."""

    key: str
    kind: str  # kl, bce, l2, label
    tensor: str
    reference: str | None
    weight: float = 1.0
    scale: float = 1.0
    temperature: float = 1.0
    output: str | None = None  # the signature output it stands for (outputs and labels)
    select: tuple | None = None  # (axis, positions): the reference's channels the tensor still holds

    def spec(self) -> dict:
        return {"key": self.key, "kind": self.kind, "tensor": self.tensor, "weight": self.weight,
                "scale": self.scale, "temperature": self.temperature}


@dataclass
class DistillConfig:
    steps: int = 300
    lr: float = 1e-3
    batch: int = 32
    holdout: float = 0.2
    eval_every: int = 0
    patience: int = 5
    temperature: float = 1.0
    features: int = 8
    feature_weight: float = 1.0
    label_weight: float = 1.0
    seed: int = 0
    blockwise: bool = False
    allow_ops: tuple = field(default_factory=tuple)


def kept_selection(student: Graph, teacher: Graph, tensor: str):
    """How ``tensor`` of the student compares with the teacher's: ``None`` when the shapes are the same,
    ``(axis, positions)`` when they differ on one axis whose kept channels a keep list recorded
    (:data:`graphslim.analysis.channel_apply.KEPT_META`), ``False`` otherwise."""
    from graphslim.analysis.channel_apply import KEPT_META

    a, b = student.shape(tensor), teacher.shape(tensor)
    if _same_shape(a, b):
        return None
    if a is None or b is None or len(a) != len(b) or any(x is None for x in a[1:]):
        return False
    differ = [i for i in range(1, len(a)) if a[i] != b[i]]
    kept = student.meta.get(KEPT_META, {}).get(tensor, {})
    if len(differ) != 1 or differ[0] not in kept:
        return False
    axis, pos = differ[0], kept[differ[0]]
    if len(pos) != a[axis] or (b[axis] is not None and max(pos) >= b[axis]):
        return False
    return axis, list(pos)


def _same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        x == y for x, y in zip(a[1:], b[1:])) and all(x is not None for x in a[1:])


def output_terms(student: Graph, teacher: Graph, temperature: float = 1.0) -> tuple[list[Term], list[str]]:
    """Terms for the signature outputs both models have with the same shape, and the names skipped."""
    theirs = {a.name: a.tensor for a in teacher.outputs}
    terms, skipped = [], []
    for arg in student.outputs:
        ref = theirs.get(arg.name)
        if ref is None or not _same_shape(student.shape(arg.tensor), teacher.shape(ref)):
            skipped.append(arg.name)
            continue
        kind, tensor = output_logits(student, str(arg.tensor))
        terms.append(Term(f"output:{arg.name}", kind, tensor, str(ref), temperature=temperature, output=arg.name))
        if kind in ("kl", "bce"):  # and the logits themselves (KL's gradient vanishes on confident outputs)
            theirs_kind, their_logits = output_logits(teacher, str(ref))
            if theirs_kind == kind and _same_shape(student.shape(tensor), teacher.shape(their_logits)):
                terms.append(Term(f"logits:{arg.name}", "l2", tensor, their_logits, output=arg.name))
    return terms, skipped


def _head_nodes(student: Graph, terms: list) -> set:
    """The nodes computing the logits the output terms already match (and a BiasAdd's MatMul/Conv)."""
    out = set()
    for t in terms:
        node = student.producer(t.tensor)
        out.add(node.name)
        if node.op in ("BiasAdd", "Add", "AddV2"):
            out.update(student.producer(i).name for i in student.inputs_of(node))
    return out


def feature_points(student: Graph, teacher: Graph, limit: int, exclude=(), pruned: bool = False) -> list[str]:
    """Up to ``limit`` tensors on every path from the first input to the outputs (post-dominators), held
    by both graphs under one name with one shape (with ``pruned``, also those whose pruned channels
    were recorded: :func:`kept_selection`), evenly spread; outputs, their logits and the nodes in
    ``exclude`` left out."""
    if limit <= 0 or not student.inputs:
        return []
    chain = student.post_dominators(str(student.inputs[0].tensor).split(":")[0])
    excluded = {through_identity(student, str(a.tensor)).split(":")[0] for a in student.outputs} | set(exclude)
    points = []
    for name in chain:
        n = student.node(name)
        if n.op in _NOT_FEATURES or name in excluded or not teacher.has_node(name):
            continue
        if teacher.node(name).op != n.op:
            continue
        tensor = f"{name}:0"
        dtype = student.dtype(tensor)
        if dtype is None or not getattr(dtype, "is_floating", False):
            continue
        shape = student.shape(tensor)
        if shape is None or len(shape) < 2:
            continue
        sel = kept_selection(student, teacher, tensor)
        if sel is False or (sel is not None and not pruned):
            continue
        points.append(tensor)
    if len(points) > limit:
        picks = np.linspace(0, len(points) - 1, limit).round().astype(int)
        points = [points[i] for i in sorted(set(picks.tolist()))]
    return points


def load_labels(path, key: str, count: int, classes: int | None, output: str) -> np.ndarray:
    """The integer labels under ``key`` in the calibration file (``.npz``, or ``KEY.npy`` in a
    directory): one per example, in ``[0, classes)``. CalibrationError names the key and what it needs."""
    need = f"integer class indices of shape [{count}] (one per calibration example)" + (
        f" in 0..{classes - 1} (output {output!r} has {classes} classes)" if classes else "")
    what = f"labels={key!r} (in {path})"
    y = load_class_ids(path, key, count, need, what)
    if classes and (y.min() < 0 or y.max() >= classes):
        raise CalibrationError(f"{what}: {key!r} holds classes {int(y.min())}..{int(y.max())}; it needs {need}")
    return y


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _take(data: dict, idx) -> dict:
    return {k: v[idx] for k, v in data.items()}


class _Session:
    """What the phases of one distill run share: data, split, the teacher's runner, the child."""

    def __init__(self, student, teacher, data, labels, cfg, progress):
        from graphslim.io.scan import check_safe
        from graphslim.runtime import Runner
        from graphslim.sandbox import shared_child

        self.student, self.data, self.labels, self.cfg, self.progress = student, data, labels, cfg, progress
        n = len(next(iter(data.values())))
        held = int(round(n * cfg.holdout))
        if n < 2 or held < 1 or n - held < 1:
            raise CalibrationError(f"distill needs calibration examples to train on and to hold out "
                                   f"(holdout={cfg.holdout}): {n} example(s) give {n - held} and {held}; "
                                   "give more examples or change holdout=")
        self.rng = np.random.default_rng(cfg.seed)
        perm = self.rng.permutation(n)
        self.train_idx, self.held_idx = np.sort(perm[held:]), np.sort(perm[:held])
        check_safe(student, allow_ops=tuple(cfg.allow_ops) + tuple(student.meta.get("allowed_ops", ())))
        self.runner = Runner(teacher, allow_ops=tuple(cfg.allow_ops) + tuple(teacher.meta.get("allowed_ops", ())),
                             label="the original model (distill's teacher)")
        self.child = shared_child("the model being distilled")
        self.last = None

    def targets(self, terms: list, idx) -> dict:
        refs = list(dict.fromkeys(t.reference for t in terms if t.reference is not None))
        got = self.runner.run(_take(self.data, idx), fetch=refs) if refs else {}
        out = {t.key: got[t.reference] if t.select is None else np.take(got[t.reference], t.select[1], axis=t.select[0])
               for t in terms if t.reference is not None}
        if any(t.kind == "label" for t in terms):
            out["labels"] = self.labels[idx]
        return out

    def close(self) -> None:
        try:
            self.runner.close()
        except GraphslimError:
            pass

    def phase(self, terms: list, trainable: list, steps: int, name: str) -> dict:
        """Train ``trainable`` on ``terms`` for up to ``steps`` steps; the best held-out weights go into
        the student. KeyboardInterrupt propagates after the best weights are in place."""
        cfg, child, student = self.cfg, self.child, self.student
        first = self.targets(terms, self.train_idx[:max(cfg.batch, 64)])
        for t in terms:  # l2 terms weigh alike whatever the scale of their tensor
            if t.kind == "l2":
                t.scale = float(np.var(first[t.key])) + 1e-12
        handle = child.load_trainer(student, trainable, [t.spec() for t in terms])
        held = self.held_idx
        batches = [(_take(self.data, held[i:i + cfg.batch]), self.targets(terms, held[i:i + cfg.batch]))
                   for i in range(0, len(held), cfg.batch)]
        main = next((t for t in terms if t.kind == "kl"), None)
        lab = next((t for t in terms if t.kind == "label"), None)

        def evaluate() -> dict:
            loss = agree = correct = 0.0
            for inputs, targ in batches:
                m = len(next(iter(inputs.values())))
                r, outs = child.evaluate(handle, inputs, targ)
                loss += r["loss"] * m
                if main is not None and main.output in outs:
                    agree += float((outs[main.output].argmax(-1) == targ[main.key].argmax(-1)).sum())
                if lab is not None and lab.output in outs:
                    correct += float((outs[lab.output].argmax(-1) == targ["labels"]).sum())
            res = {"loss": loss / len(held)}
            if main is not None:
                res["agreement"] = agree / len(held)
            if lab is not None:
                res["accuracy"] = correct / len(held)
            return res

        start = evaluate()
        best = (start, 0, None)
        curve = [{"step": 0, "heldout_loss": start["loss"]}]
        every = cfg.eval_every or max(1, steps // 20)
        stopped, done, bad, running = "steps", 0, 0, []
        order, pos = self.rng.permutation(self.train_idx), 0
        try:
            for step in range(steps):
                if pos + cfg.batch > len(order):
                    order, pos = self.rng.permutation(self.train_idx), 0
                idx = np.sort(order[pos:pos + cfg.batch])
                pos += cfg.batch
                r = child.train_step(handle, _take(self.data, idx), self.targets(terms, idx),
                                     _lr_at(step, steps, cfg.lr))
                running.append(r["loss"])
                done = step + 1
                self.progress(f"distill{name}: step {done}/{steps}, loss {np.mean(running[-every:]):.4g}")
                if done % every == 0 or done == steps:
                    h = evaluate()
                    curve.append({"step": done, "train_loss": float(np.mean(running[-every:])),
                                  "heldout_loss": h["loss"]})
                    if h["loss"] < best[0]["loss"] * (1 - 1e-6):
                        best, bad = (h, done, child.trained_weights(handle)), 0
                    else:
                        bad += 1
                        if bad >= cfg.patience and done >= steps // 2:
                            stopped = f"no held-out improvement in {cfg.patience} evaluations"
                            break
        finally:
            if best[2] is not None:
                for wname, value in best[2].items():
                    student.set_weight(wname, np.asarray(value, dtype=student.weights[wname].value.dtype))
            try:
                child.release(handle)
            except GraphslimError:
                pass
            self.last = {"steps": done, "best_step": best[1], "stopped": stopped, "curve": curve,
                         "heldout": {"before": start, "after": best[0]}, "trainable_weights": len(trainable),
                         "terms": [{"key": t.key, "kind": t.kind, "tensor": t.tensor, "weight": t.weight}
                                   for t in terms]}
        return self.last


def _parts(student: Graph, boundaries: list, trainable: list) -> list[list]:
    """The trainable weights between consecutive boundaries (the last part: up to the outputs)."""
    weights, seen, parts = set(trainable), set(), []
    for b in boundaries + [None]:
        names = [str(a.tensor).split(":")[0] for a in student.outputs] if b is None else [b.split(":")[0]]
        up = student.ancestors(names) & weights
        parts.append(sorted(up - seen))
        seen |= up
    return parts


def _feature_terms(student: Graph, teacher: Graph, feats: list, cfg) -> list:
    return [Term(f"feature:{t}", "l2", t, t, cfg.feature_weight / max(1, len(feats)),
                 select=kept_selection(student, teacher, t)) for t in feats]


def distill(student: Graph, teacher: Graph, data: dict, labels: np.ndarray | None, cfg: DistillConfig,
            progress: Callable[[str], None] = lambda _: None) -> dict:
    """Train ``student``'s trainable weights in place (see the module docstring); returns the stats."""
    from graphslim import signals

    t_start = time.perf_counter()
    terms, skipped = output_terms(student, teacher, cfg.temperature)
    if labels is not None:
        main = next((t for t in terms if t.kind == "kl"), None)
        target = main.output if main is not None else None
        if target is None:
            soft = [a.name for a in student.outputs if output_logits(student, str(a.tensor))[0] == "kl"]
            target = soft[0] if soft else None
        if target is None:
            raise CalibrationError("labels= needs a softmax output to train against; the model's outputs "
                                   f"are {', '.join(a.name for a in student.outputs)}")
        tensor = next(a.tensor for a in student.outputs if a.name == target)
        terms.append(Term("labels", "label", output_logits(student, str(tensor))[1], None, cfg.label_weight, output=target))
    if not terms:
        raise GraphslimError(
            f"distill has nothing to match: no output of the model has the original's shape (skipped "
            f"{', '.join(skipped)}: subset or extend changed them?) and no labels= were given; pass "
            "labels=KEY with integer classes in the calibration file")
    trainable = [name for name, w in student.weights.items() if w.trainable and w.value.dtype.kind == "f"]
    if not trainable:
        raise GraphslimError("distill found no trainable float weights in the model (all were loaded as "
                             "non-trainable); nothing to train")
    # Joint training matches the original's features where the shapes agree; part by part it also
    # matches the kept channels of pruned tensors (measured on the digits fixtures at 0.3 and 0.5 of
    # the MACs, kept-channel targets lowered the joint run's accuracy and raised the blockwise run's).
    feats = feature_points(student, teacher, cfg.features, _head_nodes(student, terms), pruned=cfg.blockwise)
    session = _Session(student, teacher, data, labels, cfg, progress)
    phases, interrupted, start, reverted = [], False, None, False
    initial = {name: student.weights[name].value for name in trainable}
    try:
        if cfg.blockwise and feats:
            start = session.phase(terms, trainable, 0, " (start)")["heldout"]["before"]
            # Half the steps part by part, each part against the original's features where it ends;
            # then the other half on the whole model against the outputs (and the features), as in the
            # joint run, from where the parts left it.
            parts = _parts(student, feats, trainable)
            plan = [([Term(f"feature:{b}", "l2", b, b, select=kept_selection(student, teacher, b))], w,
                      f" part {i + 1}/{len(parts)}")
                    for i, (b, w) in enumerate(zip(feats, parts))]
            plan = [p for p in plan if p[1]]
            for p_terms, p_weights, name in plan:
                phases.append(session.phase(p_terms, p_weights, max(1, cfg.steps // 2 // max(1, len(plan))), name))
            phases.append(session.phase(terms + _feature_terms(student, teacher, feats, cfg), trainable,
                                        max(1, cfg.steps - cfg.steps // 2), " (whole model)"))
        else:
            phases.append(session.phase(terms + _feature_terms(student, teacher, feats, cfg), trainable, cfg.steps, ""))
        if start is not None:  # each part kept its own best; the whole must not end worse than it began
            end = session.phase(terms, trainable, 0, " (end)")["heldout"]["before"]
            phases.append({**phases[-1], "heldout": {"before": phases[-1]["heldout"]["before"], "after": end}})
            if end["loss"] > start["loss"]:
                for name, value in initial.items():
                    student.set_weight(name, value)
                reverted = True
    except KeyboardInterrupt:
        interrupted = True
        if session.last is not None and (not phases or phases[-1] is not session.last):
            phases.append(session.last)
        signals.forget()  # handled here: the run goes on with the best weights so far
    finally:
        session.close()
    if not phases:  # interrupted before the first evaluation: nothing was trained
        phases.append({"steps": 0, "best_step": 0, "stopped": "interrupted", "curve": [],
                       "heldout": {"before": None, "after": None}, "trainable_weights": len(trainable),
                       "terms": []})
    last = phases[-1]
    stats = {
        "steps": sum(p["steps"] for p in phases), "best_step": last["best_step"],
        "improved": any(p["best_step"] > 0 for p in phases) and not reverted,
        "stopped": "interrupted (Ctrl-C): the best weights so far were kept" if interrupted else (
            "the parts together ended worse on the held-out outputs than the start: the starting weights "
            "were kept" if reverted else last["stopped"]),
        "interrupted": interrupted, "blockwise": bool(cfg.blockwise and feats),
        "train_examples": int(len(session.train_idx)), "heldout_examples": int(len(session.held_idx)),
        "terms": last["terms"], "skipped_outputs": skipped, "trainable_weights": len(trainable),
        "heldout": {"before": start or phases[0]["heldout"]["before"],
                    "after": start if reverted else last["heldout"]["after"]},
        "curve": last["curve"], "seconds": time.perf_counter() - t_start,
    }
    if len(phases) > 1:
        stats["phases"] = [{k: p[k] for k in ("steps", "best_step", "stopped", "heldout", "trainable_weights", "terms")}
                           for p in phases]
    return stats
