"""``lowrank``: replace a dense layer or 1×1 convolution ``W [in, out]`` by two through rank r (truncated
SVD, √S split between the factors), without retraining (Denton et al. 2014).

* ``MatMul`` whose input 1 is a weight (Keras Dense, tf.Module, TF1 dense layers): ``x @ W`` becomes
  ``(x @ U) @ V``. ``transpose_b`` kernels keep their layout (``U`` stored ``[r, in]``, ``V``
  ``[out, r]``); ``transpose_a`` stays on the first MatMul.
* 1×1 ``Conv2D``: a 1×1 conv to r channels (with the original strides and padding), then a 1×1 conv
  to ``out``. With ``spatial=true`` also K×K convs, by ``W`` reshaped ``[K·K·in, out]``: a K×K conv to r
  channels, then a 1×1 conv (Zhang et al. 2015 style channel decomposition); by default K×K convs are
  reported and left to ``separable``.
* ``Einsum`` ``x, W -> y`` with a weight ``W`` (keras-hub's BERT attention projections, e.g.
  ``abc,cde->abde`` and ``abcd,cde->abe``): ``W`` read as a matrix of its contracted axes (labels shared
  with ``x``) by its free axes (labels only in ``y``); ``U`` keeps the contracted axes and a new rank
  axis, ``V`` the rank axis and the free ones, and two Einsums replace one (:func:`einsum_kernel`
  says which equations qualify; an ellipsis, a diagonal, or a weight axis batched with ``x`` is a
  per-layer skip naming the equation).
* ``BatchMatMul`` ``x @ W`` with ``W`` a weight (through Reshape: Keras's EinsumDense on TensorFlow,
  as in keras-hub's ViT): ``(x @ U) @ V``, both factors 2-D weights. Products of two activations
  (attention scores and context) are not layers and are left alone.

Exact at r = min(in, out). Per output position it costs r·(in + out) MACs against in·out, so it pays
when r < in·out / (in + out). Options as for ``separable``: ``rank=`` / ``energy=`` / ``max_error=``
(per layer; none: ``energy=0.9``) or ``macs=`` (a budget over the model), ``layers=`` / ``exclude=``,
``min_macs_saving=``, ``cost=macs|latency``, ``calib=``.

Data-aware (``calib=``): with the input second moments Σ on the calibration data (feature vectors of a
dense layer, patch vectors of a conv: the full (K·K·in)² matrix, so only for patch vectors of at most
``FULL_PATCH_LIMIT`` entries), the rank-r factorization minimizing the output error is the SVD of
``Σ^½ W`` mapped back by ``Σ^-½`` (larger patch vectors: from the weights). Layers are handled in
topological order, Σ taken on the model as already rewritten upstream; then the second factor (and
the bias, when a BiasAdd follows) is refit by least squares so that the layer reproduces the
*original* model's output. The report gives the relative weight error and the relative output error
on the calibration data (before and after the refit).

Emitted structure: the original MatMul/Conv2D node keeps its name and computes the second factor (so
its BiasAdd and consumers are untouched); a new node ``<scope>/<op name>_u`` computes the first.
Weights ``<layer>/kernel`` → ``<layer>/kernel_u`` and ``<layer>/kernel_v`` (names not ending in
``kernel`` get ``_u`` / ``_v``), trainable like the original.

Example: ``--passes "lowrank{energy=0.95 layers=dense*},dce"``
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from graphslim.analysis.calibration import ConvGeometry, FeatureMoments, PatchMoments, Regression
from graphslim.analysis.factorize import (DEFAULT_ENERGY, Candidate, FactorizeOptions, Method,
                                          factorize_graph, kept_energy, lowrank_factors, pointwise_conv,
                                          refit, relative_error, sibling_name, whitening)
from graphslim.analysis.randomized import (PartialSvd, factored_error, randomized_svd, top_svd,
                                          use_randomized)
from graphslim.ir.graph import Graph, SignatureArg
from graphslim.pipeline import PassResult, register_pass

FULL_PATCH_LIMIT = 2304  # largest K·K·in whose (K·K·in)² second-moment matrix calibration accumulates
FULL_FEATURE_LIMIT = 8192  # largest dense input whose in × in second moments calibration accumulates
RIDGE = 1e-3  # relative ridge of the refit of the second factor, pulling towards the closed form


@dataclass(frozen=True)
class LowrankOptions(FactorizeOptions):
    """Options of ``lowrank`` (see :class:`graphslim.analysis.factorize.FactorizeOptions`)."""

    spatial: bool = field(default=False, metadata={
        "help": "also factorize K×K convs (K×K conv to r channels, then 1×1); default: 1×1 convs and dense only"})


def _uv_names(kernel_name: str) -> tuple[str, str]:
    return kernel_name + "_u", kernel_name + "_v"


def _reshaped_weight(graph, node):
    """``(weight, None)`` when input 1 of ``node`` is a Weight read only here, through Identity and
    Reshape ops (Keras's EinsumDense on TensorFlow: ``x @ reshape(kernel)``); else ``(None, why)``."""
    t = graph.input(node, 1)
    chain = [t]
    src = graph.producer(t)
    while src.op in ("Identity", "Reshape"):
        t = graph.input(src, 0)
        chain.append(t)
        src = graph.producer(t)
    if src.op != "Weight":
        return None, f"input 1 is computed ({src.op}), not a trained weight"
    if any(graph.uses(x) != 1 for x in chain):
        return None, f"kernel {src.name} is shared with other ops"
    return graph.weights[src.name], None


def einsum_kernel(equation: str, x_rank: int, w_shape: tuple) -> tuple[dict | None, str | None]:
    """How an ``Einsum`` ``x, W -> y`` with a weight ``W`` reads as ``x·W2``, ``W2 [K, F]`` the weight's
    contracted axes (labels shared with ``x``, not in ``y``) by its free ones (labels only in ``y``).
    Returns ``({"x", "w", "y", "k", "f", "perm", "k_dims", "f_dims"}, None)``, or ``(None, reason)`` for
    what a two-factor split cannot take (ellipses, repeated labels, a weight axis that is batched with
    ``x`` or summed away)."""
    eq = equation.replace(" ", "")
    if "..." in eq:
        return None, f"Einsum equation {equation!r} has an ellipsis"
    if "->" not in eq or eq.count(",") != 1:
        return None, f"Einsum equation {equation!r} is not of the form x,W->y"
    ins, y = eq.split("->")
    x, w = ins.split(",")
    if len(x) != x_rank or len(w) != len(w_shape):
        return None, f"Einsum equation {equation!r} does not match the operands' ranks ({x_rank}, {len(w_shape)})"
    if len(set(x)) != len(x) or len(set(w)) != len(w) or len(set(y)) != len(y):
        return None, f"Einsum equation {equation!r} repeats a label within an operand (a diagonal)"
    k = [c for c in w if c in x and c not in y]
    f = [c for c in w if c in y and c not in x]
    odd = [c for c in w if c not in k and c not in f]
    if odd:
        return None, (f"Einsum equation {equation!r}: weight axis {odd[0]!r} is "
                      f"{'batched with the input' if odd[0] in x else 'summed away'}")
    if not k or not f:
        return None, f"Einsum equation {equation!r} contracts {'nothing' if not k else 'into no new axis'}"
    perm = [w.index(c) for c in k + f]
    return {"x": x, "w": w, "y": y, "k": "".join(k), "f": "".join(f), "perm": perm,
            "k_dims": [w_shape[w.index(c)] for c in k], "f_dims": [w_shape[w.index(c)] for c in f]}, None


class _Lowrank(Method):
    name = "lowrank"

    def __init__(self, opts: LowrankOptions):
        self.opts = opts

    # ------------------------------------------------------------------ candidates
    def candidates(self, graph):
        out = []
        costs = graph.cost().by_node()  # a MatMul's rows per example (Keras's Dense under Tensordot: tokens)
        for node in graph.nodes(op=("MatMul", "Conv2D", "Einsum", "BatchMatMulV2", "BatchMatMulV3", "BatchMatMul")):
            if node.op.startswith("BatchMatMul") and _reshaped_weight(graph, node)[0] is None:
                continue  # activation × activation (attention scores and context): nothing to factor
            c = Candidate(node, record={"layer": node.name, "op": node.op})
            out.append(c)
            if node.op == "Einsum" and graph.weight_of(node, 1) is None:
                c.skip("the Einsum's second operand is not a weight" + (
                    " (its first is: only x, W -> y is taken)" if graph.weight_of(node, 0) is not None else ""))
                continue
            kshape = graph.shape(graph.input(node, 1))
            if kshape is None or None in kshape:
                c.skip("kernel shape unknown")
                continue
            c.record["kernel_shape"] = list(kshape)
            named = graph.weight_of(node, 1)
            if named is not None:
                c.record["kernel"] = named.name
            if not node.dtypes or not node.dtypes[0].is_floating:
                c.skip(f"dtype {node.dtypes[0].name if node.dtypes else '?'} is not floating point")
                continue
            if node.op == "Conv2D" and not self._conv_ok(graph, node, kshape, c):
                continue
            kernel, why = (_reshaped_weight(graph, node) if node.op.startswith("BatchMatMul")
                           else graph.sole_weight(node, 1))
            if kernel is None:
                c.skip(why)
                continue
            c.kernel = kernel
            w = kernel.value  # as stored (a large one file-mapped): cast only where the math needs it
            if node.op == "Einsum" or node.op.startswith("BatchMatMul"):
                if not self._batched_ok(graph, node, kernel, w, c):
                    continue
            elif node.op == "MatMul":
                w2 = w.T if node.attr("transpose_b", False) else w
                full = costs[node.name].macs if node.name in costs else 0
                c.data.update(w2=w2, positions=max(1, round(full / max(1, w2.shape[0] * w2.shape[1]))),
                              positions_known=True)
            else:
                oshape = node.shapes[0] if node.shapes else None
                nchw = node.attr("data_format", "NHWC").startswith("NC")
                hw = None if oshape is None else ((oshape[2], oshape[3]) if nchw else (oshape[1], oshape[2]))
                known = hw is not None and None not in hw
                c.data.update(w2=w.reshape(-1, w.shape[-1]), positions=hw[0] * hw[1] if known else 1,
                              positions_known=known, geo=ConvGeometry.of(graph, node), nchw=nchw)
            c.data["bias_node"], c.data["bias"] = graph.bias_after(node)
        return out

    def _batched_ok(self, graph, node, kernel, w, c) -> bool:
        """Einsum ``x, W -> y`` and BatchMatMul ``x @ W`` with a 2-D (maybe reshaped) weight: ``w2`` is
        ``W`` as ``[K, F]``, ``positions`` the output rows per example."""
        xshape = graph.shape(graph.input(node, 0))
        if xshape is None:
            c.skip("input shape unknown")
            return False
        if node.op == "Einsum":
            spec, why = einsum_kernel(node.attr("equation", ""), len(xshape), w.shape)
            if spec is None:
                c.skip(why)
                return False
            w2 = w.transpose(spec["perm"]).reshape(int(np.prod(spec["k_dims"])), -1)
            rows = [d for lab, d in zip(spec["x"], xshape) if lab not in spec["k"]]
            c.data.update(einsum=spec, trailing=spec["x"].endswith(spec["k"]))
        else:
            mshape = graph.shape(graph.input(node, 1))
            if mshape is None or len(mshape) != 2 or w.size != mshape[0] * mshape[1]:
                c.skip(f"the weight reaches the product as {mshape}, not as a matrix")
                return False
            if node.attr("adj_x", False):
                c.skip("adj_x: the input's rows are transposed")
                return False
            w2 = w.reshape(mshape)
            if node.attr("adj_y", False):
                w2 = w2.T
            rows = list(xshape[:-1])
            c.data.update(trailing=True)
        known = len(rows) >= 1 and all(d is not None for d in rows[1:])
        c.data.update(w2=w2, positions=int(np.prod(rows[1:])) if known else 1, positions_known=known)
        return True

    def _conv_ok(self, graph, node, kshape, c) -> bool:
        nchw = node.attr("data_format", "NHWC").startswith("NC")
        xshape = graph.shape(graph.input(node, 0))
        xc = None if xshape is None or len(xshape) != 4 else xshape[1 if nchw else 3]
        if xc is not None and xc != kshape[2]:
            c.skip(f"grouped conv ({xc} input channels, kernel takes {kshape[2]} per group)")
            return False
        if kshape[0] * kshape[1] > 1 and not self.opts.spatial:
            c.skip(f"kernel {kshape[0]}×{kshape[1]} is spatial (use separable, or lowrank{{spatial=true}})")
            return False
        return True

    # ------------------------------------------------------------------ math
    def statistics(self, graph, cand, opts):
        node = cand.node
        size = cand.data["w2"].shape[0]
        if "trailing" in cand.data:  # Einsum / BatchMatMul: rows are the input's trailing axis
            if not cand.data["trailing"] or len(cand.data.get("einsum", {"k": "k"})["k"]) != 1:
                cand.record["calibration_note"] = ("the contracted axes are not the input's last: factorized "
                                                   "from the weights alone")
                return None
            if size > FULL_FEATURE_LIMIT:
                cand.record["calibration_note"] = (f"input of {size} features > {FULL_FEATURE_LIMIT}: "
                                                   "factorized from the weights alone")
                return None
            return graph.input(node, 0), FeatureMoments(axis=-1)
        if node.op == "MatMul":
            if size > FULL_FEATURE_LIMIT:
                cand.record["calibration_note"] = (f"input of {size} features > {FULL_FEATURE_LIMIT}: "
                                                   "factorized from the weights alone")
                return None
            axis = 0 if node.attr("transpose_a", False) else -1
            return graph.input(node, 0), FeatureMoments(axis=axis)
        if size > FULL_PATCH_LIMIT:
            cand.record["calibration_note"] = (f"patch vector of {size} > {FULL_PATCH_LIMIT} entries: "
                                               "factorized from the weights alone")
            return None
        return graph.input(node, 0), PatchMoments(cand.data["geo"], positions=opts.calib_positions, full=True)

    def decompose(self, cand, opts, stats):
        w2 = cand.data["w2"]
        whiten = None
        if stats is not None and stats.count:
            sigma = stats.second_moment
            if cand.data["bias"] is not None:  # the bias absorbs the mean: weight by the covariance
                sigma = sigma - np.outer(stats.mean, stats.mean)
            whiten = whitening(sigma)
            cand.record["calibrated"] = True
        cand.data["whiten"] = whiten
        if whiten is None and use_randomized(w2.shape):
            n_in, n_out = w2.shape
            target = opts.energy if opts.energy is not None else (
                1 - opts.max_error ** 2 if opts.max_error is not None else DEFAULT_ENERGY)
            rank = opts.rank if opts.macs is None else min(w2.shape)  # macs=: the whole spectrum
            svd = top_svd(w2, rank=rank, energy=target, stop=n_in * n_out // (n_in + n_out))
            cand.record["svd"] = "exact (Gram)" if svd.exact else f"randomized (rank {svd.k})"
            cand.data["svd"] = svd
            kept = svd.kept()
        else:
            w2 = np.asarray(w2, np.float64)
            cand.data["svd"] = np.linalg.svd(w2 if whiten is None else whiten[0] @ w2, full_matrices=False)
            kept = kept_energy(cand.data["svd"][1])
        cand.data["kept"] = kept
        return kept

    def macs(self, cand, r):
        n_in, n_out = cand.data["w2"].shape
        pos = cand.data["positions"]
        return pos * n_in * n_out, pos * r * (n_in + n_out)

    def factor(self, cand, r):
        w2 = cand.data["w2"]
        svd = cand.data.pop("svd")
        if isinstance(svd, PartialSvd):
            if r > svd.k:  # the rank chosen lies past the sketch: sketch again at that rank
                svd = randomized_svd(w2, r)
                cand.data["kept"][:r + 1] = svd.kept()[:r + 1]
            u, v = svd.factors(w2, r)
        else:
            u, v = lowrank_factors(np.asarray(w2, np.float64), r, cand.data["whiten"], svd)
        cand.data.update(u=u, v=v, rank=r, bias_shift=None)
        if cand.data["whiten"] is None:  # Eckart–Young: the discarded singular values
            cand.record["weight_error"] = float(np.sqrt(max(1.0 - cand.data["kept"][r], 0.0)))
        else:
            cand.record["weight_error"] = relative_error(w2, u @ v)
        cand.record["new_weights"] = list(_uv_names(cand.kernel.name))

    def refinement(self, graph, cand, opts):
        node, w2, u = cand.node, cand.data["w2"], cand.data["u"]
        intercept = cand.data["bias"] is not None

        def features(rows):
            z = rows @ u
            return np.concatenate([z, np.ones((len(z), 1))], 1) if intercept else z

        if "trailing" in cand.data:
            if not cand.record.get("calibrated"):
                return None
            acc = Regression(features, lambda rows: rows @ w2, axis=-1)
        elif node.op == "MatMul":
            acc = Regression(features, lambda rows: rows @ w2, axis=0 if node.attr("transpose_a", False) else -1)
        else:
            acc = Regression(features, lambda rows: rows @ w2, cand.data["geo"], positions=opts.calib_positions, seed=1)
        return graph.input(node, 0), acc

    def refine(self, cand, acc):
        if acc is None:
            return
        v, shift, err0, err = refit(acc, cand.data["v"], cand.data["bias"] is not None, RIDGE)
        if err0 is None:
            return
        if cand.data["rank"] >= cand.record["full_rank"]:
            cand.record["output_error"] = err0
            return
        cand.data.update(v=v, bias_shift=shift)
        cand.record.update(output_error=err, output_error_before_refit=err0,
                           weight_error=factored_error(cand.data["w2"], cand.data["u"], v))

    # ------------------------------------------------------------------ emission
    def _emit(self, g, cand, x, node_name: str, reuse=None):
        node, kernel = cand.node, cand.kernel
        dtype = kernel.value.dtype
        u, v = cand.data["u"], cand.data["v"]
        r = u.shape[1]
        t = node.attr("T", tf.float32)
        nu, nv = _uv_names(kernel.name)
        first_name = sibling_name(g, node_name, node_name.rsplit("/", 1)[-1] + "_u")
        if node.op == "Einsum":
            spec = cand.data["einsum"]
            label = next(ch for ch in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA"
                         if ch not in spec["x"] + spec["w"] + spec["y"])
            ku = g.add_weight(nu, u.reshape(spec["k_dims"] + [r]).astype(dtype), trainable=kernel.trainable,
                              unique=True)
            kv = g.add_weight(nv, v.reshape([r] + spec["f_dims"]).astype(dtype), trainable=kernel.trainable,
                              unique=True)
            mid = "".join(ch for ch in spec["x"] if ch not in spec["k"]) + label
            first = g.add_node(first_name, "Einsum", [x, ku], attrs={
                **node.attrs, "equation": f"{spec['x']},{spec['k']}{label}->{mid}"})
            attrs = {**node.attrs, "equation": f"{mid},{label}{spec['f']}->{spec['y']}"}
            if reuse is None:
                return g.add_node(node_name, "Einsum", [first, kv], attrs=attrs)
            g.set_inputs(reuse, [first, kv])
            reuse.set_attr("equation", attrs["equation"])
            return reuse
        if node.op.startswith("BatchMatMul"):
            ku = g.add_weight(nu, u.astype(dtype), trainable=kernel.trainable, unique=True)
            kv = g.add_weight(nv, v.astype(dtype), trainable=kernel.trainable, unique=True)
            attrs = {**node.attrs, "adj_x": False, "adj_y": False}
            first = g.add_node(first_name, node.op, [x, ku], attrs=attrs)
            if reuse is None:
                return g.add_node(node_name, node.op, [first, kv], attrs=attrs)
            g.set_inputs(reuse, [first, kv])
            reuse.set_attr("adj_y", False)
            return reuse
        if node.op == "MatMul":
            tb = bool(node.attr("transpose_b", False))
            ku = g.add_weight(nu, np.ascontiguousarray(u.T if tb else u, dtype), trainable=kernel.trainable,
                              unique=True)
            kv = g.add_weight(nv, np.ascontiguousarray(v.T if tb else v, dtype), trainable=kernel.trainable,
                              unique=True)
            first = g.add_node(first_name, "MatMul", [x, ku], attrs={
                "T": t, "transpose_a": bool(node.attr("transpose_a", False)), "transpose_b": tb})
            if reuse is None:
                return g.add_node(node_name, "MatMul", [first, kv],
                                  attrs={"T": t, "transpose_a": False, "transpose_b": tb})
            g.set_inputs(reuse, [first, kv])
            reuse.set_attr("transpose_a", False)
            return reuse
        kh, kw, cin, cout = kernel.value.shape
        ku = g.add_weight(nu, u.reshape(kh, kw, cin, r).astype(dtype), trainable=kernel.trainable, unique=True)
        kv = g.add_weight(nv, v.reshape(1, 1, r, cout).astype(dtype), trainable=kernel.trainable, unique=True)
        first = g.add_node(first_name, "Conv2D", [x, ku], attrs=dict(node.attrs))
        return pointwise_conv(g, node_name, [first, kv], reuse, t, [1, 1, 1, 1], node.attr("data_format", "NHWC"))

    def timing_graphs(self, graph, cand):
        node = cand.node
        if node.op == "Conv2D" and cand.data["nchw"]:
            return "NCHW convolutions do not run on this CPU"
        xshape = graph.shape(graph.input(node, 0))
        if xshape is None:
            return "input shape unknown"
        batch_axis = 1 if node.op == "MatMul" and node.attr("transpose_a", False) else 0
        shape = [1 if i == batch_axis else d for i, d in enumerate(xshape)]
        if "trailing" in cand.data:  # a sequence length left open: time a typical one
            shape = [1] + [d if d is not None else 128 for d in shape[1:]]
        if any(d is None for d in shape):
            return "input shape unknown"
        minis = []
        for factorized in (False, True):
            g = Graph()
            g.add_input("x", graph.dtype(graph.input(node, 0)), shape)
            if factorized:
                out = self._emit(g, cand, "x", "layer")
            else:
                k = g.add_weight("kernel", cand.kernel.value if "einsum" in cand.data or node.op in ("MatMul", "Conv2D")
                                 else cand.data["w2"].T.astype(cand.kernel.value.dtype) if node.attr("adj_y", False)
                                 else cand.data["w2"].astype(cand.kernel.value.dtype))
                out = g.add_node("layer", node.op, ["x", k], attrs=dict(node.attrs))
            g.outputs.append(SignatureArg("y", out.output(0)))
            g.infer_shapes()
            minis.append(g)
        return tuple(minis)


@register_pass("lowrank", options=LowrankOptions)
def lowrank(graph, opts: LowrankOptions) -> PassResult:
    """Replace dense layers and 1×1 convs ``W [in, out]`` by two through rank r (truncated SVD).

    Example: ``--passes "lowrank{energy=0.95},dce"`` or ``lowrank{rank=16 layers=dense_1 calib=calib.npz}``
    """
    changed, stats = factorize_graph(graph, opts, _Lowrank(opts))
    return PassResult(changed=changed, stats=stats)
