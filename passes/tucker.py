"""``tucker``: replace a trained K×K convolution ``W [KH, KW, C, N]`` by three convs through two channel
ranks, a 1×1 conv C→r1, a K×K conv r1→r2 (with the original strides, padding, dilations and layout),
and a 1×1 conv r2→N, without retraining (Tucker-2 by HOSVD, Kim et al. 2016, "Compression of deep
convolutional neural networks for fast and low power mobile applications").

Math (:mod:`graphslim.analysis.tucker`): ``A [C, r1]`` = the leading r1 left singular vectors of the
mode-C unfolding ``W_(C) [C, KH·KW·N]``, ``B`` = the leading r2 of the mode-N unfolding (transposed,
``[r2, N]``), core = W ×_C Aᵀ ×_N Bᵀ ``[KH, KW, r1, r2]``; ``Ŵ = core ×_C A ×_N B``. Exact at full
rank (r1 = rank W_(C) ≤ C, r2 = rank W_(N) ≤ N). Per output position it costs
``(H·W/OH·OW)·C·r1 + K²·r1·r2 + r2·N`` MACs against ``K²·C·N`` (the first 1×1 runs at the input's
resolution), so it pays when both ranks are well below the channels. A 1×1 conv is left to
``lowrank`` (one rank is enough there); grouped and depthwise convs are reported and left alone.

Ranks (at most one of these; none: ``energy=0.9``):

* ``ranks=r1,r2``: these ranks for every candidate; ``rank=r``: r for both modes. A rank above a
  mode's full rank is clipped to it, with a ``note`` in the layer's record.
* ``energy=E``: per mode, the smallest rank keeping a fraction E of that mode's squared singular
  values (``energy_kept`` is then the lesser of the two modes' kept fractions).
* ``max_error=e`` / ``macs=F``: these search a one-dimensional knob, the chain of pairs that keep the
  same energy fraction τ in both modes (τ from 0 to 1: (1, 1) … full, both ranks growing).
  ``max_error=`` takes the first pair of the chain whose relative error √(1 − kept) is at most e (the
  weight error ‖W − Ŵ‖/‖W‖; with ``calib=`` the whitened, output-weighted one); ``macs=F`` keeps a
  fraction F of the model's MACs, allocating steps of the chain across layers, least energy lost per
  MAC saved first (``energy_kept`` is then the kept fraction of ‖W‖², exact for a pair: ‖W‖² − ‖core‖²).

``layers=`` / ``exclude=`` (node, kernel or Keras layer names, glob patterns), ``min_macs_saving=``,
``cost=latency runtime=…`` (time the original and factorized layer at batch 1, apply only when
faster): as for ``separable`` and ``lowrank`` (:class:`~graphslim.analysis.factorize.FactorizeOptions`).

Large kernels (4M weights or more, e.g. 3×3×2048×2048; the policy ``lowrank`` applies to its matrices:
:func:`graphslim.analysis.randomized.use_randomized`) never get float64 copies: each mode's basis is
found streamed over the kernel by the randomized range finder with power iterations at ``ranks=`` /
``rank=`` or by ``energy=`` (the sketch grows until each mode keeps the energy), and exactly through the
C×C and N×N Gram matrices for ``max_error=`` / ``macs=`` (which weigh every rank pair) or when the energy
needs more than an eighth of a mode (:func:`graphslim.analysis.tucker.streamed_hosvd`); the record's
``svd`` says which (``randomized (ranks k1, k2)`` or ``exact (Gram)``), and ``weight_error`` is then
measured slice by slice.

Data-aware (``calib=data.npz``): the input mode is whitened by the second moments Σ (C×C, the
covariance when a BiasAdd follows: the bias absorbs the mean) of the layer's input channels on the
calibration data, damped: the HOSVD is of ``W ×_C Σ^½`` and the first factor is mapped back by
``Σ^-½`` (weighting input directions by how much they carry on the data, spatial correlations
ignored). Layers are handled in topological order, Σ taken on the model as already rewritten upstream;
then the last 1×1 factor (and the bias, when a BiasAdd follows) is refit by ridge-pulled least squares
on sampled input patches so that the layer reproduces the *original* model's output. Rank choice by
``energy=`` / ``max_error=`` then refers to the whitened spectra.

The stats list every Conv2D and DepthwiseConv2dNative with what was done or why not. A factorized
layer's record has ``rank`` / ``full_rank`` as ``(r1, r2)`` / ``(R1, R2)``, ``energy_kept`` (see
above), ``mode_energy`` (each mode's kept fraction), ``macs_before`` / ``macs_after`` (per example),
``weight_error`` (‖W − Ŵ‖/‖W‖), with ``calib=`` ``output_error`` (‖ŷ − y‖/‖y‖ of the layer's output
before bias on the calibration data, y from the original model) and, after a refit,
``output_error_before_refit`` / ``weight_error_before_refit``; with ``cost=latency`` ``ms_before`` /
``ms_after``; ``new_weights``; ``note`` when ranks were clipped.

Emitted structure: the original Conv2D node keeps its name and becomes the last 1×1 conv (r2→N), so its
BiasAdd and consumers are untouched; new nodes ``<scope>/<op name>_tucker_in`` (1×1, C→r1) and
``<scope>/<op name>_tucker_core`` (K×K, r1→r2) feed it. Kernel ``conv2d_1/kernel`` becomes
``conv2d_1/kernel_in``, ``conv2d_1/kernel_core`` and ``conv2d_1/kernel_out`` (names not ending in
``kernel`` get the same suffixes), trainable like the original.

Example: ``--passes "tucker{energy=0.8 calib=calib.npz},dce"`` or ``tucker{ranks=8,16 layers=conv2d_1}``
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from graphslim.analysis.calibration import ConvGeometry, FeatureMoments, Regression
from graphslim.analysis.factorize import (DEFAULT_ENERGY, conv_candidate, FactorizeOptions, Method,
                                          factorize_graph, pointwise_conv, refit, sibling_name, whitening)
from graphslim.analysis.randomized import use_randomized
from graphslim.analysis.tucker import (energy_chain, hosvd, mode_energy, streamed_hosvd, tucker_error,
                                       tucker_factors)
from graphslim.pipeline import PassResult, register_pass

RIDGE = 1e-3  # relative ridge of the refit of the last 1×1 factor, pulling towards the closed form


@dataclass(frozen=True)
class TuckerOptions(FactorizeOptions):
    """Options of ``tucker`` (see :class:`graphslim.analysis.factorize.FactorizeOptions`): at most one
    of ranks / rank / energy / max_error / macs (none: ``energy=0.9``)."""

    rank: int | None = field(default=None, metadata={
        "help": "keep this rank in both channel modes (r1 = r2 = rank); clipped to each mode's full rank"})
    ranks: tuple[int, ...] | None = field(default=None, metadata={
        "help": "r1,r2: input-mode and output-mode ranks for every layer; clipped to each mode's full rank"})

    def __post_init__(self):
        if self.ranks is not None:
            given = [k for k in ("rank", "energy", "max_error", "macs") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"give at most one of ranks=, rank=, energy=, max_error=, macs= (got ranks= "
                                 f"and {' and '.join(k + '=' for k in given)}); e.g. {{ranks=8,16}} or "
                                 "{energy=0.9}")
            if len(self.ranks) != 2 or any(r < 1 for r in self.ranks):
                raise ValueError(f"ranks must be two positive integers r1,r2 (input-mode and output-mode "
                                 f"ranks), e.g. ranks=8,16; got {','.join(str(r) for r in self.ranks) or 'none'}")
        super().__post_init__()

    @property
    def fixed(self) -> tuple[int, int] | None:
        """The explicit rank pair (``ranks=`` or ``rank=``), or None."""
        if self.ranks is not None:
            return int(self.ranks[0]), int(self.ranks[1])
        return None if self.rank is None else (self.rank, self.rank)

    def driver_options(self) -> FactorizeOptions:
        """The options the shared driver sees: explicit ranks become chain index 1 (the only pair)."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(FactorizeOptions)}
        base["rank"] = 1 if self.fixed is not None else None
        return FactorizeOptions(**base)


def _names(kernel_name: str) -> list[str]:
    return [kernel_name + "_in", kernel_name + "_core", kernel_name + "_out"]


def _hw(shape, nchw: bool):
    if shape is None or len(shape) != 4:
        return None, None
    return (shape[2], shape[3]) if nchw else (shape[1], shape[2])


def _tucker_shape(node, kshape) -> str | None:
    if node.op == "DepthwiseConv2dNative":
        return "depthwise conv (no channel mixing to factorize)"
    if kshape[0] * kshape[1] == 1:
        return "kernel 1×1 (one channel rank is enough: use lowrank)"
    return None


class _Tucker(Method):
    name = "tucker"

    def __init__(self, opts: TuckerOptions):
        self.opts = opts

    # ------------------------------------------------------------------ candidates
    def candidates(self, graph):
        out = []
        for node in graph.nodes(op=("Conv2D", "DepthwiseConv2dNative")):
            c = conv_candidate(graph, node, _tucker_shape)
            out.append(c)
            if c.skipped:
                continue
            kshape = tuple(c.record["kernel_shape"])
            kh, kw, cin, cout = kshape
            nchw, xshape = c.data["nchw"], c.data["xshape"]
            geo = ConvGeometry.of(graph, node)
            h, w = _hw(xshape, nchw)
            oh, ow = _hw(node.shapes[0] if node.shapes else None, nchw)
            known = None not in (h, w, oh, ow)
            bias_node, bias = graph.bias_after(node)
            c.data.update(geo=geo, nchw=nchw, positions_known=known,
                          pos_in=h * w if known else geo.strides[0] * geo.strides[1],
                          pos_out=oh * ow if known else 1, bias_node=bias_node, bias=bias)
        return out

    # ------------------------------------------------------------------ math
    def statistics(self, graph, cand, opts):
        return graph.input(cand.node, 0), FeatureMoments(axis=1 if cand.data["nchw"] else -1)

    def _hosvd(self, cand, g, ranks=None):
        """The HOSVD of the candidate's kernel: exact in float64 for small kernels, streamed for large ones
        (randomized at explicit ranks or by energy; exact through the mode Gram matrices for
        ``max_error=`` / ``macs=``, which need every rank pair)."""
        kernel = cand.kernel.value
        if not use_randomized(kernel.shape):
            return hosvd(np.asarray(kernel, np.float64), g)
        o = self.opts
        energy = None
        if ranks is None and self.opts.fixed is None and o.max_error is None and o.macs is None:
            energy = o.energy if o.energy is not None else DEFAULT_ENERGY
        h = streamed_hosvd(kernel, g, ranks=ranks or o.fixed, energy=energy)
        cand.record["svd"] = h.svd
        return h

    def decompose(self, cand, opts, stats):
        whiten = None
        if stats is not None and stats.count:
            sigma = stats.second_moment
            if cand.data["bias"] is not None:  # the bias absorbs the mean: weight by the covariance
                sigma = sigma - np.outer(stats.mean, stats.mean)
            whiten = whitening(sigma)
            cand.record["calibrated"] = True
        cand.data["whiten"] = whiten
        h = self._hosvd(cand, None if whiten is None else whiten[0])
        e_in, e_out = mode_energy(h)
        grid = h.kept_grid()
        cand.data.update(hosvd=h, e_in=e_in, e_out=e_out, grid=grid)
        fixed = self.opts.fixed
        if fixed is not None:
            r1, r2 = min(fixed[0], h.full[0]), min(fixed[1], h.full[1])
            if (r1, r2) != fixed:
                cand.record["note"] = (f"ranks ({fixed[0]}, {fixed[1]}) clipped to ({r1}, {r2}), the full ranks "
                                       f"of the {cand.kernel.value.shape[2]} input and "
                                       f"{cand.kernel.value.shape[3]} output channels")
            chain = [(r1, r2)]
        elif "chain" in cand.data:  # macs=: the budget indexed this chain; keep it when Σ changes
            chain = cand.data["chain"]
        else:
            chain = energy_chain(e_in, e_out)
        cand.data["chain"] = chain
        r1s, r2s = np.array([p[0] for p in chain]), np.array([p[1] for p in chain])
        if fixed is None and self.opts.max_error is None and self.opts.macs is None:  # energy=: per mode
            kept = np.minimum(e_in[r1s], e_out[r2s])
        else:
            kept = grid[r1s, r2s]
        return np.concatenate([[0.0], kept])

    def rank_label(self, cand, rank, full):
        chain = cand.data["chain"]
        return chain[rank - 1], cand.data["hosvd"].full

    def macs(self, cand, m):
        kh, kw, cin, cout = cand.kernel.value.shape
        r1, r2 = cand.data["chain"][m - 1]
        p_in, p_out = cand.data["pos_in"], cand.data["pos_out"]
        return p_out * kh * kw * cin * cout, p_in * cin * r1 + p_out * (kh * kw * r1 * r2 + r2 * cout)

    def factor(self, cand, m):
        r1, r2 = cand.data["chain"][m - 1]
        whiten = cand.data["whiten"]
        k1, k2 = cand.data["hosvd"].sketch
        if r1 > k1 or r2 > k2:  # the pair chosen lies past a streamed sketch: sketch again at it
            h = self._hosvd(cand, None if whiten is None else whiten[0], ranks=(r1, r2))
            cand.data.update(hosvd=h, grid=h.kept_grid())
        a, core, b = tucker_factors(cand.data["hosvd"], r1, r2, None if whiten is None else whiten[1])
        cand.data.update(a=a, core=core, b=b, ranks=(r1, r2), bias_shift=None)
        if whiten is None and cand.data["hosvd"].ranks is None:  # projection: ‖W − Ŵ‖² = ‖W‖² − ‖core‖²
            cand.record["weight_error"] = float(np.sqrt(max(1.0 - cand.data["grid"][r1, r2], 0.0)))
        else:  # whitened, or streamed (a float32 core: √(1 − kept) would lose the small errors)
            cand.record["weight_error"] = tucker_error(cand.kernel.value, a, core, b)
        cand.record["mode_energy"] = [float(f"{cand.data[k][r]:.6g}") for k, r in (("e_in", r1), ("e_out", r2))]
        cand.record["new_weights"] = _names(cand.kernel.name)

    def refinement(self, graph, cand, opts):
        w = np.asarray(cand.kernel.value, np.float64)
        kh, kw, cin, cout = w.shape
        r2 = cand.data["b"].shape[0]
        m = np.einsum("ci,hwij->hwcj", cand.data["a"], cand.data["core"]).reshape(-1, r2)  # patch → core out
        intercept = cand.data["bias"] is not None

        def features(p):
            z = p @ m
            return np.concatenate([z, np.ones((len(p), 1))], 1) if intercept else z

        return graph.input(cand.node, 0), Regression(
            features, lambda p: p @ w.reshape(-1, cout), cand.data["geo"], positions=opts.calib_positions, seed=1)

    def refine(self, cand, acc):
        if acc is None:
            return
        b, shift, err0, err = refit(acc, cand.data["b"], cand.data["bias"] is not None, RIDGE)
        if err0 is None:
            return
        if cand.data["ranks"] == cand.data["hosvd"].full:  # the closed form is exact: keep it
            cand.record["output_error"] = err0
            return
        cand.data.update(b=b, bias_shift=shift)
        cand.record.update(output_error=err, output_error_before_refit=err0,
                           weight_error_before_refit=cand.record["weight_error"],
                           weight_error=tucker_error(cand.kernel.value, cand.data["a"], cand.data["core"], b))

    # ------------------------------------------------------------------ emission
    def _emit(self, g, cand, x, node_name: str, reuse=None):
        """Emit 1×1 → K×K → 1×1 reading ``x`` into ``g``; ``reuse`` (the original conv) becomes the last."""
        node, kernel = cand.node, cand.kernel
        dtype = kernel.value.dtype
        a, core, b = cand.data["a"], cand.data["core"], cand.data["b"]
        cin, r1 = a.shape
        r2, cout = b.shape
        n_in, n_core, n_out = _names(kernel.name)
        k_in = g.add_weight(n_in, a.reshape(1, 1, cin, r1).astype(dtype), trainable=kernel.trainable, unique=True)
        k_core = g.add_weight(n_core, core.astype(dtype), trainable=kernel.trainable, unique=True)
        k_out = g.add_weight(n_out, b.reshape(1, 1, r2, cout).astype(dtype), trainable=kernel.trainable, unique=True)
        t = node.attr("T", tf.float32)
        fmt = node.attr("data_format", "NHWC")
        ones = [1, 1, 1, 1]
        base = node_name.rsplit("/", 1)[-1]
        first = g.add_node(sibling_name(g, node_name, base + "_tucker_in"), "Conv2D", [x, k_in], attrs={
            "T": t, "strides": ones, "padding": "VALID", "dilations": ones, "data_format": fmt})
        mid = g.add_node(sibling_name(g, node_name, base + "_tucker_core"), "Conv2D", [first, k_core],
                         attrs=dict(node.attrs))
        return pointwise_conv(g, node_name, [mid, k_out], reuse, t, ones, fmt)

    def timing_graphs(self, graph, cand):
        return self.conv_timing_graphs(graph, cand)


@register_pass("tucker", options=TuckerOptions)
def tucker(graph, opts: TuckerOptions) -> PassResult:
    """Replace K×K convolutions by 1×1 (C→r1) → K×K (r1→r2) → 1×1 (r2→N) convs via Tucker-2 (HOSVD).

    Example: ``--passes "tucker{energy=0.8},dce"`` or ``tucker{ranks=8,16 calib=calib.npz cost=latency}``
    """
    changed, stats = factorize_graph(graph, opts.driver_options(), _Tucker(opts))
    return PassResult(changed=changed, stats=stats)
