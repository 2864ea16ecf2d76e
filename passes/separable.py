"""``separable``: replace trained K×K convolutions by a depthwise conv (channel multiplier m) followed by
a 1×1 conv, without retraining.

For each input channel c, the K²×Cout slice ``W[:, :, c, :]`` is replaced by its rank-m truncated SVD
(Network Decoupling, Guo et al. 2018): the left factors (· √S) become the depthwise kernel
``[KH, KW, C, m]``, the right factors (√S ·) the pointwise kernel ``[1, 1, C·m, Cout]`` (row ``c·m + j``:
TensorFlow's order of depthwise outputs). Exact at m = min(K², Cout). Depthwise costs K²·C·m and
pointwise C·m·Cout MACs per output position against K²·C·Cout, so it pays when
m < K²·Cout / (K² + Cout) (m ≤ 7 for a 3×3 conv with 64 outputs).

Large kernels: the per-channel problems are K²×Cout (9 rows for a 3×3 conv), so an exact SVD costs less
than a randomized one would and no randomized path is taken; instead the SVDs and the pointwise rows are
computed a chunk of input channels at a time (:func:`graphslim.analysis.factorize.channel_svd`): no
float64 copy of the whole kernel (a 3×3×512×1024 kernel at m=2: traced peak 0.6× the kernel's float32
bytes, the factors included, against 4.5× before).

Rank: ``rank=`` (fixed m), ``energy=`` (smallest m keeping that fraction of the layer's squared singular
values, summed over channels) or ``max_error=`` (smallest m whose relative weight error is at most
that); none of them: ``energy=0.9``. ``macs=F`` instead keeps a fraction F of the model's MACs,
allocating ranks across layers (least energy lost per MAC saved first; layers not worth it stay whole).
``layers=`` / ``exclude=`` pick layers by node, kernel or Keras layer name (glob patterns);
``min_macs_saving=`` skips layers that would not pay.

Data-aware (``calib=data.npz``): per input channel, the K×K patch second moments Σ_c of the layer's
input on the calibration data weight the SVD (of ``Σ_c^½ W_c``), so that it minimizes the layer's
*output* error instead of the weight error; then the pointwise kernel (and the bias, as an intercept)
is refit by least squares on the calibration patches with all input channels coupled. Rank choice by
``energy=`` / ``max_error=`` then refers to these output-weighted singular values. The report gives
both the relative weight error and the relative output error measured on the calibration data.

``cost=latency``: each candidate's original and factorized forms are timed in TensorFlow on this
machine at the layer's real input shape (batch 1, median of ``latency_runs``, interleaved); only
factorizations faster by more than ``min_time_saving`` are applied.

Emitted structure: the original Conv2D node keeps its name and becomes the 1×1 pointwise conv (its
BiasAdd and consumers are untouched); a new ``DepthwiseConv2dNative`` node ``<scope>/depthwise`` feeds
it. Kernel ``block1_conv2/kernel`` becomes ``block1_conv2/depthwise_kernel`` and
``block1_conv2/pointwise_kernel`` (trainable like the original). TensorFlow's depthwise kernel has no
dilations and needs equal strides; a dilated conv becomes SpaceToBatchND → depthwise → BatchToSpaceND
(like ``tf.nn.depthwise_conv2d``), and unequal strides move to the pointwise conv (NHWC with static
height/width only; such NCHW convs are reported and left alone).

The stats list every Conv2D with what was done or why not (kernel 1×1, grouped conv, rank does not
save MACs, slower when timed, excluded, kept whole by the budget, ...). A factorized layer's record has
``rank`` / ``full_rank``, ``energy_kept``, ``macs_before`` / ``macs_after`` (per example),
``weight_error`` (‖W − Ŵ‖/‖W‖), with ``calib=`` ``output_error`` (‖ŷ − y‖/‖y‖ of the layer's output
before bias on the calibration data: y from the original model, ŷ from the rewritten one, upstream
factorizations included) and ``output_error_before_refit``, with ``cost=latency`` ``ms_before`` /
``ms_after``, and ``new_weights``.

Example: ``--passes "separable{energy=0.9 calib=calib.npz},dce"``
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from graphslim.analysis.calibration import ConvGeometry, PatchMoments, Regression
from graphslim.analysis.factorize import (conv_candidate, FactorizeOptions, Method, pointwise_conv,
                                          channel_svd, derived_name, factorize_graph, kept_energy, refit,
                                          separable_error, separable_factors, sibling_name, whitening)
from graphslim.pipeline import PassResult, register_pass

RIDGE = 1e-3  # relative ridge of the pointwise refit, pulling towards the closed-form factors


@dataclass(frozen=True)
class SeparableOptions(FactorizeOptions):
    """Options of ``separable`` (see :class:`graphslim.analysis.factorize.FactorizeOptions`)."""


def _hw(shape, nchw: bool):
    if shape is None or len(shape) != 4:
        return None, None
    return (shape[2], shape[3]) if nchw else (shape[1], shape[2])


class _Separable(Method):
    name = "separable"

    # ------------------------------------------------------------------ candidates
    def candidates(self, graph):
        out = []
        for node in graph.nodes(op="Conv2D"):
            c = conv_candidate(graph, node, lambda n, k: "kernel 1×1 (already pointwise)" if k[0] * k[1] == 1 else None)
            out.append(c)
            if c.skipped:
                continue
            kshape = tuple(c.record["kernel_shape"])
            kh, kw, cin, cout = kshape
            nchw, xshape = c.data["nchw"], c.data["xshape"]
            geo = ConvGeometry.of(graph, node)
            native = geo.dilations == (1, 1) and geo.strides[0] == geo.strides[1]
            h, w = _hw(xshape, nchw)
            if not native:
                if nchw:
                    c.skip("dilated or unequal-stride NCHW conv: TensorFlow's depthwise conv supports "
                           "neither and the NHWC rewrite does not apply")
                    continue
                if h is None or w is None:
                    c.skip("dilated or unequal-stride conv with unknown input height/width")
                    continue
            oh, ow = _hw(node.shapes[0] if node.shapes else None, nchw)
            bias_node, bias = graph.bias_after(node)
            c.data.update(geo=geo, native=native, nchw=nchw, hw=(h, w), ohw=(oh, ow),
                          positions_known=oh is not None and ow is not None,
                          bias_node=bias_node, bias=bias)
        return out

    # ------------------------------------------------------------------ math
    def statistics(self, graph, cand, opts):
        return graph.input(cand.node, 0), PatchMoments(cand.data["geo"], positions=opts.calib_positions)

    def decompose(self, cand, opts, stats):
        w = cand.kernel.value  # streamed channel by channel in float64 (see channel_svd)
        whiten = None
        if stats is not None and stats.count:
            sigma = stats.channel_second_moments
            if cand.data["bias"] is not None:  # the bias absorbs the mean: weight by the covariance
                mu = stats.channel_means
                sigma = sigma - mu[:, :, None] * mu[:, None, :]
            whiten = whitening(sigma)
            cand.record["calibrated"] = True
        cand.data["whiten"] = whiten
        cand.data["svd"] = channel_svd(w, None if whiten is None else whiten[0])
        cand.data["kept"] = kept_energy(cand.data["svd"][1])
        return cand.data["kept"]

    def macs(self, cand, m):
        kh, kw, cin, cout = cand.kernel.value.shape
        oh, ow = cand.data["ohw"]
        pos = oh * ow if cand.data["positions_known"] else 1
        pos_dw = pos
        if not cand.data["native"]:  # the depthwise runs at stride 1 over the padded input
            geo, (h, w) = cand.data["geo"], cand.data["hw"]
            pt, pb, pl, pr = geo.pads(h, w)
            eh, ew = geo.effective
            pos_dw = (h + pt + pb - eh + 1) * (w + pl + pr - ew + 1)
        k2 = kh * kw
        return pos * k2 * cin * cout, pos_dw * k2 * cin * m + pos * cin * m * cout

    def factor(self, cand, m):
        w = cand.kernel.value
        dw, pw = separable_factors(w, m, cand.data["whiten"], cand.data.pop("svd"))
        cand.data.update(dw=dw, pw=pw, rank=m, bias_shift=None)
        if cand.data["whiten"] is None:  # Eckart–Young, channel by channel
            cand.record["weight_error"] = float(np.sqrt(max(1.0 - cand.data["kept"][m], 0.0)))
        else:
            cand.record["weight_error"] = separable_error(w, dw, pw)
        cand.record["new_weights"] = [derived_name(cand.kernel.name, "depthwise"),
                                      derived_name(cand.kernel.name, "pointwise")]

    def refinement(self, graph, cand, opts):
        w = np.asarray(cand.kernel.value, np.float64)
        kh, kw, cin, cout = w.shape
        a = cand.data["dw"].reshape(kh * kw, cin, -1)  # [K², C, m]
        intercept = cand.data["bias"] is not None

        def features(p):
            z = np.einsum("nkc,kcm->ncm", p.reshape(len(p), kh * kw, cin), a, optimize=True).reshape(len(p), -1)
            return np.concatenate([z, np.ones((len(p), 1))], 1) if intercept else z

        return graph.input(cand.node, 0), Regression(
            features, lambda p: p @ w.reshape(-1, cout), cand.data["geo"], positions=opts.calib_positions, seed=1)

    def refine(self, cand, acc):
        if acc is None:
            return
        full = cand.data["rank"] >= cand.record["full_rank"]
        pw, shift, err0, err = refit(acc, cand.data["pw"], cand.data["bias"] is not None, RIDGE)
        if err0 is None:
            return
        if full:  # the closed form is exact: keep it, report its measured error
            cand.record["output_error"] = err0
            return
        cand.data.update(pw=pw, bias_shift=shift)
        cand.record.update(output_error=err, output_error_before_refit=err0,
                           weight_error=separable_error(cand.kernel.value, cand.data["dw"], pw))

    # ------------------------------------------------------------------ emission
    def _emit(self, g, cand, x, node_name: str, reuse=None):
        """Emit depthwise → pointwise reading ``x`` into ``g``; reuse ``reuse`` as the pointwise op."""
        node, kernel, geo = cand.node, cand.kernel, cand.data["geo"]
        dtype = kernel.value.dtype
        kh, kw, cin, cout = kernel.value.shape
        m = cand.data["rank"]
        dwk = g.add_weight(derived_name(kernel.name, "depthwise"), cand.data["dw"].astype(dtype),
                           trainable=kernel.trainable, unique=True)
        pwk = g.add_weight(derived_name(kernel.name, "pointwise"),
                           cand.data["pw"].reshape(1, 1, cin * m, cout).astype(dtype),
                           trainable=kernel.trainable, unique=True)
        t = node.attr("T", tf.float32)
        fmt = node.attr("data_format", "NHWC")
        ones = [1, 1, 1, 1]
        dw_name = sibling_name(g, node_name, "depthwise")
        if cand.data["native"]:
            attrs = {"T": t, "strides": node.attr("strides"), "padding": node.attr("padding"),
                     "data_format": fmt, "dilations": ones}
            if node.attr("padding") == "EXPLICIT":
                attrs["explicit_paddings"] = node.attr("explicit_paddings")
            y = g.add_node(dw_name, "DepthwiseConv2dNative", [x, dwk], attrs=attrs).output(0)
            pw_strides = ones
        else:  # NHWC, static height/width: explicit padding, stride moves to the pointwise conv
            h, w = cand.data["hw"]
            pt, pb, pl, pr = geo.pads(h, w)
            dh, dwd = geo.dilations
            if (dh, dwd) != (1, 1):
                eh, ew = (-(h + pt + pb)) % dh, (-(w + pl + pr)) % dwd
                i32 = tf.int32

                def const(suffix, value):
                    return g.add_node(g.unique_name(f"{dw_name}/{suffix}"), "Const",
                                      attrs={"dtype": i32, "value": np.array(value, np.int32)})

                block = const("block_shape", [dh, dwd])
                s2b = g.add_node(g.unique_name(f"{dw_name}/SpaceToBatchND"), "SpaceToBatchND",
                                 [x, block, const("paddings", [[pt, pb + eh], [pl, pr + ew]])],
                                 attrs={"T": t, "Tblock_shape": i32, "Tpaddings": i32})
                d = g.add_node(dw_name, "DepthwiseConv2dNative", [s2b, dwk],
                               attrs={"T": t, "strides": ones, "padding": "VALID", "data_format": fmt,
                                      "dilations": ones})
                y = g.add_node(g.unique_name(f"{dw_name}/BatchToSpaceND"), "BatchToSpaceND",
                               [d, block, const("crops", [[0, eh], [0, ew]])],
                               attrs={"T": t, "Tblock_shape": i32, "Tcrops": i32}).output(0)
            else:
                attrs = {"T": t, "strides": ones, "padding": "VALID", "data_format": fmt, "dilations": ones}
                if pt or pb or pl or pr:
                    attrs.update(padding="EXPLICIT", explicit_paddings=[0, 0, pt, pb, pl, pr, 0, 0])
                y = g.add_node(dw_name, "DepthwiseConv2dNative", [x, dwk], attrs=attrs).output(0)
            pw_strides = [1, geo.strides[0], geo.strides[1], 1]
        return pointwise_conv(g, node_name, [y, pwk], reuse, t, pw_strides, fmt)

    def timing_graphs(self, graph, cand):
        return self.conv_timing_graphs(graph, cand)


@register_pass("separable", options=SeparableOptions)
def separable(graph, opts: SeparableOptions) -> PassResult:
    """Replace K×K convolutions by depthwise (multiplier m) + 1×1 convs via per-channel truncated SVD.

    Example: ``--passes "separable{energy=0.9},dce"`` or ``separable{rank=3 calib=calib.npz cost=latency}``
    """
    changed, stats = factorize_graph(graph, opts, _Separable())
    return PassResult(changed=changed, stats=stats)
