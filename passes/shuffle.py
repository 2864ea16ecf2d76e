"""``shuffle``: replace a trained 1×1 convolution ``W [1, 1, C, N]`` by a grouped 1×1 convolution with g
groups between two channel permutations (ShuffleNet's grouped pointwise conv and channel shuffle, Zhang
et al. 2018), with the grouping chosen from the trained weights (and data), without retraining:

    y = P_out · blockdiag(W_1 .. W_g) · P_in · x,    W_b [C/g, N/g]

Each group b takes C/g input channels I_b and produces N/g output channels O_b; the weights outside the
blocks I_b × O_b are dropped, so the layer costs C·N/g MACs per output position instead of C·N. Any 1×1
Conv2D is a candidate, alone or as the pointwise half that ``separable`` leaves
(``separable{rank=1},shuffle{groups=4}``).

Grouping (``graphslim.analysis.shuffle.cocluster``): the input and output channels are co-clustered so
that the blocks keep the most energy Σ_b ‖W[I_b, O_b]‖² (balanced spectral co-clustering of ``|W|²``,
then exact-size swaps between groups, never worse than the plain contiguous grouping). A kernel that is
block-diagonal up to a permutation of its channels is found and reproduced exactly; g = 1 is the
original layer.

Data-aware (``calib=data.npz``): with the input second moments Σ on the calibration data (the
covariance when a BiasAdd follows: the bias absorbs the mean), the affinity is ``Σ_ii·W_ij²`` (output
energy), each block's weights are the least-squares fit of its outputs from its inputs
(``W[I, O] + Σ_II⁻¹ Σ_IĪ W[Ī, O]``: the dropped inputs' contribution predicted from the kept ones) and
the bias takes the mean of what was dropped. Layers are handled in topological order, Σ on the model as
already rewritten upstream; then every block (and the bias) is refit by least squares so that the layer
reproduces the *original* model's output on the calibration data (as ``lowrank`` refits its second
factor).

Options: ``groups=`` (required, ≥ 1); ``layers=`` / ``exclude=`` (node, kernel or Keras layer names, glob
patterns); ``min_macs_saving=`` (default 0: g = 1 is reported as not saving MACs; ``none`` applies it
anyway); ``calib=`` and ``calib_samples`` / ``calib_batch`` / ``calib_positions``; ``cost=latency`` with
``runtime=tf|xla|litert``, ``latency_runs``, ``min_time_saving`` (each layer's original and grouped forms
timed at batch 1; only layers that get faster are rewritten). ``rank=`` / ``energy=`` / ``max_error=`` /
``macs=`` do not apply (the number of groups is the one choice).

A layer whose channel counts g does not divide (or that has fewer channels than g) is skipped with the
reason, like K×K kernels (run ``separable`` first), grouped convs, shared kernels and non-float layers.
The stats list every Conv2D: ``groups``, ``energy_kept`` (fraction of ‖W‖² kept; with ``calib=`` of the
output energy), ``weight_error`` (‖W − Ŵ‖/‖W‖), ``input_shuffle`` / ``output_shuffle`` (``"none"``: the
grouping needs no permutation on that side; ``"folded"``: folded into the neighbours; ``"gather"``: a
GatherV2 is emitted, ``input_shuffle_reason`` / ``output_shuffle_reason`` say why), ``macs_before`` / ``macs_after``, with ``calib=`` ``output_error``
(‖ŷ − y‖/‖y‖ of the layer's output before bias, y from the original model) and
``output_error_before_refit``, with ``cost=latency`` ``ms_before`` / ``ms_after``.

Emitted structure, in ops that TensorFlow's CPU kernels (oneDNN on or off) and TFLite run (the form the
loader gives Keras's grouped ``Conv2D``): ``GatherV2`` of the input channels (omitted when the identity)
→ ``Split`` into g chunks → g ``Conv2D`` (``<layer>/group_<i>``, the original strides and padding) →
``ConcatV2`` → ``GatherV2`` of the output channels (omitted when the identity). The groups are ordered
(by their first input channel, or by their first output channel when that removes a permutation) and
sorted inside, so a grouping that needs no permutation emits none. The original node's name goes to the
node producing the layer's output, so its BiasAdd and consumers are untouched. Kernel
``<layer>/kernel`` becomes ``<layer>/grouped_kernel`` ``[1, 1, C/g, N]`` (Keras's layout for
``Conv2D(groups=g)``; a ``Split`` hands each group its ``[1, 1, C/g, N/g]``), trainable like the original;
other names get ``_grouped`` (``separable``'s ``<layer>/pointwise_kernel`` → ``<layer>/pointwise_kernel_grouped``).

Folding the permutations (``fold=true``, the default): instead of gathering the input channels at run
time, the channel group of the layer's input (:mod:`graphslim.analysis.channels`: the producer's
filters, its bias and batch norm, element-wise ops, the other readers of those channels) is reordered
so that it produces them in the gathered order: :func:`~graphslim.analysis.channels.apply_keep` with the
permutation as keep list (keep lists are applied in their order everywhere: subset uses the same).
Likewise the output permutation goes into the group of the layer's output: its bias and its consumers'
input channels (the grouped conv's ConcatV2 then feeds them directly). This is exact (the same sums,
in another order of terms: differences of float rounding, ~1e-7 relative). A side is folded only when
its whole group can be reordered: not when it reaches a signature input or output, an op without a
channel rule (e.g. the Split of a layer grouped before, a GatherV2), a renormalization or a pick among
channels, or when the input and output are one group (a residual around the layer); then the GatherV2
stays and the record says why. A later candidate whose kernel a fold reordered is read again, so its
own grouping is found on the reordered kernel (the co-clustering's starts follow channel order: it may
differ from the one ``fold=false`` finds); with ``calib=`` such a fold is not made (the later layer's
refit targets the original model's tensors, in the original channel order). ``cost=latency`` times the
gather form.

Example: ``--passes "separable{rank=1},shuffle{groups=4 calib=data.npz},dce"``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tensorflow as tf

from graphslim.analysis.calibration import ConvGeometry, PatchMoments, Regression
from graphslim.analysis.channels import ChannelError, apply_keep, group_for
from graphslim.analysis.factorize import (conv_candidate, FactorizeOptions, Method, derived_name, factorize_graph,
                                          relative_error, shift_bias)
from graphslim.analysis.shuffle import (block_fit, block_refit, cocluster, grouped_kernel, kept_fraction,
                                        layout, output_energy_kept)
from graphslim.pipeline import PassResult, register_pass

RIDGE = 1e-3  # relative ridge of the block refit, pulling towards the closed-form blocks
FULL_MOMENT_LIMIT = 2304  # most input channels whose C×C second moments (and refit normal equations) calibration accumulates


@dataclass(frozen=True)
class ShuffleOptions:
    """Options of ``shuffle`` (the applicable ones of
    :class:`graphslim.analysis.factorize.FactorizeOptions`, plus ``groups``)."""

    groups: int = field(metadata={"help": "number of groups g of the grouped 1×1 conv (>= 1; must divide the "
                                          "layer's input and output channels, else the layer is skipped)"})
    layers: tuple[str, ...] = field(default=(), metadata={
        "help": "only these layers (node, kernel or Keras layer names; glob patterns allowed)"})
    exclude: tuple[str, ...] = field(default=(), metadata={
        "help": "never these layers (same matching as layers)"})
    min_macs_saving: float | None = field(default=0.0, metadata={
        "help": "skip a layer unless it saves more than this fraction of its MACs (1 - 1/g); none: never skip"})
    calib: str | None = field(default=None, metadata={
        "help": "calibration inputs (.npz or dir of .npy keyed by input name): group and fit for output error"})
    calib_samples: int = field(default=512, metadata={"help": "calibration examples used at most"})
    calib_batch: int = field(default=32, metadata={"help": "calibration batch size"})
    calib_positions: int = field(default=64, metadata={
        "help": "spatial positions sampled per example and layer for calibration statistics"})
    cost: Literal["macs", "latency"] = field(default="macs", metadata={
        "help": "macs: decide by MACs; latency: also time each layer on runtime= (batch 1), apply only if faster"})
    runtime: Literal["tf", "xla", "litert"] = field(default="tf", metadata={
        "help": "with cost=latency: the runtime timed: tf (graph executor), xla, litert (TFLite on XNNPACK)"})
    latency_runs: int = field(default=7, metadata={"help": "timed runs per layer and form (median)"})
    min_time_saving: float = field(default=0.05, metadata={
        "help": "with cost=latency, apply only if the grouped layer is faster by more than this fraction"})
    fold: bool = field(default=True, metadata={
        "help": "fold the channel permutations into the neighbouring layers (reorder the producer's filters, "
                "the consumers' input channels) when exact; false: always emit GatherV2 ops"})

    def __post_init__(self):
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups} (e.g. shuffle{{groups=4}})")
        self.driver_options()  # the shared checks of the calibration and timing options

    def driver_options(self) -> FactorizeOptions:
        """The options of the shared driver: one "rank" per layer (its grouping), MACs checked here."""
        return FactorizeOptions(
            rank=1, layers=self.layers, exclude=self.exclude, min_macs_saving=None, calib=self.calib,
            calib_samples=self.calib_samples, calib_batch=self.calib_batch, calib_positions=self.calib_positions,
            cost=self.cost, runtime=self.runtime, latency_runs=self.latency_runs,
            min_time_saving=self.min_time_saving)


def _macs_reason(groups: int, min_saving: float | None) -> str | None:
    saving = 1.0 - 1.0 / groups
    if min_saving is None or saving > min_saving:
        return None
    if saving <= 0:
        return f"groups={groups} does not save MACs"
    return f"groups={groups} saves {saving:.1%} of MACs, not more than min_macs_saving={min_saving}"


def _pointwise_only(node, kshape) -> str | None:
    kh, kw = kshape[:2]
    if kh * kw != 1:
        return f"kernel {kh}×{kw} is spatial (shuffle takes 1×1 convs; run separable first for its pointwise half)"
    return None


class _Shuffle(Method):
    name = "shuffle"

    def __init__(self, opts: ShuffleOptions):
        self.opts = opts

    # ------------------------------------------------------------------ candidates
    def candidates(self, graph):
        g_ = self.opts.groups
        out = []
        self._cands = out  # the folds must not reorder a kernel a later candidate was read from
        for node in graph.nodes(op="Conv2D"):
            c = conv_candidate(graph, node, _pointwise_only)
            out.append(c)
            if c.skipped:
                continue
            kshape = tuple(c.record["kernel_shape"])
            kh, kw, cin, cout = kshape
            nchw, kernel = c.data["nchw"], c.kernel
            why = None
            for what, n in (("input", cin), ("output", cout)):
                if why is None and g_ > n:
                    why = f"groups={g_} exceeds the {n} {what} channels"
                elif why is None and n % g_:
                    why = f"groups={g_} does not divide the {n} {what} channels"
            if why is None:
                why = _macs_reason(g_, self.opts.min_macs_saving)
            if why is not None:
                c.skip(why)
                continue
            oshape = node.shapes[0] if node.shapes else None
            hw = None if oshape is None or len(oshape) != 4 else ((oshape[2], oshape[3]) if nchw else (oshape[1], oshape[2]))
            known = hw is not None and None not in hw
            bias_node, bias = graph.bias_after(node)
            c.data.update(w=np.asarray(kernel.value, np.float64).reshape(cin, cout), nchw=nchw,
                          positions=hw[0] * hw[1] if known else 1, positions_known=known,
                          geo=ConvGeometry.of(graph, node), bias_node=bias_node, bias=bias)
        return out

    # ------------------------------------------------------------------ math
    def statistics(self, graph, cand, opts):
        c = cand.data["w"].shape[0]
        if c > FULL_MOMENT_LIMIT:
            cand.record["calibration_note"] = (f"{c} input channels > {FULL_MOMENT_LIMIT}: grouped from the "
                                               "weights alone")
            return None
        return graph.input(cand.node, 0), PatchMoments(cand.data["geo"], positions=opts.calib_positions, full=True)

    def decompose(self, cand, opts, stats):
        w = cand.data["w"]
        sigma = mean = None
        if stats is not None and stats.count:
            sigma, mean = stats.second_moment, stats.mean
            if cand.data["bias"] is not None:  # the bias absorbs the mean: weight by the covariance
                sigma = sigma - np.outer(mean, mean)
            cand.record["calibrated"] = True
        affinity = np.square(w) if sigma is None else np.square(w) * np.maximum(np.diag(sigma), 0.0)[:, None]
        in_l, out_l, _ = cocluster(affinity, self.opts.groups)
        fit = block_fit(w, in_l, out_l, sigma)
        shift = None
        if sigma is not None and cand.data["bias"] is not None:
            shift = mean @ (w - fit)
        kept = kept_fraction(np.square(w), in_l, out_l) if sigma is None else output_energy_kept(w, fit, sigma)
        cand.data.update(labels=(in_l, out_l), fit=fit, bias_shift=shift)
        return np.array([0.0, kept])

    def macs(self, cand, rank):
        c, n = cand.data["w"].shape
        pos = cand.data["positions"]
        return pos * c * n, pos * c * n // self.opts.groups

    def factor(self, cand, rank):
        for k in ("rank", "full_rank"):  # the driver's rank is the one grouping
            cand.record.pop(k, None)
        in_l, out_l = cand.data["labels"]
        groups, gin, gout = layout(in_l, out_l)
        cand.data["layout"] = (groups, gin, gout)
        cand.record.update(groups=self.opts.groups, weight_error=relative_error(cand.data["w"], cand.data["fit"]),
                           input_shuffle="none" if gin is None else "gather",
                           output_shuffle="none" if gout is None else "gather",
                           new_weights=[derived_name(cand.kernel.name, "grouped")])

    def refinement(self, graph, cand, opts):
        w = cand.data["w"]
        if w.shape[0] > FULL_MOMENT_LIMIT:
            return None
        intercept = cand.data["bias"] is not None

        def features(rows):
            return np.concatenate([rows, np.ones((len(rows), 1))], 1) if intercept else rows

        return graph.input(cand.node, 0), Regression(features, lambda rows: rows @ w, cand.data["geo"],
                                                     positions=opts.calib_positions, seed=1)

    def refine(self, cand, acc):
        if acc is None:
            return
        in_l, out_l = cand.data["labels"]
        intercept = cand.data["bias"] is not None
        fit, shift, err0, err = block_refit(acc, cand.data["fit"], cand.data["bias_shift"], in_l, out_l,
                                            intercept, RIDGE)
        if err0 is None:
            return
        if self.opts.groups == 1:  # the original layer: keep it, report its measured error
            cand.record["output_error"] = err0
            return
        cand.data.update(fit=fit, bias_shift=shift)
        cand.record.update(output_error=err, output_error_before_refit=err0,
                           weight_error=relative_error(cand.data["w"], fit))

    # ------------------------------------------------------------------ emission
    def _emit(self, g, cand, x, name: str, folded=(False, False)):
        """Emit gather → split → g convs → concat → gather reading ``x``; the last node is ``name``. A side
        ``folded`` (input, output) has no gather: its neighbours were reordered instead."""
        node, kernel = cand.node, cand.kernel
        groups, gin, gout = cand.data["layout"]
        gin, gout = (None if folded[0] else gin), (None if folded[1] else gout)
        ng = len(groups)
        c, n = cand.data["w"].shape
        t = node.attr("T", tf.float32)
        cax = 1 if cand.data["nchw"] else 3
        i32 = tf.int32
        value = grouped_kernel(cand.data["fit"], groups).reshape(1, 1, c // ng, n).astype(kernel.value.dtype)
        k = g.add_weight(derived_name(kernel.name, "grouped"), value, trainable=kernel.trainable, unique=True)

        def gather(label, node_name, src, indices):
            idx = g.add_const(f"{name}/{label}_indices", np.asarray(indices, np.int32), unique=True)
            ax = g.add_const(f"{name}/{label}_axis", np.int32(cax), unique=True)
            return g.add_node(node_name, "GatherV2", [src, idx, ax],
                              attrs={"Tparams": t, "Tindices": i32, "Taxis": i32, "batch_dims": 0},
                              unique=node_name != name)

        if gin is not None:
            x = gather("input_shuffle", f"{name}/input_shuffle", x, gin).output(0)
        last = name if gout is None else f"{name}/groups_concat"
        attrs = dict(node.attrs)
        if ng == 1:
            y = g.add_node(last, "Conv2D", [x, k], attrs=attrs, unique=gout is not None)
        else:
            ax = g.add_const(f"{name}/group_axis", np.int32(cax), unique=True)
            wax = g.add_const(f"{name}/group_kernel_axis", np.int32(3), unique=True)
            xs = g.add_node(f"{name}/groups", "Split", [ax, x], attrs={"T": t, "num_split": ng}, unique=True)
            ws = g.add_node(f"{name}/group_kernels", "Split", [wax, k], attrs={"T": t, "num_split": ng}, unique=True)
            convs = [g.add_node(f"{name}/group_{i}", "Conv2D", [xs.output(i), ws.output(i)], attrs=attrs,
                                unique=True).output(0) for i in range(ng)]
            cat_ax = g.add_const(f"{name}/concat_axis", np.int32(cax), unique=True)
            y = g.add_node(last, "ConcatV2", convs + [cat_ax], attrs={"T": t, "N": ng, "Tidx": i32},
                           unique=gout is not None)
        if gout is not None:
            y = gather("output_shuffle", name, y.output(0), gout)
        return y

    def rewrite(self, graph, cand):
        node = cand.node
        name = node.name
        if cand.data.get("bias_shift") is not None:  # in the original channel order: before any fold
            shift_bias(graph, cand.data["bias"], cand.data["bias_shift"])
        _, gin, gout = cand.data["layout"]
        if self.opts.fold and (gin is not None or gout is not None):
            graph.infer_shapes()  # the groups walk static shapes; layers rewritten before left new nodes
        folded = []
        for side, tensor, axis, perm in (("input", graph.input(node, 0), 2, gin),
                                         ("output", node.output(0), 3, None if gout is None else np.argsort(gout))):
            why = None if perm is None else self._fold(graph, cand, tensor, axis, perm)
            folded.append(perm is not None and why is None)
            if perm is not None:
                cand.record[f"{side}_shuffle"] = "gather" if why else "folded"
                if why:
                    cand.record[f"{side}_shuffle_reason"] = why
        graph.rename_node(name, graph.unique_name(name + "_ungrouped"))
        out = self._emit(graph, cand, graph.input(node, 0), name, tuple(folded))
        graph.replace_all_uses(node.output(0), out.output(0))
        graph.remove_unused([node.name], keep_weights=False)

    def _fold(self, graph, cand, tensor, kernel_axis: int, order) -> str | None:
        """Reorder the channel group of ``tensor`` (the layer's input, or its output) so that it holds the
        channels in ``order`` (what the gather would produce): the producer's filters, the per-channel
        weights and every other reader follow (:func:`~graphslim.analysis.channels.apply_keep` with the
        permutation as keep list). None when done, else why not (the graph is then unchanged)."""
        if not self.opts.fold:
            return "fold=false"
        cax = 1 if cand.data["nchw"] else 3
        try:
            grp = group_for(graph, tensor, cax)
        except ChannelError as exc:
            return f"no channel group: {exc}"
        if not grp.prunable:
            return f"its channel group cannot be reordered: {grp.why_not()}"
        weights = {m.name for m in grp.members if m.kind == "weight"}
        later = [c.kernel.name for c in self._cands if c is not cand and c.kernel is not None and not c.skipped
                 and "action" not in c.record and c.kernel.name in weights]
        if later and self.opts.calib is not None:
            return (f"its channel group also holds {later[0]}, a layer still to be grouped, whose calib= refit "
                    "compares with the original model in its channel order")
        if any(m.kind == "weight" and m.name == cand.kernel.name and m.axis != kernel_axis for m in grp.members):
            return "the layer's input and output channels are one channel group (a residual around it)"
        try:
            apply_keep(graph, grp, [int(i) for i in order])
        except ChannelError as exc:
            return f"the permutation cannot be applied to its channel group: {exc}"
        for c in self._cands:  # a later candidate whose kernel was reordered: read it again
            if c is not cand and c.kernel is not None and c.kernel.name in weights and "w" in c.data:
                c.data["w"] = np.asarray(c.kernel.value, np.float64).reshape(c.data["w"].shape)
        return None

    def timing_graphs(self, graph, cand):
        return self.conv_timing_graphs(graph, cand)


@register_pass("shuffle", options=ShuffleOptions)
def shuffle(graph, opts: ShuffleOptions) -> PassResult:
    """Replace 1×1 convs by grouped 1×1 convs (g groups) with channel permutations chosen from the weights
    (and ``calib=`` data).

    Example: ``--passes "shuffle{groups=4},dce"`` or ``separable{rank=1},shuffle{groups=4 calib=data.npz}``
    """
    changed, stats = factorize_graph(graph, opts.driver_options(), _Shuffle(opts))
    stats["groups"] = opts.groups
    return PassResult(changed=changed, stats=stats)
