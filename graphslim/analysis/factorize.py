"""Shared machinery of the factorizing passes (``separable``, ``lowrank``): SVD math, rank choice,
data-aware whitening, measured latency, and the driver that walks candidates and writes the report.

Math (all in float64, cast back to the kernel's dtype):

* :func:`channel_svd` — per input channel ``c`` of a K×K conv kernel ``W [KH, KW, C, Cout]``, the SVD
  of the K²×Cout slice ``W[:, :, c, :]``. Rank m (the depthwise channel multiplier) keeps the m
  largest singular triplets of every channel: :func:`separable_factors` gives the depthwise kernel
  ``[KH, KW, C, m]`` (left factors · √S) and the pointwise kernel ``[1, 1, C·m, Cout]`` (√S · right
  factors, row ``c·m + j`` as TensorFlow orders depthwise outputs). Exact at m = min(K², Cout).
* :func:`lowrank_factors` — ``W [in, out] ≈ U [in, r] · V [r, out]`` by truncated SVD, √S split.
  Exact at r = min(in, out).
* Data-aware: with input second moments Σ (per channel K²×K² for separable, in×in for lowrank), the
  factorization minimizing the *output* error E‖xᵀ(W − Ŵ)‖² is the truncated SVD of ``Σ^½ W``
  mapped back by ``Σ^-½`` (:func:`whitening`; damped so that dead inputs fall back to plain SVD).
* :func:`kept_energy` / :func:`choose_rank` — rank from ``rank=``, ``energy=`` (smallest rank whose
  kept fraction of squared singular values is ≥ energy) or ``max_error=`` (smallest rank whose
  relative Frobenius error √(1 − kept) is ≤ max_error); none given: ``energy=0.9``.

Latency: :func:`measure_latency` times small graphs (one input ``x``, one output) in the TensorFlow
runtime, interleaved, median of several runs, batch as given.

The driver :func:`factorize_graph` runs a :class:`Method` (what is a candidate, how to factor it, how
to emit it) through: structural checks → ``layers=``/``exclude=``, then per layer in topological order:
calibration statistics → rank → MACs check → refit on calibration data → timing (``cost=latency``) →
rewrite. Every candidate gets one report record saying what was done or why not.
"""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from graphslim.errors import PassError

__all__ = ["Candidate", "conv_candidate", "FactorizeOptions", "Method", "allocate_ranks", "channel_svd", "choose_rank",
           "factorize_graph", "kept_energy", "lowrank_factors", "measure_latency", "rebalance", "refit",
           "separable_error", "separable_factors", "whitening"]

DAMPING = 1e-3  # relative ridge added to input second moments before whitening
DEFAULT_ENERGY = 0.9  # the rank criterion when none of rank= / energy= / max_error= is given


# --------------------------------------------------------------------------------------------- math
CHUNK_BYTES = 4 << 20  # float64 bytes of the per-channel slices handled at once by channel_svd & co.


def _channel_chunks(shape) -> list[tuple[int, int]]:
    """Input-channel ranges of a ``[KH, KW, C, Cout]`` kernel whose float64 slices take ~CHUNK_BYTES."""
    kh, kw, c, cout = shape
    step = max(1, CHUNK_BYTES // (8 * kh * kw * cout))
    return [(lo, min(c, lo + step)) for lo in range(0, c, step)]


def _channel_slices(kernel, lo: int, hi: int, weight=None) -> np.ndarray:
    """``[hi − lo, K², Cout]`` float64: input channels lo..hi of ``kernel``, each weighted by ``weight[c]``."""
    kh, kw, _, cout = kernel.shape
    m = np.asarray(kernel[:, :, lo:hi, :], np.float64).transpose(2, 0, 1, 3).reshape(hi - lo, kh * kw, cout)
    return m if weight is None else weight[lo:hi] @ m


def channel_svd(kernel: np.ndarray, weight: np.ndarray | None = None):
    """Per-input-channel SVD of a conv kernel ``[KH, KW, C, Cout]``.

    Returns ``(U [C, K², r], S [C, r], None)`` with r = min(K², Cout); the right factors are not kept
    (:func:`separable_factors` recomputes the ones it needs from the kernel). With ``weight``
    (``[C, K², K²]``, e.g. ``Σ_c^½`` from :func:`whitening`) the SVD is of ``weight[c] @ W_c``.

    Streamed over channels (:data:`CHUNK_BYTES` of float64 slices at a time): the per-channel problems
    are K²×Cout, tiny, so an exact SVD costs less than a randomized one would, and what stays is
    channel-sized (U, S), never a float64 copy of the whole kernel.
    """
    kh, kw, c, cout = kernel.shape
    r = min(kh * kw, cout)
    u, s = np.empty((c, kh * kw, r)), np.empty((c, r))
    for lo, hi in _channel_chunks(kernel.shape):
        u[lo:hi], s[lo:hi], _ = np.linalg.svd(_channel_slices(kernel, lo, hi, weight), full_matrices=False)
    return u, s, None


def kept_energy(s: np.ndarray) -> np.ndarray:
    """Fraction of squared singular values kept at each rank 0..r (rank uniform over leading axes).

    ``s`` is ``[r]`` or ``[C, r]`` (per channel, descending); returns ``[r + 1]``, ending at 1."""
    sq = np.square(np.asarray(s, np.float64)).reshape(-1, np.shape(s)[-1]).sum(0)
    total = sq.sum()
    if total <= 0:
        return np.ones(len(sq) + 1)
    return np.concatenate([[0.0], np.cumsum(sq) / total])


def choose_rank(kept: np.ndarray, *, rank: int | None = None, energy: float | None = None,
                max_error: float | None = None) -> int:
    """The rank to keep: ``rank`` (clipped to 1..full), else the smallest rank with kept energy ≥
    ``energy``, else the smallest with relative error √(1 − kept) ≤ ``max_error``.

    Example::

        choose_rank(kept_energy(s), energy=0.9)
    """
    full = len(kept) - 1
    if rank is not None:
        return int(min(max(rank, 1), full))
    if energy is None:
        energy = 1.0 - float(max_error) ** 2
    tol = 1e-12
    for m in range(1, full + 1):
        if kept[m] >= energy - tol:
            return m
    return full


def whitening(moments: np.ndarray, damping: float = DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ^½, Σ^-½)`` of (a stack of) second-moment matrices, damped: eigenvalues get
    ``damping × mean eigenvalue`` added (per matrix), so a dead input (Σ = 0) gives the identity."""
    sym = (np.asarray(moments, np.float64) + np.swapaxes(moments, -1, -2)) / 2
    e, q = np.linalg.eigh(sym)
    e = np.maximum(e, 0.0)
    mean = e.mean(-1, keepdims=True)
    floor = np.where(mean > 0, mean * damping, 1.0)
    e = e + floor
    root = np.sqrt(e)
    g = (q * root[..., None, :]) @ np.swapaxes(q, -1, -2)
    ginv = (q / root[..., None, :]) @ np.swapaxes(q, -1, -2)
    return g, ginv


def rebalance(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale ``a[..., :, j]`` and ``b[..., j, :]`` by α, 1/α so that both have the same norm."""
    na = np.linalg.norm(a, axis=-2)
    nb = np.linalg.norm(b, axis=-1)
    alpha = np.sqrt(np.where((na > 0) & (nb > 0), nb / np.where(na > 0, na, 1), 1.0))
    return a * alpha[..., None, :], b / alpha[..., :, None]


def separable_factors(kernel: np.ndarray, m: int, whiten: tuple | None = None, svd=None):
    """Depthwise ``[KH, KW, C, m]`` and pointwise ``[C·m, Cout]`` factors of a conv kernel (float64).

    ``whiten`` = ``(G, Ginv)`` per channel (``[C, K², K²]``) minimizes the output error for inputs
    whose per-channel patch second moments are G² instead of the weight error. ``svd`` reuses the
    result of ``channel_svd(kernel, G)``; the pointwise rows ``√s_j v_jᵀ = s_j^-½ u_jᵀ (G_c) W_c`` are
    computed from the kernel channel chunk by channel chunk (no float64 copy of the whole kernel; the
    factors themselves are float64, the pointwise one ``m / K²`` of the kernel's size)."""
    kh, kw, c, cout = kernel.shape
    g, ginv = whiten if whiten is not None else (None, None)
    u, s, vt = svd if svd is not None else channel_svd(kernel, g)
    m = min(m, s.shape[1])
    root = np.sqrt(s[:, :m])
    a = u[:, :, :m] * root[:, None, :]  # [C, K², m]
    if vt is not None:
        b = vt[:, :m, :] * root[:, :, None]  # [C, m, Cout]
    else:
        inv = np.where(root > 0, 1.0 / np.where(root > 0, root, 1.0), 0.0)
        b = np.empty((c, m, cout))
        for lo, hi in _channel_chunks(kernel.shape):
            proj = np.swapaxes(u[lo:hi, :, :m] * inv[lo:hi, None, :], 1, 2)  # [cc, m, K²]
            b[lo:hi] = proj @ _channel_slices(kernel, lo, hi, g)
    if ginv is not None:
        a = ginv @ a
        a, b = rebalance(a, b)
    dw = a.transpose(1, 0, 2).reshape(kh, kw, c, m)
    return dw, b.reshape(c * m, cout)


def separable_error(kernel: np.ndarray, dw: np.ndarray, pw: np.ndarray) -> float:
    """‖W − Ŵ‖ / ‖W‖ for Ŵ = depthwise ``dw`` then pointwise ``pw``, channel chunk by channel chunk."""
    kh, kw, c, m = dw.shape
    pw = pw.reshape(c, m, -1)
    num = den = 0.0
    for lo, hi in _channel_chunks(kernel.shape):
        w = _channel_slices(kernel, lo, hi)  # [cc, K², Cout]
        a = np.asarray(dw[:, :, lo:hi, :], np.float64).transpose(2, 0, 1, 3).reshape(hi - lo, kh * kw, m)
        num += float(np.square(w - a @ pw[lo:hi]).sum())
        den += float(np.square(w).sum())
    return float(np.sqrt(num / den)) if den else 0.0


def compose_separable(dw: np.ndarray, pw: np.ndarray) -> np.ndarray:
    """The K×K kernel ``[KH, KW, C, Cout]`` equivalent to depthwise ``dw`` then pointwise ``pw``."""
    kh, kw, c, m = dw.shape
    return np.einsum("hwcj,cjo->hwco", dw, pw.reshape(c, m, -1))


def lowrank_factors(w: np.ndarray, r: int, whiten: tuple | None = None, svd=None):
    """``U [in, r]``, ``V [r, out]`` with ``U @ V ≈ w`` (float64). ``whiten`` = ``(G, Ginv)`` of the
    input second moments makes it minimize the output error instead. ``svd`` reuses
    ``np.linalg.svd(G @ w or w, full_matrices=False)``."""
    w = np.asarray(w, np.float64)
    g, ginv = whiten if whiten is not None else (None, None)
    u, s, vt = svd if svd is not None else np.linalg.svd(w if g is None else g @ w, full_matrices=False)
    r = min(r, len(s))
    root = np.sqrt(s[:r])
    a, b = u[:, :r] * root, vt[:r] * root[:, None]
    if ginv is not None:
        a, b = rebalance(ginv @ a, b)
    return a, b


def refit(acc, b0: np.ndarray, intercept: bool, ridge: float = 1e-3):
    """Least-squares refit of a layer's last factor from a :class:`~graphslim.analysis.calibration.Regression`
    accumulator whose features are the first factor's outputs (plus a column of ones when
    ``intercept``) and whose targets are the original layer's outputs.

    Minimizes ‖T − F·B‖² + λ‖B − B0‖² (λ = ``ridge`` × mean diagonal of FᵀF: pulls weakly towards the
    closed-form factors ``b0``, so inputs unseen in the data keep them). Returns ``(B, bias shift or
    None, relative output error of b0, relative output error of B)``; ``B`` is ``b0`` unchanged when the
    refit does not lower the error."""
    b0a = np.concatenate([b0, np.zeros((1, b0.shape[1]))]) if intercept else b0
    power = acc.target_power
    if not acc.count or power <= 0:
        return b0, None, None, None
    err0 = float(np.sqrt(acc.residual(b0a) / power))
    d = acc.ff.shape[0]
    lam = ridge * np.trace(acc.ff) / d + 1e-12
    b = np.linalg.solve(acc.ff + lam * np.eye(d), acc.ft + lam * b0a)
    err = float(np.sqrt(acc.residual(b) / power))
    if not err < err0:
        return b0, None, err0, err0
    if intercept:
        return b[:-1], b[-1], err0, err
    return b, None, err0, err


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    den = float(np.linalg.norm(w))
    return float(np.linalg.norm(np.asarray(w, np.float64) - approx)) / den if den else 0.0


# --------------------------------------------------------------------------------------------- latency
def measure_latency(graphs: dict, runs: int = 7, min_seconds: float = 0.02, runtime: str = "tf") -> dict:
    """Median seconds per call of each graph (one input, first output), timed on ``runtime`` (``tf``:
    TensorFlow's graph executor, ``xla``, ``litert``) in the shared contained child.

    The graphs' inputs must have fully known shapes (e.g. batch 1). Each graph is warmed up, then
    timed ``runs`` times, interleaved across graphs; each timing repeats calls for at least
    ``min_seconds``. Returns ``{key: median seconds per call}``.
    """
    from graphslim.sandbox import RUNTIMES, shared_child

    child = shared_child("the layers being timed")
    handles = {}
    try:
        for k, g in graphs.items():
            x_arg = g.inputs[0]
            x = np.random.default_rng(0).normal(size=g.shape(x_arg.tensor)).astype(g.dtype(x_arg.tensor).as_numpy_dtype)
            handles[k] = child.load_graph(g, RUNTIMES[runtime])
            child.set_inputs(handles[k], {x_arg.name: x})
        reps = {}
        for k, h in handles.items():
            child.time(h, 1)
            one = max(child.time(h, 1), 1e-6)
            reps[k] = max(1, min(1000, int(math.ceil(min_seconds / one))))
        times: dict = {k: [] for k in handles}
        for _ in range(max(1, runs)):
            for k, h in handles.items():
                times[k].append(child.time(h, reps[k]))
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        for h in handles.values():
            child.drop(h)


# --------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class FactorizeOptions:
    """Options shared by ``separable`` and ``lowrank``: at most one of rank / energy / max_error / macs
    (none: ``energy=0.9``)."""

    rank: int | None = field(default=None, metadata={
        "help": "keep this rank per layer (depthwise channel multiplier for separable); clipped to full rank"})
    energy: float | None = field(default=None, metadata={
        "help": "per layer, the smallest rank keeping this fraction of squared singular values (0..1]; "
                f"{DEFAULT_ENERGY} when no rank criterion is given"})
    max_error: float | None = field(default=None, metadata={
        "help": "per layer, the smallest rank whose relative error is at most this (weights; output with calib)"})
    macs: float | None = field(default=None, metadata={
        "help": "fraction of the model's MACs to keep (0..1]: ranks allocated across layers, least energy "
                "lost per MAC saved first"})
    layers: tuple[str, ...] = field(default=(), metadata={
        "help": "only these layers (node, kernel or Keras layer names; glob patterns allowed)"})
    exclude: tuple[str, ...] = field(default=(), metadata={
        "help": "never these layers (same matching as layers)"})
    min_macs_saving: float | None = field(default=0.0, metadata={
        "help": "skip a layer unless it saves more than this fraction of its MACs; none: never skip"})
    calib: str | None = field(default=None, metadata={
        "help": "calibration inputs (.npz or dir of .npy keyed by input name): minimize output error"})
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
        "help": "with cost=latency, apply only if the factorized layer is faster by more than this fraction"})

    def __post_init__(self):
        given = [k for k in ("rank", "energy", "max_error", "macs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of rank=, energy=, max_error=, macs= (got "
                             f"{' and '.join(k + '=' for k in given)}); e.g. {{energy=0.9}} or {{rank=4}}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.max_error is not None and not 0 <= self.max_error < 1:
            raise ValueError(f"max_error must be in [0, 1), got {self.max_error}")
        if self.macs is not None and not 0 < self.macs <= 1:
            raise ValueError(f"macs must be in (0, 1], got {self.macs}")
        for k in ("calib_samples", "calib_batch", "calib_positions", "latency_runs"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


# --------------------------------------------------------------------------------------------- driver
@dataclass(eq=False)
class Candidate:
    """One candidate layer: its node, kernel weight, report record, and the method's working data."""

    node: Any
    kernel: Any = None
    record: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.record["action"] = "skipped"
        self.record["reason"] = reason

    @property
    def skipped(self) -> bool:
        return self.record.get("action") == "skipped"


def conv_candidate(graph, node, shape_check=None) -> Candidate:
    """A candidate for ``node`` (a Conv2D or DepthwiseConv2dNative) with its kernel's shape and weight name
    in the record and, when it is not skipped, its kernel weight (``c.kernel``), ``c.data["nchw"]`` and
    ``c.data["xshape"]`` (the input's shape). Skipped, with the reason, when the kernel shape is unknown,
    when ``shape_check(node, kernel shape)`` gives a reason (the method's own kernel sizes), for a grouped
    conv, a non-float dtype, or a kernel that is not one weight read by this op alone."""
    c = Candidate(node, record={"layer": node.name, "op": node.op})
    kshape = graph.shape(graph.input(node, 1))
    if kshape is None or len(kshape) != 4 or None in kshape:
        c.skip("kernel shape unknown")
        return c
    c.record["kernel_shape"] = list(kshape)
    named = graph.weight_of(node, 1)
    if named is not None:
        c.record["kernel"] = named.name
    why = shape_check(node, tuple(kshape)) if shape_check is not None else None
    if why is not None:
        c.skip(why)
        return c
    nchw = node.attr("data_format", "NHWC").startswith("NC")
    xshape = graph.shape(graph.input(node, 0))
    xc = None if xshape is None or len(xshape) != 4 else xshape[1 if nchw else 3]
    cin = kshape[2]
    if node.op == "Conv2D" and xc is not None and xc != cin:
        c.skip(f"grouped conv ({xc} input channels, kernel takes {cin} per group)")
        return c
    if not node.dtypes or not node.dtypes[0].is_floating:
        c.skip(f"dtype {node.dtypes[0].name if node.dtypes else '?'} is not floating point")
        return c
    kernel, why = graph.sole_weight(node, 1)
    if kernel is None:
        c.skip(why)
        return c
    c.kernel = kernel
    c.data.update(nchw=nchw, xshape=xshape)
    return c


class Method:
    """What a factorizing pass supplies to :func:`factorize_graph` (see passes/separable.py)."""

    name = ""

    def candidates(self, graph) -> list[Candidate]:
        """Every op the pass considers, with a skip reason already set on structural misfits."""
        raise NotImplementedError

    def statistics(self, graph, cand: Candidate, opts) -> tuple | None:
        """Phase 1 calibration request ``(tensor, accumulator)`` or None."""
        return None

    def decompose(self, cand: Candidate, opts, stats) -> np.ndarray:
        """Compute the (possibly data-weighted) spectrum; return kept energy per rank 0..full."""
        raise NotImplementedError

    def rank_label(self, cand: Candidate, rank: int, full: int) -> tuple:
        """``(rank, full rank)`` as the report and skip reasons show them (``tucker``: its knob indexes
        pairs of mode ranks, shown as the pairs)."""
        return rank, full

    def factor(self, cand: Candidate, rank: int) -> None:
        """Compute the factors at ``rank`` and fill the record (weight error, MACs...)."""
        raise NotImplementedError

    def macs(self, cand: Candidate, rank: int) -> tuple[int, int]:
        """MACs per example of the original and factorized forms (positions 1 if unknown)."""
        raise NotImplementedError

    def refinement(self, graph, cand: Candidate, opts) -> tuple | None:
        """Refit request ``(tensor, accumulator)`` or None; the accumulator's ``update(value, reference)``
        gets the tensor from the graph being rewritten and from the original model."""
        return None

    def refine(self, cand: Candidate, acc) -> None:
        """Use the phase-2 accumulator (refit, measured output error)."""

    def timing_graphs(self, graph, cand: Candidate):
        """``(original mini graph, factorized mini graph)`` at batch 1, or a reason string."""
        raise NotImplementedError

    def conv_timing_graphs(self, graph, cand: Candidate):
        """:meth:`timing_graphs` of a Conv2D candidate (``cand.data["nchw"]`` set): the conv alone and
        the form :meth:`_emit` builds, each on an input ``x`` of the layer's shape at batch 1."""
        from graphslim.ir.graph import Graph, SignatureArg

        if cand.data["nchw"]:
            return "NCHW convolutions do not run on this CPU"
        xshape = graph.shape(graph.input(cand.node, 0))
        if xshape is None or any(d is None for d in xshape[1:]):
            return "input shape unknown"
        minis = []
        for factorized in (False, True):
            g = Graph()
            g.add_input("x", graph.dtype(graph.input(cand.node, 0)), (1,) + tuple(xshape[1:]))
            if factorized:
                out = self._emit(g, cand, "x", "layer")
            else:
                k = g.add_weight("kernel", cand.kernel.value)
                out = g.add_node("layer", "Conv2D", ["x", k], attrs=dict(cand.node.attrs))
            g.outputs.append(SignatureArg("y", out.output(0)))
            g.infer_shapes()
            minis.append(g)
        return tuple(minis)

    def rewrite(self, graph, cand: Candidate) -> None:
        """Replace the candidate in place: its node becomes the last factor (keeping its name, so the
        BiasAdd after it is untouched), the old kernel goes if unread, the bias takes the refit shift."""
        node = cand.node
        old_kernel = graph.input(node, 1)
        self._emit(graph, cand, graph.input(node, 0), node.name, reuse=node)
        graph.remove_unused([old_kernel], keep_weights=False)
        if cand.data.get("bias_shift") is not None:
            shift_bias(graph, cand.data["bias"], cand.data["bias_shift"])


def pointwise_conv(g, name: str, inputs, reuse, dtype, strides, data_format: str):
    """The trailing 1x1 Conv2D of a factorization: a new node ``name``, or ``reuse`` (the original
    conv) turned into it."""
    ones = [1, 1, 1, 1]
    if reuse is None:
        return g.add_node(name, "Conv2D", inputs, attrs={
            "T": dtype, "strides": strides, "padding": "VALID", "dilations": ones, "data_format": data_format})
    g.set_inputs(reuse, inputs)
    reuse.set_attr("strides", strides)
    reuse.set_attr("padding", "VALID")
    reuse.set_attr("dilations", ones)
    reuse.attrs.pop("explicit_paddings", None)
    return reuse


def layer_names(node, kernel) -> list[str]:
    """Names a user may call a layer by: its node name, its kernel's name, and the kernel's name without
    ``/kernel`` (the Keras layer name: ``block1_conv2/kernel`` → ``block1_conv2``)."""
    names = [node.name]
    if kernel is not None:
        names += [kernel.name, re.sub(r"/kernel$", "", kernel.name)]
    return names


def _matches(patterns, names) -> str | None:
    for p in patterns:
        if any(fnmatch.fnmatchcase(n, p) for n in names):
            return p
    return None


def derived_name(kernel_name: str, kind: str) -> str:
    """``block1_conv2/kernel`` + ``depthwise`` → ``block1_conv2/depthwise_kernel``; names not ending in
    ``kernel`` get ``_<kind>``."""
    if kernel_name.endswith("/kernel"):
        return kernel_name[: -len("kernel")] + f"{kind}_kernel"
    return f"{kernel_name}_{kind}"


def sibling_name(graph, node_name: str, suffix: str) -> str:
    """A free node name next to ``node_name``: ``scope/conv`` → ``scope/<suffix>``."""
    scope = node_name.rsplit("/", 1)[0] + "/" if "/" in node_name else ""
    return graph.unique_name(scope + suffix)


def shift_bias(graph, bias, shift) -> None:
    """Add ``shift`` (float64) to the bias weight ``bias`` (keeping its dtype and shape)."""
    value = np.asarray(bias.value, np.float64) + np.asarray(shift).reshape(bias.value.shape)
    graph.set_weight(bias.name, value.astype(bias.value.dtype))


def _round(x, digits: int = 6):
    return None if x is None else float(f"{x:.{digits}g}")


def allocate_ranks(layers: dict, target: float) -> tuple[dict, float]:
    """Ranks meeting a MACs budget: ``layers`` maps a key to ``(original MACs, [(rank, MACs, loss)...])``;
    returns ``({key: rank, or None to keep the layer whole}, total MACs reached)``.

    Each layer's options are reduced to the lower convex hull of (MACs saved, loss); then hull steps
    are taken greedily, least loss per MAC saved first, until the total is at most ``target`` (or no
    step is left). Loss is whatever the caller ranks by (here: fraction of energy discarded)."""
    hulls, state, total = {}, {}, 0.0
    for key, (orig, options) in layers.items():
        best: dict = {0.0: (0.0, None)}
        for r, c, loss in options:
            if c < orig:
                x = float(orig - c)
                if x not in best or loss < best[x][0]:
                    best[x] = (float(loss), r)
        hull: list = []
        for x in sorted(best):
            p = (x, *best[x])
            while len(hull) >= 2:
                (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
                if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] not below the chord
                    hull.pop()
                else:
                    break
            hull.append(p)
        hulls[key], state[key] = hull, 0
        total += orig
    while total > target:
        pick, pick_slope = None, None
        for key, hull in hulls.items():
            i = state[key]
            if i + 1 < len(hull):
                slope = (hull[i + 1][1] - hull[i][1]) / (hull[i + 1][0] - hull[i][0])
                if pick_slope is None or slope < pick_slope:
                    pick, pick_slope = key, slope
        if pick is None:
            break
        i = state[pick]
        total -= hulls[pick][i + 1][0] - hulls[pick][i][0]
        state[pick] = i + 1
    return {key: hulls[key][state[key]][2] for key in hulls}, total


def _budget(graph, live, method, opts, data, macs_before):
    """Per-candidate ranks for ``macs=``, from spectra on the original graph (one calibration run)."""
    from graphslim.analysis.calibration import collect

    stats = {}
    if data is not None:
        reqs = {id(c): r for c in live if (r := method.statistics(graph, c, opts)) is not None}
        stats = collect(graph, data, reqs, batch_size=opts.calib_batch)
    layers, fixed = {}, macs_before
    for c in live:
        kept = method.decompose(c, opts, stats.get(id(c)))
        c.data.pop("svd", None)
        before = method.macs(c, 1)[0]
        fixed -= before
        options = []
        for m in range(1, len(kept)):
            after = method.macs(c, m)[1]
            if opts.min_macs_saving is None or 1 - after / before > opts.min_macs_saving:
                options.append((m, after, 1.0 - kept[m]))
        layers[id(c)] = (before, options)
    ranks, reached = allocate_ranks(layers, opts.macs * macs_before - fixed)
    return ranks, (reached + fixed) / macs_before if macs_before else 1.0


def factorize_graph(graph, opts: FactorizeOptions, method: Method):
    """Run ``method`` over ``graph`` in place; return ``(changed, stats)`` for the PassResult.

    Layers are handled one at a time in topological order, so that with calibration data each layer's
    statistics come from the model as already rewritten upstream, and its refit targets the original
    model's output (errors do not compound unseen)."""
    from graphslim.analysis.calibration import collect, load_calibration

    graph.infer_shapes()
    macs_before = graph.cost().macs
    cands = method.candidates(graph)
    for pats, key in ((opts.layers, "layers"), (opts.exclude, "exclude")):
        for p in pats:
            if not any(_matches([p], layer_names(c.node, c.kernel)) for c in cands):
                known = ", ".join(sorted({n for c in cands for n in layer_names(c.node, c.kernel)[1:]}))
                raise PassError(f"{method.name}: {key}= pattern {p!r} matches no candidate layer; the "
                                f"candidates are (by node, kernel or layer name): {known or 'none'}")
    for c in cands:
        if c.skipped:
            continue
        names = layer_names(c.node, c.kernel)
        if opts.layers and not _matches(opts.layers, names):
            c.skip("not selected by layers=")
        elif (p := _matches(opts.exclude, names)) is not None:
            c.skip(f"excluded (exclude={p})")
    live = [c for c in cands if not c.skipped]

    data = reference = None
    if opts.calib is not None and live:
        data = load_calibration(opts.calib, graph, max_examples=opts.calib_samples)
        reference = graph.copy()

    budget = planned = None
    if opts.macs is not None and live:
        budget, planned = _budget(graph, live, method, opts, data, macs_before)
    energy = opts.energy
    if energy is None and opts.rank is None and opts.max_error is None and opts.macs is None:
        energy = DEFAULT_ENERGY

    done = 0
    for c in live:
        if budget is not None and budget[id(c)] is None:
            c.skip(f"kept whole by the macs={opts.macs} budget")
            continue
        stats = None
        if data is not None and (req := method.statistics(graph, c, opts)) is not None:
            stats = collect(graph, data, {0: req}, batch_size=opts.calib_batch)[0]
        kept = method.decompose(c, opts, stats)
        rank = budget[id(c)] if budget is not None else opts.rank
        m = choose_rank(kept, rank=rank, max_error=opts.max_error, energy=energy)
        before, after = method.macs(c, m)
        known = c.data.get("positions_known")
        label, full_label = method.rank_label(c, m, len(kept) - 1)
        c.record.update(rank=label, full_rank=full_label, energy_kept=_round(kept[m]),
                        macs_before=before if known else None, macs_after=after if known else None)
        saving = 1 - after / before if before else 0.0
        c.record["macs_saving"] = _round(saving, 4)
        if opts.min_macs_saving is not None and not saving > opts.min_macs_saving:
            c.skip(f"rank {label} does not save MACs ({before} -> {after} per example)" if saving <= 0 else
                   f"rank {label} saves {saving:.1%} of MACs, not more than min_macs_saving={opts.min_macs_saving}")
            continue
        method.factor(c, m)
        if data is not None and (req := method.refinement(graph, c, opts)) is not None:
            tensor, acc = req
            acc = collect(graph, data, {0: (tensor, tensor, acc)}, reference=reference,
                          batch_size=opts.calib_batch)[0]
            method.refine(c, acc)
        if opts.cost == "latency":
            minis = method.timing_graphs(graph, c)
            if isinstance(minis, str):
                c.skip(f"cannot be timed: {minis}")
                continue
            t = measure_latency({"original": minis[0], "factorized": minis[1]}, runs=opts.latency_runs,
                                runtime=opts.runtime)
            c.record.update(ms_before=_round(t["original"] * 1e3, 4), ms_after=_round(t["factorized"] * 1e3, 4))
            if not t["factorized"] < t["original"] * (1 - opts.min_time_saving):
                c.skip(f"slower when timed on {opts.runtime} ({t['original'] * 1e3:.3g} ms -> "
                       f"{t['factorized'] * 1e3:.3g} ms, batch 1; needs > {opts.min_time_saving:.0%} faster)")
                continue
        method.rewrite(graph, c)
        c.record["action"] = "factorized"
        done += 1
        if data is not None:
            graph.infer_shapes()  # the next layer's calibration runs the rewritten graph
    if done:
        graph.infer_shapes()
    first = ("layer", "op", "action", "reason", "kernel", "kernel_shape")
    records = []
    for c in cands:
        rec = {k: c.record[k] for k in first if k in c.record}
        rec.update((k, v) for k, v in c.record.items() if k not in rec)
        records.append({k: (_round(v) if isinstance(v, float) else v) for k, v in rec.items()})
    stats = {"factorized": done, "skipped": len(cands) - done,
             "macs_before": macs_before, "macs_after": graph.cost().macs if done else macs_before,
             "cost": opts.cost, "calibrated": data is not None}
    if opts.macs is not None:
        stats.update(macs_target=opts.macs, macs_planned=_round(planned, 4) if planned is not None else None)
    stats["layers"] = records
    return bool(done), stats
