"""``prune``: remove the least important channels of every prunable channel group; shapes shrink.

Each channel group (:mod:`graphslim.analysis.channels`) shrinks as one: the Add-coupled convs of a
residual stage keep the same channels, a Concat maps offsets, a depthwise conv follows its input, a conv
before Flatten→Dense removes the matching Dense rows. Only groups that touch no signature input or output
and have no blocker are pruned; the others are listed in the stats with the reason. Variables keep their
names (``conv1/kernel`` stays ``conv1/kernel``, now with fewer filters) and stay trainable.

Targets (one of ``ratio=``, ``macs=``, ``latency=``, ``threshold=``, and/or ``layer=``):

* ``ratio=0.3``: remove 30% of the channels of every prunable group;
* ``macs=0.5``: keep 50% of the model's MACs; removal is distributed over the groups (``allocation=global``:
  greedily remove the channel blocks with the least importance per MAC saved, importance normalized per
  group so that removing a whole group costs 1; ``allocation=uniform``: one ratio for all groups, solved to
  hit the target; ``allocation=sensitivity``, with calibration data: each group is pruned alone to a few
  keep fractions (and reconstructed with ``reconstruct=true``), the change of the model's outputs on
  calibration data is measured (KL divergence for a Softmax output, relative L2 otherwise), and the same
  greedy runs on those measured costs). The achieved
  fraction is in the stats;
* ``latency=0.5 runtime=tf|xla|litert``: keep 50% of the model's latency measured on that runtime at batch 1
  (``threads=``, default all cores). Each conv or matmul with its per-channel element-wise ops is timed alone
  at a grid of widths in the contained child process (cached on disk per machine, runtime and threads:
  :mod:`graphslim.analysis.latency`), the same allocations as ``macs=`` run against that latency model, then
  the pruned model is timed side by side with the original and the modelled target corrected until the
  measured ratio meets the target (rounds, predicted and measured ratios in the stats) or a warning says by
  how much it falls short. The MACs-ordered allocation is timed beside it and kept when it meets the target
  losing less importance (or meets it when the latency one did not); layers whose tables are timing noise
  are held flat, and when nothing measures faster than the original beyond the noise nothing is pruned;
* ``threshold=0``: remove the channels whose score is at most this (``threshold=0`` with ``l1``: exactly
  the all-zero filters);
* ``layer=conv1:20`` (keep 20 channels) or ``layer="conv1:keep=0,3,5"`` (keep these): a layer is a node name
  as ``graphslim inspect`` prints it, a kernel weight name (``conv2d/kernel``), or a Keras layer name; its
  group is the one of the kernel's output channels. With other targets, the named groups are fixed and
  the rest follow the target; alone, only the named groups change.

Transformers: each attention layer's heads are one group (a head's query, key and value slices and the
output projection's rows go together), its head size two (query/key, value/output), each block's
feed-forward width one. The hidden size (the residual stream: every layer norm over it, the embedding
tables, the classifier's input) is one group too, pruned only with ``hidden=true`` (or when ``layer=``
names it): a group is taken for the hidden size when a layer norm normalizes over it and an embedding table
(a weight gathered along its first axis) produces it (:func:`~graphslim.analysis.channels.hidden_size`).

``exclude=`` (same names; glob patterns allowed) leaves groups alone; ``min_channels=`` and ``round_to=``
(keep counts multiples of N, e.g. 8 for fast kernels) bound the keep counts.

Criteria (:mod:`graphslim.analysis.importance`, user-extensible): ``l1``, ``l2``, ``bn``, and with
calibration data (``calib=data.npz`` or a directory of ``<input>.npy``) ``activation``, ``apoz``,
``thinet``, ``lsq``, ``fisher`` (the squared gradient of the model's loss on its own predictions with respect
to a mask on each channel: Kwon et al. 2022, for heads and feed-forward widths as for filters). With calibration data the stats give, per pruned layer, the relative output error against the
original model; ``reconstruct=true`` refits those layers' weights (and bias) by least squares, layer by
layer from input to output on the pruned model's own inputs, a classifier head read by a Softmax on the KL
divergence to the original's probabilities, and output positions no output depends on are left out
(:mod:`graphslim.analysis.reconstruct`). ``refit=downstream`` refits every refittable layer after them too:
the better model when nothing follows (the digits ViT at half the MACs: 94.3% against 92.1%; resnet_digits
94.3 against 93.9), but a worse start for ``distill`` (resnet_digits after distill: 95.8 against 96.2),
hence ``refit=sinks`` (the readers of pruned channels only) is the default. ``residual_targets=true`` fits
a layer adding into a residual stream to the original's sum there (measured no better).

Stages: resolve targets (the options → candidate groups, explicit keeps, exclusions) → score (the
criterion) → allocate (keep counts, hence the kept channels) → :class:`~graphslim.analysis.prune_plan.PrunePlan`
→ apply (slice every group) → reconstruct (with calibration data: measure or refit the readers). The plan
is data: it is ``stats["plan"]`` in the report, ``save_plan=plan.json`` writes it (atomically; never over
an input), and ``plan=plan.json`` (that file, or a ``--report`` holding one prune plan) replaces the
first three stages: the recorded channels are kept on another checkpoint of the same architecture (after
more training, say), bit for bit the same prune on the same model; a plan whose layers, channel counts,
shapes or ops differ from the model's is refused with the group and layer named.

Example: ``--passes "prune{macs=0.5 criterion=thinet calib=calib.npz reconstruct=true},dce"``
"""

from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np

from graphslim.analysis.allocation import (MacModel, allowed_counts, global_allocation, group_costs, snap,
                                          uniform_allocation)
from graphslim.analysis.channels import ChannelGroup, channel_groups, hidden_size
from graphslim.analysis.prune_plan import PrunePlan, check_plan_path, group_channels
from graphslim.errors import PassError
from graphslim.ir import ops
from graphslim.ir.graph import Tensor
from graphslim.pipeline import PassResult, register_pass


#: options that choose which channels go: meaningless with plan= (ratio/macs/threshold/layer/exclude too)
_CHOOSERS = ("criterion", "allocation", "min_channels", "round_to", "sensitivity_levels", "sensitivity_samples")


@dataclass(frozen=True)
class PruneOptions:
    """Options of ``prune`` (see the module docstring): a target, names, bounds, criterion, calibration."""

    ratio: float | None = field(default=None, metadata={
        "help": "fraction of the channels removed from every prunable group (0..1)"})
    macs: float | None = field(default=None, metadata={
        "help": "fraction of the model's MACs to keep (0..1]; removal distributed over groups by importance"})
    latency: float | None = field(default=None, metadata={
        "help": "fraction of the model's measured latency to keep (0..1] on runtime=, batch 1: removal "
                "allocated against per-layer latency tables measured on this machine, then the pruned "
                "model is timed and the allocation corrected until it meets the target"})
    runtime: str = field(default="tf", metadata={
        "help": "with latency=: the runtime measured: tf (graph executor), xla, litert"})
    threads: int = field(default=0, metadata={"help": "with latency=: threads of the runtime (0: all cores)"})
    threshold: float | None = field(default=None, metadata={
        "help": "remove the channels whose criterion score is at most this (0 with l1: all-zero filters)"})
    layer: tuple[str, ...] = field(default=(), metadata={
        "help": "explicit keeps: NAME:COUNT or \"NAME:keep=I,J,...\" (node, kernel or Keras layer name)"})
    exclude: tuple[str, ...] = field(default=(), metadata={
        "help": "layers whose groups are not pruned (node, kernel or Keras layer names; glob patterns)"})
    hidden: bool = field(default=False, metadata={
        "help": "prune the residual stream / hidden size too (a transformer's group with layer norms and "
                "embedding tables; left alone unless true or named by layer=)"})
    min_channels: int = field(default=1, metadata={"help": "keep at least this many channels per group"})
    round_to: int = field(default=1, metadata={
        "help": "keep counts are multiples of this (groups smaller than it stay whole)"})
    criterion: str = field(default="l1", metadata={
        "help": "importance criterion: l1, l2, bn; with calib: activation, apoz, thinet, lsq, fisher; or a registered one"})
    allocation: Literal["global", "uniform", "sensitivity"] = field(default="global", metadata={
        "help": "with macs= or latency=: global (least importance per MAC or second first), uniform (one ratio, "
                "solved), or "
                "sensitivity (measured model-output error per MAC; needs calib)"})
    sensitivity_levels: int = field(default=8, metadata={
        "help": "allocation=sensitivity: keep fractions tried per group (1/N ... (N-1)/N)"})
    sensitivity_samples: int = field(default=128, metadata={
        "help": "allocation=sensitivity: calibration examples used to measure the output error"})
    calib: str | None = field(default=None, metadata={
        "help": "calibration inputs (.npz or dir of .npy keyed by input name): data criteria, errors, reconstruct"})
    calib_samples: int = field(default=512, metadata={"help": "calibration examples used at most"})
    calib_batch: int = field(default=32, metadata={"help": "calibration batch size"})
    calib_positions: int = field(default=64, metadata={
        "help": "spatial positions sampled per example and layer for calibration statistics"})
    reconstruct: bool = field(default=False, metadata={
        "help": "refit the layers reading pruned channels by least squares on the calibration data"})
    refit: Literal["downstream", "sinks"] = field(default="sinks", metadata={
        "help": "with reconstruct=true: refit the layers reading pruned channels only (sinks), or every "
                "refittable layer after them too (downstream: the next blocks, the classifier head; best "
                "when no distill follows)"})
    residual_targets: bool = field(default=False, metadata={
        "help": "with reconstruct=true: fit a layer that adds into a residual stream to the original's sum there "
                "minus the pruned skip (Kwon et al. 2022) instead of to its own original output"})
    ridge: float = field(default=1e-3, metadata={"help": "relative ridge of the reconstruction"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration sampling"})
    allow_ops: tuple[str, ...] = field(default=(), metadata={
        "help": "ops the safety check accepts before calibration runs the model"})
    plan: str | None = field(default=None, metadata={
        "help": "apply the kept channels recorded in this plan file (save_plan= or a --report) instead of "
                "scoring; refused when the model's layers differ"})
    save_plan: str | None = field(default=None, metadata={
        "help": "write this prune's plan (kept channels per group) to this JSON file, to replay it with plan="})

    def __post_init__(self):
        if self.plan is not None:
            chooser = [f"{k}=" for k in ("ratio", "macs", "latency", "threshold") if getattr(self, k) is not None]
            chooser += [f"{k}=" for k in ("layer", "exclude") if getattr(self, k)]
            chooser += [f"{f.name}=" for f in fields(self)
                        if f.name in _CHOOSERS and getattr(self, f.name) != f.default]
            if chooser:
                raise ValueError("plan= applies the channels recorded in the plan; drop " + ", ".join(chooser)
                                 + " (they choose channels; calib=, reconstruct= and ridge= still apply)")
        given = [k for k in ("ratio", "macs", "latency", "threshold") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError("give at most one of ratio=, macs=, latency=, threshold= (got "
                             + " and ".join(f"{k}=" for k in given) + ")")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.macs is not None and not 0 < self.macs <= 1:
            raise ValueError(f"macs must be in (0, 1], got {self.macs}")
        if self.latency is not None and not 0 < self.latency <= 1:
            raise ValueError(f"latency must be in (0, 1], got {self.latency}")
        from graphslim.analysis.latency import RUNTIMES

        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        for k in ("min_channels", "round_to", "calib_samples", "calib_batch", "calib_positions",
                  "sensitivity_levels", "sensitivity_samples"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.reconstruct and not self.calib:
            raise ValueError("reconstruct=true needs calibration data: add calib=data.npz")
        if self.allocation == "sensitivity" and not self.calib:
            raise ValueError("allocation=sensitivity measures the model's output error: add calib=data.npz")


# ----------------------------------------------------------------------------------------- layer names
def _kernel_nodes(graph) -> list:
    """(node, kernel weight, output axis) for every kernel op (:func:`graphslim.ir.ops.kernel_ops`)
    whose kernel is a weight."""
    out = []
    for node in graph.nodes(op=ops.kernel_ops()):
        w = graph.weight_of(node, ops.facts(node.op).kernel_port)
        if w is not None:
            out.append((node, w, ops.kernel_axes(node, w.value.ndim)[1]))
    return out


class _Names:
    """Resolves layer names to (weight or tensor, axis) keys and to groups."""

    def __init__(self, graph, groups):
        self.graph, self.groups = graph, groups
        self.kernels = _kernel_nodes(graph)
        self.by_weight = {}
        for node, w, axis in self.kernels:
            self.by_weight.setdefault(w.name, (node, w, axis))

    def _labels(self):
        """Names a user may write for each kernel: Keras layer, kernel weight, node."""
        for node, w, axis in self.kernels:
            keras = w.name.rsplit("/", 1)[0] if "/" in w.name else w.name
            yield (keras, w.name, node.name), (Tensor(w.name, 0), axis)

    def keys(self, text: str) -> list:
        """(tensor, axis) keys named by ``text`` (several for a glob pattern); [] when none."""
        g = self.graph
        if any(ch in text for ch in "*?["):
            found = {}
            for names, key in self._labels():
                if any(fnmatch.fnmatchcase(n, text) for n in names):
                    found[key] = None
            return list(found)
        if text in self.by_weight:
            _, w, axis = self.by_weight[text]
            return [(Tensor(w.name, 0), axis)]
        if text in g.weights:
            v = g.weights[text].value
            return [(Tensor(text, 0), 0)] if v.ndim == 1 else []
        if g.has_node(text):
            node = g.node(text)
            entry = ops.facts(node.op)
            w = g.weight_of(node, entry.kernel_port) if entry and entry.kernel_port is not None else None
            if w is not None:
                return [(Tensor(w.name, 0), ops.kernel_axes(node, w.value.ndim)[1])]
            shape = node.shapes[0] if node.shapes else None
            if not shape:
                return []
            fmt = node.attr("data_format", "NHWC") or "NHWC"
            return [(node.output(0), 1 if str(fmt).startswith("NC") and len(shape) > 2 else len(shape) - 1)]
        for suffix in ("kernel", "depthwise_kernel", "weights", "W"):
            if f"{text}/{suffix}" in self.by_weight:
                return self.keys(f"{text}/{suffix}")
        scoped = {(Tensor(w.name, 0), axis) for node, w, axis in self.kernels
                  if text in node.name.split("/")[:-1]}
        if len(scoped) == 1:
            return list(scoped)
        if len(scoped) > 1:
            raise PassError(f"prune: layer name {text!r} is ambiguous: it is a scope of the ops reading "
                            + ", ".join(sorted(k[0].node for k in scoped)) + "; name the kernel instead")
        return []

    def group_of(self, key) -> ChannelGroup | None:
        t, axis = key
        for grp in self.groups:
            if grp.covers(t, axis):
                return grp
        return None

    def unknown(self, text: str, what: str) -> PassError:
        import difflib

        names = sorted({n for names, _ in self._labels() for n in names[:2]})
        close = difflib.get_close_matches(text, names, n=5, cutoff=0.5)
        hint = f" Similar: {', '.join(close)}." if close else \
            " Run 'graphslim inspect MODEL' to see node names; kernels are named like 'conv2d/kernel'."
        return PassError(f"prune: {what} {text!r} names no layer, node or kernel weight of the model.{hint}")


_LAYER_RE = re.compile(r"^(?P<name>.+?):(?:keep=(?P<keep>[\d,\s]*)|(?P<count>\d+))$")


def _parse_layers(entries) -> list:
    """``NAME:COUNT`` / ``NAME:keep=I,J`` → [(text, name, count or None, keep list or None)]. Bare
    integers following a ``keep=`` entry (a list split on commas) belong to it."""
    merged: list[str] = []
    for e in entries:
        e = e.strip()
        if e.isdigit() and merged and ":keep=" in merged[-1]:
            merged[-1] += "," + e
        else:
            merged.append(e)
    out = []
    for e in merged:
        m = _LAYER_RE.match(e)
        if not m:
            raise PassError(f"prune: layer entry {e!r} is not NAME:COUNT or NAME:keep=I,J,... (quote it in a "
                            f"pipeline: layer=\"conv1:keep=0,3,5\")")
        if m.group("count") is not None:
            out.append((e, m.group("name"), int(m.group("count")), None))
        else:
            keep = [int(x) for x in re.split(r"[,\s]+", m.group("keep").strip()) if x]
            if not keep:
                raise PassError(f"prune: layer entry {e!r} keeps no channel")
            out.append((e, m.group("name"), None, keep))
    return out


def _member_channels(group: ChannelGroup, key, positions: list, text: str) -> list:
    """Positions along a layer's axis → group channels (each position must belong to one channel)."""
    t, axis = key
    m = next((m for m in group.members if m.tensor is not None and m.tensor == t and m.axis == axis), None)
    if m is None:
        raise PassError(f"prune: {text}: the layer's axis is not in its channel group")
    try:
        return group_channels(m, group.size, positions)
    except ValueError as exc:
        raise PassError(f"prune: {text}: {exc}") from None


def _output_measures(graph) -> list:
    """What the sensitivity measures per floating-point signature output: ``(tensor, "kl")`` for a
    Softmax output (mean KL divergence from the original's probabilities: insensitive to logit shifts
    that change no prediction), else ``(tensor, "l2")`` (squared relative L2 error)."""
    out = []
    for o in graph.outputs:
        if not graph.dtype(o.tensor).is_floating:
            continue
        kind = "kl" if graph.producer(o.tensor).op == "Softmax" else "l2"
        out.append((str(o.tensor), kind))
    return out


def _output_error(ref: dict, got: dict, measures: list) -> float:
    total = 0.0
    for t, kind in measures:
        a, b = ref[t].astype(np.float64), got[t].astype(np.float64)
        if kind == "kl":
            a, b = np.clip(a, 1e-12, 1.0), np.clip(b, 1e-12, 1.0)
            total += float((a * (np.log(a) - np.log(b))).sum(axis=-1).mean())
        else:
            total += float(np.square(b - a).sum()) / (float(np.square(a).sum()) or 1.0)
    return total


def _sensitivity_costs(graph, free: list, orders: dict, counts: dict, data: dict, opts) -> tuple[dict, list]:
    """Per group, the error of the model's outputs (:func:`_output_error`) when only that group is pruned
    to a few keep counts (reconstructed when ``opts.reconstruct``), interpolated to every removal count."""
    from graphslim.analysis.channels import apply_keeps
    from graphslim.analysis.reconstruct import fit_layers, kept_positions, sink_layers
    from graphslim.runtime import Runner

    n = min(opts.sensitivity_samples, len(next(iter(data.values()))))
    sub = {k: v[:n] for k, v in data.items()}
    measures = _output_measures(graph)
    fetch = [t for t, _ in measures]
    if not fetch:
        raise PassError("prune: allocation=sensitivity needs a floating-point signature output to measure")
    ref_runner = Runner(graph)
    try:
        ref = ref_runner.run(sub, fetch=fetch)
    finally:
        ref_runner.close()
    costs, rows = {}, []
    levels = opts.sensitivity_levels
    for g in free:
        allowed = counts[g.id]
        grid = sorted({snap(allowed, g.size * i / levels) for i in range(1, levels)} - {g.size}, reverse=True)
        measured = {0: 0.0}
        for k in grid:
            keep = np.sort(orders[g.id][g.size - k:]).tolist()
            h = graph.copy()
            apply_keeps(h, [(g, keep)])
            if opts.reconstruct:
                fit_layers(h, graph, sink_layers(graph, [(g, keep)]), sub, kept_positions([(g, keep)]), refit=True,
                           ridge=opts.ridge, positions=opts.calib_positions, batch_size=opts.calib_batch,
                           seed=opts.seed, live_rows=False)  # no gradient pass per group and level
            r = Runner(h)
            try:
                got = r.run(sub, fetch=fetch)
            finally:
                r.close()
            measured[g.size - k] = _output_error(ref, got, measures)
        xs = np.array(sorted(measured))
        ys = np.maximum.accumulate(np.array([measured[x] for x in xs]))
        # beyond the last measured level: extrapolate linearly to removing everything
        full = np.arange(g.size + 1)
        c = np.interp(full, xs, ys)
        if xs[-1] < g.size and len(xs) > 1:
            slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1)
            c[full > xs[-1]] = ys[-1] + slope * (full[full > xs[-1]] - xs[-1])
        costs[g.id] = c
        rows.append({"group": g.name, "keep": [g.size - int(x) for x in xs], "output_error": [float(y) for y in ys]})
    return costs, rows


# ----------------------------------------------------------------------------------------- stats
def _layer_rows(before_graph, after_graph, fits: dict) -> list:
    cb, ca = before_graph.cost().by_node(), after_graph.cost().by_node()
    rows = []
    for node, w, out_axis in _kernel_nodes(before_graph):
        if not after_graph.has_node(node.name):
            continue
        w_after = after_graph.weight_of(after_graph.node(node.name), 1)
        if w_after is None or w_after.value.shape == w.value.shape:
            continue
        shape_b, shape_a = w.value.shape, w_after.value.shape
        in_axis = ops.kernel_axes(node, len(shape_b))[0]
        row = {"layer": node.name, "op": node.op, "kernel": w.name,
               "in_channels": [int(shape_b[in_axis]), int(shape_a[in_axis])],
               "out_channels": [int(shape_b[out_axis] * (shape_b[3] if node.op == "DepthwiseConv2dNative" else 1)),
                                int(shape_a[out_axis] * (shape_a[3] if node.op == "DepthwiseConv2dNative" else 1))],
               "params": [int(cb[node.name].params) if node.name in cb else 0,
                          int(ca[node.name].params) if node.name in ca else 0],
               "macs": [int(cb[node.name].macs) if node.name in cb else 0,
                        int(ca[node.name].macs) if node.name in ca else 0]}
        f = fits.get(node.name)
        if f is not None:
            row["error_before"] = f.error_before
            row["error_after"] = f.error_after
            if f.note:
                row["note"] = f.note
        rows.append(row)
    seen = {r["layer"] for r in rows}
    for name, f in fits.items():  # sinks reading a reshaped kernel (Keras's attention output)
        if name in seen or not after_graph.has_node(name):
            continue
        row = {"layer": name, "op": after_graph.node(name).op, "kernel": f.kernel,
               "params": [int(cb[name].params) if name in cb else 0, int(ca[name].params) if name in ca else 0],
               "macs": [int(cb[name].macs) if name in cb else 0, int(ca[name].macs) if name in ca else 0],
               "error_before": f.error_before, "error_after": f.error_after}
        if f.note:
            row["note"] = f.note
        rows.append(row)
    return rows


def _check_safe(graph, allow_ops) -> None:
    try:
        from graphslim.io.scan import check_safe
    except ImportError:  # the safety scan is optional in older checkouts
        return
    check_safe(graph, allow_ops=allow_ops)


# ----------------------------------------------------------------------------------------- stages
@dataclass
class _Targets:
    """What the options name: the groups that may change (``candidates``, in group order), the explicit
    keeps (``explicit``: gid → (text, count or None, group channels kept or None)) and the exclusions
    (``excluded``: gid → the entries that excluded it)."""

    candidates: list
    explicit: dict
    excluded: dict


def _resolve_targets(graph, groups: list, opts: PruneOptions) -> _Targets:
    """Stage 1: options → the groups that may change, the explicit keeps, the exclusions."""
    names = _Names(graph, groups)
    excluded: dict[int, list] = {}
    for text in opts.exclude:
        keys = names.keys(text)
        if not keys:
            raise names.unknown(text, "exclude entry")
        for key in keys:
            grp = names.group_of(key)
            if grp is not None:
                excluded.setdefault(grp.id, []).append(text)

    explicit: dict[int, tuple] = {}
    for text, name, count, keep in _parse_layers(opts.layer):
        keys = names.keys(name)
        if not keys:
            raise names.unknown(name, "layer")
        for key in keys:
            grp = names.group_of(key)
            if grp is None:
                raise PassError(f"prune: layer {name!r} ({key[0]} axis {key[1]}) belongs to no channel group")
            if not grp.prunable:
                raise PassError(f"prune: layer {name!r} cannot be pruned: its channel group {grp.name} "
                                f"(sources {', '.join(m.name for m in grp.sources) or '-'}) is not prunable: "
                                f"{grp.why_not()}")
            if grp.id in excluded:
                raise PassError(f"prune: layer {name!r} is both given explicitly and excluded "
                                f"(by {', '.join(excluded[grp.id])})")
            chans = _member_channels(grp, key, keep, text) if keep is not None else None
            if count is not None and not 1 <= count <= grp.size:
                raise PassError(f"prune: {text}: keep count {count} is outside 1..{grp.size} (the layer's "
                                f"channel group has {grp.size} channels)")
            entry = (text, count, chans)
            if grp.id in explicit and explicit[grp.id][1:] != entry[1:]:
                raise PassError(f"prune: {text} and {explicit[grp.id][0]} name the same channel group "
                                f"{grp.name} with different keeps")
            explicit[grp.id] = entry

    if not opts.hidden:  # a transformer's hidden size is opt-in
        for g in groups:
            if g.prunable and g.id not in explicit and g.id not in excluded and hidden_size(graph, g):
                excluded[g.id] = ["hidden=false"]

    has_target = any(getattr(opts, k) is not None for k in ("ratio", "macs", "latency", "threshold"))
    candidates = [g for g in groups if g.prunable and g.id not in excluded and (has_target or g.id in explicit)]
    return _Targets(candidates, explicit, excluded)


def _load_data(graph, opts: PruneOptions, seconds: dict) -> dict | None:
    """Calibration inputs (after the safety scan), or None without ``calib=``."""
    if not opts.calib:
        return None
    t = time.perf_counter()
    from graphslim.analysis.calibration import load_calibration

    _check_safe(graph, opts.allow_ops)
    data = load_calibration(opts.calib, graph, max_examples=opts.calib_samples)
    seconds["calibration_load"] = time.perf_counter() - t
    return data


def _score(graph, targets: _Targets, crit, data, opts: PruneOptions) -> tuple[dict, list]:
    """Stage 2: the criterion's scores of every candidate group without an explicit keep list."""
    from graphslim.analysis.importance import score_groups

    explicit = targets.explicit
    to_score = [g for g in targets.candidates if not (g.id in explicit and explicit[g.id][2] is not None)]
    if not to_score:
        return {}, []
    scores, notes = score_groups(graph, to_score, crit, data=data if crit.needs_data else None, seed=opts.seed,
                                 positions=opts.calib_positions, batch_size=opts.calib_batch)
    return scores, list(notes)


def _allocate(graph, targets: _Targets, scores: dict, crit, data, opts: PruneOptions,
              seconds: dict) -> tuple[list, dict]:
    """Stage 3: how many channels each group loses (ratio, threshold, macs with an allocation, explicit
    counts and keep lists), and so which it keeps. Returns the ``(group, sorted keep)`` changes of the
    groups that lose channels, in group order, and the target's stats."""
    candidates, explicit = targets.candidates, targets.explicit
    orders, counts, removed_n = {}, {}, {}
    for g in candidates:
        if g.id in explicit and explicit[g.id][2] is not None:
            kept = explicit[g.id][2]
            gone = [c for c in range(g.size) if c not in set(kept)]
            orders[g.id] = np.array(gone + list(kept), dtype=np.int64)
            removed_n[g.id] = len(gone)
            continue
        orders[g.id] = np.argsort(scores[g.id], kind="stable")
        counts[g.id] = allowed_counts(g.size, opts.min_channels, opts.round_to)
        if g.id in explicit:
            removed_n[g.id] = g.size - explicit[g.id][1]
    free = [g for g in candidates if g.id not in explicit]
    target_stats: dict = {}
    if opts.ratio is not None:
        for g in free:
            removed_n[g.id] = g.size - snap(counts[g.id], g.size - round(opts.ratio * g.size))
        target_stats["ratio"] = opts.ratio
    elif opts.threshold is not None:
        for g in free:
            above = int((scores[g.id] > opts.threshold).sum())
            ok = [k for k in counts[g.id] if k >= above]
            removed_n[g.id] = g.size - (min(ok) if ok else g.size)
        target_stats["threshold"] = opts.threshold
    elif opts.macs is not None or opts.latency is not None:
        fixed = {gid: removed_n[gid] for gid in removed_n}
        costs = None
        if opts.allocation == "sensitivity":
            t_s = time.perf_counter()
            costs, sens_rows = _sensitivity_costs(graph, free, orders, counts, data, opts)
            target_stats["sensitivity"] = sens_rows
            seconds["sensitivity"] = time.perf_counter() - t_s
        elif opts.allocation == "global":
            costs = {g.id: group_costs(scores[g.id], orders[g.id], crit.cumulative) for g in free}
        if opts.latency is not None:
            from graphslim.analysis.latency import allocate_latency

            _check_safe(graph, opts.allow_ops)  # the model runs to be timed
            t_l = time.perf_counter()
            removal, latency_stats = allocate_latency(graph, candidates, free, orders, counts, costs, fixed, opts)
            seconds["latency"] = time.perf_counter() - t_l
            target_stats.update(latency_stats)
        else:
            model = MacModel(graph, candidates, orders)
            target = opts.macs * model.total0
            if opts.allocation == "uniform":
                removal = uniform_allocation(model, free, fixed, counts, target)
            else:
                removal = global_allocation(model, free, fixed, counts, costs, target)
            target_stats.update({"macs": opts.macs, "allocation": opts.allocation})
        removed_n.update(removal)
    changes = []
    for g in candidates:
        r = removed_n.get(g.id, 0)
        if r > 0:
            changes.append((g, np.sort(orders[g.id][r:]).tolist()))
    return changes, target_stats


def _apply(graph, changes: list, data, opts: PruneOptions, seconds: dict) -> tuple[dict, list]:
    """Stages 5 and 6: slice every changed group, then (with calibration data) measure or refit the
    layers reading pruned channels. Returns the fits by layer and the per-layer stats rows."""
    if not changes:
        return {}, []
    from graphslim.analysis.channels import apply_keeps

    original = graph.copy() if data is not None else None
    t = time.perf_counter()
    if data is not None:
        from graphslim.analysis.reconstruct import kept_positions, sink_layers

        kept = kept_positions(changes)
        layers = sink_layers(graph, changes)
    before_graph = original if original is not None else graph.copy()
    apply_keeps(graph, changes)
    seconds["apply"] = time.perf_counter() - t
    fits = {}
    if data is not None:
        from graphslim.analysis.reconstruct import fit_layers

        t = time.perf_counter()
        if opts.reconstruct and opts.refit == "downstream":
            from graphslim.analysis.reconstruct import downstream_layers

            layers = layers + downstream_layers(graph, layers)
        fits = fit_layers(graph, original, layers, data, kept, refit=opts.reconstruct, ridge=opts.ridge,
                          positions=opts.calib_positions, batch_size=opts.calib_batch, seed=opts.seed,
                          residual=opts.residual_targets)
        seconds["reconstruct" if opts.reconstruct else "errors"] = time.perf_counter() - t
    return fits, _layer_rows(before_graph, graph, fits)


def _plan_options(opts: PruneOptions) -> dict:
    """The options that chose the channels, as recorded in the plan (those not at their default)."""
    out = {}
    for f in fields(opts):
        v = getattr(opts, f.name)
        if f.name in ("plan", "save_plan", "allow_ops") or v == f.default:
            continue
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _plan_inputs(graph, opts: PruneOptions) -> list:
    """What ``save_plan=`` must not overwrite: the model, the plan read, the calibration data."""
    return [graph.meta.get("source"), opts.plan, opts.calib]


# ----------------------------------------------------------------------------------------- the pass
@register_pass("prune", options=PruneOptions)
def prune(graph, opts: PruneOptions) -> PassResult:
    """Remove the least important channels of every prunable channel group (shapes shrink, names stay).

    Stages: resolve targets → score → allocate → :class:`~graphslim.analysis.prune_plan.PrunePlan` →
    apply → reconstruct; ``plan=`` replaces the first three by a recorded plan.

    Example: ``--passes "prune{ratio=0.3 criterion=l1 round_to=8},dce"``
    """
    from graphslim.analysis.importance import get_criterion

    if opts.plan is None and opts.ratio is None and opts.macs is None and opts.latency is None \
            and opts.threshold is None and not opts.layer:
        raise PassError("prune: give a target: ratio= (fraction of channels removed per group), macs= (fraction "
                        "of MACs kept), latency= (fraction of measured latency kept), threshold= (score), "
                        "layer=NAME:COUNT, or plan=plan.json (a recorded prune); e.g. prune{ratio=0.3}")
    if opts.save_plan:
        check_plan_path(opts.save_plan, _plan_inputs(graph, opts))
    seconds = {}
    t0 = time.perf_counter()
    crit = None
    if opts.plan is None:
        crit = get_criterion(opts.criterion)
        if crit.needs_data and not opts.calib:
            raise PassError(f"prune: criterion {crit.name!r} needs calibration data: add calib=data.npz (a .npz or "
                            f"a directory of .npy arrays keyed by signature input name)")
    groups = channel_groups(graph)
    not_prunable = [{"group": g.name, "sources": [m.name for m in g.sources], "channels": g.size,
                     "reason": g.why_not()} for g in groups if not g.prunable]
    notes: list = []
    if opts.plan is not None:  # resolve, score, allocate: replaced by the recorded plan
        recorded = PrunePlan.load(opts.plan)
        changes = recorded.resolve(graph, groups, where=opts.plan)  # refuses a plan that does not fit
        targets = _Targets([g for g, _ in changes], {}, {})
        seconds["analysis"] = time.perf_counter() - t0
        data = _load_data(graph, opts, seconds)
        criterion, plan_options = recorded.criterion, recorded.options
        target_stats = {"plan": opts.plan, "fingerprint": recorded.fingerprint}
    else:
        targets = _resolve_targets(graph, groups, opts)
        seconds["analysis"] = time.perf_counter() - t0
        data = _load_data(graph, opts, seconds)
        t = time.perf_counter()
        scores, notes = _score(graph, targets, crit, data, opts)
        seconds["scoring"] = time.perf_counter() - t
        t = time.perf_counter()
        allocated, target_stats = _allocate(graph, targets, scores, crit, data, opts, seconds)
        criterion, plan_options = crit.name, _plan_options(opts)
        # the plan is the hand-over: what is applied is what it says, exactly as a replay applies it
        changes = PrunePlan.from_changes(graph, allocated, criterion, plan_options).resolve(graph, groups,
                                                                                            where="just made")
        seconds["allocation"] = time.perf_counter() - t
    plan = PrunePlan.from_changes(graph, changes, criterion=criterion, options=plan_options)
    group_rows = [{"group": g.name, "sources": [m.name for m in g.sources], "channels": [g.size, len(keep)],
                   "removed": sorted(set(range(g.size)) - set(keep))} for g, keep in changes]

    before_cost = graph.cost() if changes else None
    fits, layer_rows = _apply(graph, changes, data, opts, seconds)
    after_cost = graph.cost()
    b_macs = before_cost.macs if before_cost else after_cost.macs
    b_params = before_cost.params if before_cost else after_cost.params
    if opts.macs is not None:
        target_stats["achieved"] = after_cost.macs / b_macs if b_macs else 1.0
        if target_stats["achieved"] > opts.macs + 0.02:
            target_stats["unreachable"] = (f"macs={opts.macs} is not reachable within min_channels="
                                         f"{opts.min_channels}, round_to={opts.round_to}, the excluded and the "
                                         f"not prunable groups: kept {target_stats['achieved']:.3f} of the MACs")
    stats = {
        "criterion": criterion,
        "target": target_stats or {"layers": [e[0] for e in targets.explicit.values()]},
        "macs": {"before": int(b_macs), "after": int(after_cost.macs),
                 "ratio": after_cost.macs / b_macs if b_macs else 1.0},
        "params": {"before": int(b_params), "after": int(after_cost.params),
                   "ratio": after_cost.params / b_params if b_params else 1.0},
        "pruned_groups": len(changes),
        "channels": {"before": int(sum(g.size for g, _ in changes)), "after": int(sum(len(k) for _, k in changes))},
        "groups": group_rows,
        "layers": layer_rows,
        "not_prunable": not_prunable,
        "excluded": [{"group": f"g{gid}", "by": by} for gid, by in targets.excluded.items()],
        "notes": list(dict.fromkeys(notes)),
        "calibrated": data is not None,
        "reconstructed": bool(opts.reconstruct and fits),
        "seconds": seconds,
        "plan": plan.to_json(),
    }
    if opts.save_plan:
        plan.save(opts.save_plan, _plan_inputs(graph, opts))
    warnings = _elementwise_bn_warning(graph, changes)
    if target_stats.get("unreachable"):
        warnings.append(target_stats["unreachable"] + " (a smaller round_to= or fewer exclusions get closer)")
    if target_stats.get("met") is False:
        from graphslim.analysis.latency import KNEE, NOISE

        outcome = (f"no pruned model measured faster than the original beyond the timing noise (the fastest "
                   f"{target_stats['fastest']:.3f} of its latency, noise {NOISE:.2f}), so nothing was pruned: the "
                   f"channels would cost importance for no speed"
                   if target_stats["unpruned"] else
                   f"the pruned model measured {target_stats['measured']:.3f} of the original's latency "
                   f"({target_stats['speedup']:.2f}x faster)")
        warnings.append(f"latency={opts.latency} not reached on {opts.runtime}: {outcome}, "
                        f"{target_stats['shortfall']:.3f} short, within min_channels={opts.min_channels}, "
                        f"round_to={opts.round_to}, the excluded and the not prunable groups"
                        + (f"; with every prunable group at its smallest width the latency tables predict "
                           f"{target_stats['floor']:.3f} (the rest is time pruning does not change: per-op "
                           f"overhead, unprunable layers), and graphslim stops {KNEE:.2f} above that, where the "
                           f"last saving would cost most of the importance"
                           if target_stats["floor"] + KNEE > opts.latency else "")
                        + (f"; {target_stats['tables']['flat_units']} of {target_stats['tables']['units']} layers' "
                           f"measured times on {opts.runtime} do not change with their widths beyond the timing "
                           f"noise, so pruning them buys no speed there"
                           if target_stats["tables"]["flat_units"] else ""))
    return PassResult(changed=bool(changes), stats=stats, warnings=warnings)


def _elementwise_bn_warning(graph, changes) -> list[str]:
    """Batch norms left as element-wise ops (as Keras 3 exports them) shrink only linearly with the
    channels: the pruned model gains less speed than MACs unless they are fused."""
    from graphslim.passes.fuse_batchnorm import elementwise_batchnorms

    bns = elementwise_batchnorms(graph) if changes else []
    if not bns:
        return []
    return [f"{len(bns)} batch norm(s) (e.g. {bns[0]!r}) are element-wise ops, as Keras exports them; "
            "their time shrinks only linearly with the channels, so the pruned model gains less speed than "
            "MACs. Put fuse-batchnorm (keeps them trainable) or fold-batchnorm in --passes (before prune, "
            "so that importance sees the fused convolutions) to fuse them into the convolutions "
            "(benchmarks/prune_resnet50.py measures the difference)"]
