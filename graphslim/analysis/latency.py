"""Measured latency: per-layer latency tables of one runtime on this machine, and the latency model that
``prune{latency=...}`` allocates channels against.

A *unit* is one kernel op (a Conv2D, depthwise conv or MatMul whose kernel is a weight and whose
input has a static shape but for the batch) with the chain of per-channel element-wise ops after it
(BiasAdd, batch norm, Mul/Add by a per-channel constant, activations): what the runtime fuses or runs
next to the layer and what shrinks with its output channels. For each unit the table holds its time at
a grid of (input channels, output channels), measured on the runtime that the pruned model will run
on (TensorFlow's graph executor, XLA, LiteRT), batch 1, in graphslim's contained child process, as
interleaved medians. Units with the same configuration (op, attributes, shapes, chain) share a table,
and tables are cached on disk under ``~/.cache/graphslim/latency`` (``$GRAPHSLIM_CACHE`` overrides the
root) per machine, runtime, thread count and graphslim version: a second prune of the same
architecture measures nothing.

:class:`LatencyModel` predicts the latency of the graph with channels removed: the whole model's
measured time, minus its units' times at full width, plus each unit's time at its kept widths (a fit
to its measured grid). What is not in a unit (pooling, residual adds, reshapes) counts as fixed; the
prune pass times the pruned model itself and corrects its target by the measured ratio.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from graphslim.analysis.allocation import WidthModel
from graphslim.errors import GraphslimError
from graphslim.ir import ops
from graphslim.ir.graph import WEIGHT_OP, Graph, SignatureArg, Tensor
from graphslim.sandbox import RUNTIMES

__all__ = ["RUNTIMES", "Unit", "layer_units", "unit_graph", "LatencyTables", "LatencyModel", "cache_root",
           "machine_key", "time_graphs"]

FLAT_SIGMAS = 2.0  # a unit whose fitted width dependence spans less than this many residual standard
# deviations of its table is taken as flat: its time is held constant (:meth:`LatencyTables.flat`)
GRID = (1.0, 0.625, 0.25)  # fractions of each width measured (the fit in LatencyTables.at spans them)
_CHAIN_OPS = frozenset({"BiasAdd", "Relu", "Relu6", "Elu", "Selu", "Sigmoid", "Tanh", "Softplus", "Swish",
                        "LeakyRelu", "Mul", "AddV2", "Add", "Sub", "Maximum", "Minimum", "FusedBatchNormV3",
                        "FusedBatchNorm", "FusedBatchNormV2", "Identity"})
_MAX_CHAIN = 6
_TARGET_SECONDS = 0.01  # each timing call batch runs about this long (a 5 µs LiteRT model: 2000 calls)
_MAX_CALLS = 20000


def _noop(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------ units
@dataclass
class Unit:
    """One kernel op and its element-wise chain. ``keys``: the kernel's (input, output) channel axes
    as ``(weight name, axis)`` (one key for a depthwise conv: its channels are its input's);
    ``config``: what its time depends on besides the widths (JSON-ready)."""

    node: str
    chain: list
    keys: list
    dims: list
    config: dict

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:24]


def _attr_config(node) -> dict:
    out = {}
    for k in sorted(node.attrs):
        if k.startswith("_") or k in ("T", "dtype"):
            continue
        v = node.attr(k)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, (list, tuple)) and all(isinstance(e, (int, float, bool)) for e in v):
            v = list(v)
        elif not isinstance(v, (int, float, str, bool)):
            continue  # dtypes, tensors: not what the time depends on beyond the config's dtype
        out[k] = v
    return out


def _per_channel(graph: Graph, tensor, out_shape, cout: int) -> list | None:
    """The shape of a per-channel constant operand (broadcasting along the output's channel axis only),
    or None when ``tensor`` is not one."""
    src = graph.producer(tensor)
    if src.op not in (WEIGHT_OP, "Const") and any(
            graph.node(n).op in ("Placeholder", "PlaceholderWithDefault") for n in graph.ancestors([src.name])):
        return None  # computed from the inputs; a weight-only expression (Keras's batch norm) is fine
    shape = graph.shape(tensor)
    if shape is None or None in shape or len(shape) > len(out_shape):
        return None
    if any(d not in (1, cout) for d in shape) or sum(d == cout for d in shape) > 1:
        return None
    if cout in shape and len(shape) - 1 - shape.index(cout) != 0:
        return None  # the channel must be the last axis (NHWC, MatMul)
    return list(shape)


def _chain(graph: Graph, node, cout: int) -> list:
    """``[(op, attrs config, [operand shapes or None for the chain input])]`` after ``node``."""
    out, cur = [], node
    while len(out) < _MAX_CHAIN:
        use = graph.sole_consumer(cur.output(0))
        if use is None:
            break
        nxt, port = use
        if nxt.op not in _CHAIN_OPS or graph.control_inputs_of(nxt):
            break
        shape = nxt.shapes[0] if nxt.shapes else None
        if not shape or shape[-1] != cout:
            break
        operands = []
        for p, t in enumerate(graph.inputs_of(nxt)):
            if p == port:
                operands.append(None)
                continue
            pc = _per_channel(graph, t, shape, cout)
            if pc is None:
                return out
            operands.append(pc)
        if nxt.op.startswith("FusedBatchNorm") and nxt.attr("is_training", True):
            break
        out.append((nxt.name, nxt.op, _attr_config(nxt), operands))
        cur = nxt
    return out


def layer_units(graph: Graph) -> list[Unit]:
    """The units of ``graph``, in graph order (see the module docstring)."""
    units = []
    for node in graph.nodes(op=ops.ops_where(linear=True)):
        entry = ops.facts(node.op)
        w = graph.weight_of(node, entry.kernel_port)
        if w is None or node.attr("transpose_a", False):
            continue
        data = graph.input(node, entry.data_ports[0])
        src = graph.producer(data)
        if node.op == "MatMul" and src.op == "Reshape" and len(graph.shape(graph.input(src, 0)) or ()) > 2:
            continue  # tf.tensordot: H·W rows per example, which batch-1 timing of [1, K] would miss
        x = graph.shape(data)
        if x is None or None in x[1:] or ops.channel_axis(node, len(x)) != len(x) - 1:
            continue  # dynamic spatial dims, NCHW: left to the measured remainder
        i, o = ops.kernel_axes(node, w.value.ndim)
        keys = [(w.name, i)] if i == o else [(w.name, i), (w.name, o)]
        dims = [int(w.value.shape[a]) for _, a in keys]
        cout = int(node.shapes[0][-1]) if node.shapes and node.shapes[0] else None
        if cout is None:
            continue
        chain = _chain(graph, node, cout)
        config = {"op": node.op, "attrs": _attr_config(node), "input": [1] + list(x[1:]),
                  "kernel": list(w.value.shape), "dtype": w.value.dtype.name,
                  "chain": [(op, attrs, operands) for _, op, attrs, operands in chain]}
        units.append(Unit(node.name, [c[0] for c in chain], keys, dims, config))
    return units


def unit_graph(unit: Unit, widths: list, null: bool = False) -> Graph:
    """A graph of ``unit`` alone at ``widths`` (input and output channels; one width for a depthwise
    conv): input ``x`` (batch unknown), output ``y``, random weights. ``null``: the same input
    straight to the output (what a call costs without the unit: the runtime's per-call overhead and
    the input's copy, subtracted from the unit's time)."""
    import tensorflow as tf

    cfg = unit.config
    rng = np.random.default_rng(0)
    dtype = np.dtype(cfg["dtype"])
    kernel = list(cfg["kernel"])
    op = cfg["op"]
    node = _Stub(op, cfg["attrs"])
    i, o = ops.kernel_axes(node, len(kernel))
    if len(widths) == 1:
        kernel[i] = widths[0]
    else:
        kernel[i], kernel[o] = widths
    x_shape = list(cfg["input"])
    x_shape[-1] = kernel[i]  # channels last (layer_units keeps only those)
    g = Graph()
    g.add_input("x", tf.as_dtype(dtype), [None] + x_shape[1:])
    if null:
        g.add_node("y", "Identity", ["x"], attrs={"T": tf.as_dtype(dtype)})
        g.outputs.append(SignatureArg("y", Tensor("y", 0)))
        g.infer_shapes()
        return g
    k = g.add_weight("k", (rng.standard_normal(kernel) * 0.05).astype(dtype))
    attrs = {key: value for key, value in cfg["attrs"].items()}
    attrs["T"] = tf.as_dtype(dtype)
    cur = g.add_node("layer", op, ["x", k], attrs=attrs)
    g.infer_shapes()
    cout = cur.shapes[0][-1]
    for n, (chain_op, chain_attrs, operands) in enumerate(cfg["chain"]):
        inputs = []
        for p, shape in enumerate(operands):
            if shape is None:
                inputs.append(cur.output(0))
                continue
            shape = [cout if d != 1 else 1 for d in shape]
            value = (1.0 + 0.01 * rng.standard_normal(shape)).astype(dtype)
            if chain_op.startswith("FusedBatchNorm") and p == 4:
                value = np.abs(value)
            inputs.append(g.add_const(f"c{n}_{p}", value).output(0))
        attrs = dict(chain_attrs)
        attrs["T"] = tf.as_dtype(dtype)
        if chain_op.startswith("FusedBatchNorm"):
            attrs["U"] = tf.as_dtype(dtype)
        cur = g.add_node(f"chain{n}", chain_op, inputs, attrs=attrs)
    g.add_node("y", "Identity", [cur.output(0)], attrs={"T": tf.as_dtype(dtype)})
    g.outputs.append(SignatureArg("y", Tensor("y", 0)))
    g.infer_shapes()
    return g


class _Stub:
    """A node-like view of a unit's config for :func:`graphslim.ir.ops.kernel_axes`."""

    def __init__(self, op: str, attrs: dict):
        self.op, self._attrs = op, attrs

    def attr(self, key, default=None):
        return self._attrs.get(key, default)


def _grid(dim: int, counts: list | None) -> list[int]:
    """Widths measured for an axis of length ``dim``: the fractions of :data:`GRID`, snapped to the
    allowed counts (descending)."""
    pool = counts or list(range(dim, 0, -1))
    return sorted({min(pool, key=lambda c: (abs(c - dim * f), -c)) for f in GRID}, reverse=True)


# ------------------------------------------------------------------------------------------ timing
def cache_root() -> Path:
    base = os.environ.get("GRAPHSLIM_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "graphslim"


def machine_key(runtime: str, threads: int) -> str:
    """What a measured time depends on besides the layer: CPU model, cores, TensorFlow and graphslim
    versions, oneDNN setting, runtime, threads."""
    import tensorflow as tf

    from graphslim.version import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = json.dumps([cpu, os.cpu_count(), tf.__version__, __version__,
                       os.environ.get("TF_ENABLE_ONEDNN_OPTS", ""), runtime, threads])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_timed(child, graph, engine: str, batch: int = 1, inputs: dict | None = None) -> tuple[int, int]:
    """Load ``graph`` into ``child`` on ``engine`` with random inputs of ``batch`` (or ``inputs``, by
    signature input name: token ids must be in the vocabulary) set for timing; returns ``(handle,
    calls)``, calls per timing so that each lasts about ``_TARGET_SECONDS``."""
    import tensorflow as tf

    from graphslim.checks import random_input

    rng = np.random.default_rng(0)
    h = child.load_graph(graph, engine)
    try:
        feed = dict(inputs) if inputs is not None else {
            a.name: random_input(rng, a.name, tf.TensorSpec(graph.shape(a.tensor), graph.dtype(a.tensor)), batch)
            for a in graph.inputs}
        child.run(h, feed)
        child.set_inputs(h, feed)
        once = child.time(h, 1)
        if once < _TARGET_SECONDS / 10:  # a fast model: the first call's warm-up would dominate
            once = child.time(h, int(min(_MAX_CALLS, _TARGET_SECONDS / 10 / max(once, 1e-7))) or 1)
    except BaseException:
        child.release(h)
        raise
    return h, int(min(_MAX_CALLS, max(1, _TARGET_SECONDS / max(once, 1e-7))))


def time_loaded(child, loaded: list, rounds: int = 5, progress: Callable[[str], None] = _noop,
                label: str = "") -> list[float]:
    """Median seconds per call of each ``(handle, calls)`` of :func:`load_timed`, side by side: every
    round times each once, in turn, so that load on the machine hits all alike."""
    times = [[] for _ in loaded]
    for r in range(rounds):
        if label:
            progress(f"{label}: round {r + 1}/{rounds}")
        for i, (h, calls) in enumerate(loaded):
            times[i].append(child.time(h, calls))
    return [statistics.median(t) for t in times]


def time_ratios(child, loaded: list, rounds: int = 9) -> tuple[list, list]:
    """Per-call seconds of each ``(handle, calls)`` of :func:`load_timed` and each one's time as a
    ratio of the first's, side by side: every round times all of them, the order reversed every other
    round; times are medians over rounds and each ratio is the median of the rounds' own ratios, so that
    load which comes and goes between rounds cancels out of it."""
    times = [[] for _ in loaded]
    for r in range(rounds):
        order = range(len(loaded)) if r % 2 == 0 else reversed(range(len(loaded)))
        for i in order:
            h, calls = loaded[i]
            times[i].append(child.time(h, calls))
    ratios = [statistics.median(t / max(b, 1e-12) for t, b in zip(ts, times[0])) for ts in times]
    return [statistics.median(t) for t in times], ratios


def time_pair(child, original, pruned, rounds: int = 9) -> tuple[float, float, float]:
    """``(original seconds, pruned seconds, pruned / original)`` by :func:`time_ratios`."""
    (t0, t1), (_, ratio) = time_ratios(child, [original, pruned], rounds)
    return t0, t1, ratio


def time_graphs(child, graphs: list, engine: str, rounds: int = 5, batch: int = 1,
                progress: Callable[[str], None] = _noop, label: str = "") -> list[float]:
    """Median seconds per call of each graph (random inputs of ``batch``), measured side by side in
    ``child`` (:func:`load_timed`, :func:`time_loaded`); the graphs are released afterwards."""
    loaded = []
    try:
        for g in graphs:
            loaded.append(load_timed(child, g, engine, batch))
        return time_loaded(child, loaded, rounds, progress, label)
    finally:
        for h, _ in loaded:
            child.release(h)


class LatencyTables:
    """Measured unit times ``{unit config key: {"w1,w2": seconds}}`` on one runtime and machine, read from
    and written to the disk cache."""

    def __init__(self, runtime: str, threads: int, cache: bool = True):
        if runtime not in RUNTIMES:
            raise GraphslimError(f"runtime={runtime!r}: unknown runtime; use one of {', '.join(RUNTIMES)}")
        self.runtime, self.threads = runtime, threads
        self.path = cache_root() / "latency" / f"{machine_key(runtime, threads)}.json" if cache else None
        self.times: dict = {}
        self._fits: dict = {}
        self.measured = 0
        if self.path is not None and self.path.is_file():
            try:
                self.times = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.times = {}

    def save(self) -> None:
        if self.path is None:
            return
        from graphslim.fileio import write_text_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.times, sort_keys=True))

    def ensure(self, units: list, counts: dict, child, progress: Callable[[str], None] = _noop) -> None:
        """Measure every grid point of every unit configuration not in the cache. ``counts``: allowed
        keep counts per key (None: any)."""
        wanted = []
        for u in units:
            grids = [_grid(d, counts.get(k)) for k, d in zip(u.keys, u.dims)]
            points = [(a,) for a in grids[0]] if len(grids) == 1 else [(a, b) for a in grids[0] for b in grids[1]]
            wanted.append((u, points))
        self.measure(wanted, child, progress)

    def measure(self, wanted: list, child, progress: Callable[[str], None] = _noop,
                what: str = "layer shape") -> None:
        """Measure the points ``[(unit, [widths, ...]), ...]`` not in the cache (one batch of timings
        per unit configuration, each point less the unit's null graph at the same input width)."""
        todo: dict = {}
        for u, points in wanted:
            have = self.times.get(u.key, {})
            missing = [tuple(p) for p in points if ",".join(map(str, p)) not in have]
            if missing:
                todo.setdefault(u.key, (u, set()))[1].update(missing)
        for n, (key, (unit, points)) in enumerate(todo.items()):
            points = sorted(points, reverse=True)
            label = f"measuring {self.runtime} latency: {what} {n + 1}/{len(todo)} ({unit.node}, " \
                    f"{len(points)} widths)"
            progress(label)
            cins = sorted({p[0] for p in points})
            graphs = [unit_graph(unit, list(p)) for p in points] + [unit_graph(unit, [c] * len(points[0]), null=True)
                                                                  for c in cins]
            medians = time_graphs(child, graphs, RUNTIMES[self.runtime], rounds=3, progress=progress, label=label)
            null = dict(zip(cins, medians[len(points):]))
            slot = self.times.setdefault(key, {})
            for p, t in zip(points, medians):
                slot[",".join(map(str, p))] = max(t - null[p[0]], 0.0)
            self._fits.pop(key, None)
            self.measured += len(points)
            self.save()

    def _fit_of(self, unit: Unit) -> np.ndarray:
        """The unit's time as ``a + b·x + c·y + d·x·y`` (``x``, ``y``: input and output widths; ``a + b·x``
        for one width), fitted to its measured points by least squares with non-negative coefficients:
        a fixed cost per call, costs linear in each width (memory-bound work: the input read, the
        element-wise chain on the output) and one in their product (the multiply-accumulates). Timing
        noise at single points then cannot make a narrower layer look slower."""
        coef = self._fits.get(unit.key)
        if coef is None:
            table = self.times[unit.key]
            pts = np.array([[int(v) for v in k.split(",")] for k in table], dtype=np.float64)
            vals = np.array(list(table.values()), dtype=np.float64)
            coef = _nonneg_lstsq(_features(pts), vals)
            if _within_noise(_features(pts), vals, coef):
                coef = np.zeros_like(coef)
                coef[0] = float(vals.mean())
            self._fits[unit.key] = coef
        return coef

    def flat(self, unit: Unit) -> bool:
        """Whether the unit's measured time does not depend on its widths beyond the timing noise
        (:func:`_within_noise`): the model then holds it at its mean, and pruning it saves nothing."""
        coef = self._fit_of(unit)
        return not np.any(coef[1:])

    def point(self, unit: Unit, widths) -> float | None:
        """The measured time of ``unit`` at ``widths`` (None if that point was not measured)."""
        return self.times.get(unit.key, {}).get(",".join(map(str, widths)))

    def at(self, unit: Unit, widths: list) -> float:
        """The unit's modelled time at ``widths`` (:meth:`_fit_of`)."""
        return float((_features(np.array([widths], dtype=np.float64)) @ self._fit_of(unit))[0])


def _features(pts: np.ndarray) -> np.ndarray:
    if pts.shape[1] == 1:
        return np.column_stack([np.ones(len(pts)), pts[:, 0]])
    x, y = pts[:, 0], pts[:, 1]
    return np.column_stack([np.ones(len(pts)), x, y, x * y])


def _within_noise(a: np.ndarray, b: np.ndarray, coef: np.ndarray) -> bool:
    """Whether the fitted width dependence is lost in the timing noise: the fit's span over the measured
    points is below :data:`FLAT_SIGMAS` times the residual standard deviation (the fit's degrees of
    freedom counted). On TensorFlow's graph executor a small layer's time is per-op overhead, and its
    tables are noise a free fit would read as savings (a narrower layer "faster" by chance); with no
    degree of freedom left the fit is kept."""
    fitted = a @ coef
    dof = len(b) - a.shape[1]
    if dof <= 0:
        return False
    sigma = float(np.sqrt(np.square(b - fitted).sum() / dof))
    return float(fitted.max() - fitted.min()) < FLAT_SIGMAS * sigma


def _nonneg_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin ‖a·c − b‖`` over ``c ≥ 0`` for a handful of columns: the best of the unconstrained fits
    on every subset of columns whose solution is non-negative (exact for ≤ 4 columns)."""
    n = a.shape[1]
    best, best_err = np.zeros(n), float(np.square(b).sum())
    for mask in range(1, 1 << n):
        cols = [i for i in range(n) if mask >> i & 1]
        c, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if np.any(c < 0):
            continue
        full = np.zeros(n)
        full[cols] = c
        err = float(np.square(a @ full - b).sum())
        if err < best_err:
            best, best_err = full, err
    return best


class LatencyModel(WidthModel):
    """Predicted seconds per call of the graph as a function of the channels each group removes: the
    measured whole-model time ``whole``, with each unit's measured full-width time replaced by its time
    at the kept widths (:meth:`LatencyTables.at`)."""

    def __init__(self, units: list, tables: LatencyTables, whole: float, groups, orders: dict):
        self.units, self.tables = units, tables
        terms = [(u, list(u.keys)) for u in units]
        dims = {k: d for u in units for k, d in zip(u.keys, u.dims)}
        self.full = [tables.at(u, u.dims) for u in units]
        super().__init__(terms, dims, max(whole - sum(self.full), 0.0), groups, orders)
        self.whole = whole

    def term_cost(self, i: int, kept: list) -> float:
        return self.tables.at(self.units[i], kept)

    def widths(self, i: int, removed: dict) -> list:
        """Unit ``i``'s widths after ``removed``."""
        return [self.kept(k, removed) for k in self.terms[i][1]]

    def measured_per_group(self, removed: dict) -> dict:
        """Measured seconds saved per group: its units' measured time at full width minus at the widths
        ``removed`` leaves (both points must be in the tables: :meth:`LatencyTables.measure`)."""
        out = {}
        for gid, terms in self.node_groups.items():
            out[gid] = sum(self.tables.point(self.units[i], self.units[i].dims)
                           - self.tables.point(self.units[i], self.widths(i, removed)) for i in terms)
        return out

    def per_group(self, removed: dict) -> dict:
        """Predicted seconds saved per group: its units' time at full width minus at ``removed`` (a unit
        shared by two groups counts in both)."""
        out = {}
        for gid, terms in self.node_groups.items():
            out[gid] = sum(self.full[i] - self.node_cost(i, removed) for i in terms)
        return out




# ------------------------------------------------------------------------------------- allocation
def _next_target(goal: float, tried: list) -> float:
    """The modelled latency ratio to allocate for next: ``goal`` first; then, from the (modelled,
    measured) pairs so far, the secant through the nearest pairs on either side of ``goal`` (the
    measured ratio grows with the modelled one), or a step scaled by goal/measured while all lie on
    one side."""
    if not tried:
        return goal
    below = [p for p in tried if p[1] <= goal]
    above = [p for p in tried if p[1] > goal]
    if below and above:
        (t0, m0), (t1, m1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        if m1 > m0:
            return float(np.clip(t0 + (goal - m0) * (t1 - t0) / (m1 - m0), min(t0, t1), max(t0, t1)))
        return (t0 + t1) / 2
    t, m = min(tried, key=lambda p: abs(p[1] - goal))
    return float(min(t * goal / max(m, 1e-6), 1.0))


BAND = 0.05  # a measured ratio at most the target and no more than this below it ends the search; the
# correction aims at the band's middle, so that another measurement's noise stays under the target
KNEE_ROUNDS = 3  # extra rounds bisecting towards less pruning when the target is out of reach
NOISE = 0.02  # measured ratios this close count as equally fast (the knee search)
KNEE = 0.01  # the last stretch of the modelled latency curve (as a fraction of the model's time) not
# spent: next to the floor (every group at its smallest width) it is bought with most of the importance
MAX_ROUNDS = 5
BY_MACS_ROUNDS = 3  # rounds of the MACs-ordered allocation measured against the latency one (:func:`_by_macs`)
STEP = 0.02  # how far the modelled target moves when the correction repeats an allocation


def _time_allocation(child, graph, original, engine: str, candidates, orders, removal: dict, model, modelled: float,
                     goal: float, n: int, progress, where: str) -> dict:
    """Prune a copy of ``graph`` by ``removal``, time it against the loaded original (a ratio that meets
    ``goal`` is timed a second time and the slower counts: one lucky measurement must not decide), and
    return the round's row."""
    from graphslim.analysis.channels import apply_keeps

    trial = graph.copy()
    apply_keeps(trial, [(g, np.sort(orders[g.id][removal[g.id]:]).tolist()) for g in candidates
                        if removal.get(g.id, 0) > 0])
    progress(f"timing the pruned model {where} (round {n})")
    pruned = load_timed(child, trial, engine)
    try:
        t0, t1, ratio = time_pair(child, original, pruned, rounds=9)
        row = {"round": n, "modelled_target": modelled, "predicted": model.total(removal) / model.total0,
               "measured": ratio, "original_ms": 1e3 * t0, "pruned_ms": 1e3 * t1,
               "removed": {int(gid): int(r) for gid, r in removal.items() if r}}
        if row["measured"] <= goal:
            progress(f"timing the pruned model {where} again (round {n})")
            row["measured_first"] = row["measured"]
            row["measured"] = max(row["measured"], time_pair(child, original, pruned, rounds=9)[2])
    finally:
        child.release(pruned[0])
    return row


def _loss(costs: dict, free: list, removal: dict) -> float:
    """The importance an allocation loses: the sum over the free groups of their cost curves."""
    return float(sum(costs[g.id][removal.get(g.id, 0)] for g in free))


def _by_macs(child, graph, original, engine: str, candidates, free, fixed, counts, costs, orders, model, goal: float,
             best: tuple, rounds: list, progress, where: str) -> tuple:
    """A second allocator, measured like the first: the greedy allocation against MACs (as
    ``prune{macs=}`` makes it), starting at the MACs the latency allocation ``best`` kept and corrected
    by the measured ratio (:func:`_next_target`) for up to :data:`BY_MACS_ROUNDS` rounds. Where the
    latency tables mislead (noise; layers timed alone that the whole model overlaps), this allocation
    can meet the target when the latency one fell short, or meet it losing less importance. It is kept
    when it meets the target and ``best`` did not, or losing less importance than ``best`` (an allocation
    losing as much is then never timed: pruning more by MACs only loses more); when neither meets it,
    when it is faster than ``best`` by more than :data:`NOISE`."""
    from graphslim.analysis.allocation import MacModel, global_allocation

    macs = MacModel(graph, candidates, orders)
    met = best[1]["measured"] <= goal
    to_beat = _loss(costs, free, best[0]) if met else float("inf")
    level = macs.total(best[0]) / macs.total0
    tried, seen = [], set()
    for _ in range(BY_MACS_ROUNDS):
        removal = global_allocation(macs, free, fixed, counts, costs, level * macs.total0)
        key = tuple(sorted(removal.items()))
        if key in seen or _loss(costs, free, removal) >= to_beat:
            break
        seen.add(key)
        row = _time_allocation(child, graph, original, engine, candidates, orders, removal, model, level, goal,
                               len(rounds) + 1, progress, f"{where}, allocated by MACs")
        row["allocator"] = "macs"
        rounds.append(row)
        if row["measured"] <= goal:
            return removal, row
        if not met and row["measured"] < best[1]["measured"] - NOISE:
            best = (removal, row)
        tried.append((level, row["measured"]))
        level = _next_target(goal - BAND / 2, tried)
    return best


def allocate_latency(graph: Graph, candidates: list, free: list, orders: dict, counts: dict, costs: dict,
                     fixed: dict, opts) -> tuple[dict, dict]:
    """``prune{latency=...}``'s allocation: measure the unit tables (cached) and the whole model on
    ``opts.runtime``, allocate against :class:`LatencyModel` (greedy, or uniform with
    ``allocation=uniform``), time the pruned model against the original side by side, and correct the
    modelled target by the measured ratio (aiming at the middle of the band below the target) until the
    measurement meets ``opts.latency`` (at most the target, and within :data:`BAND` of it; a ratio that meets it is timed a second time and the slower
    of the two counts, so one lucky measurement cannot end the search) or :data:`MAX_ROUNDS` rounds pass; the allocation that met
    the target with the least pruning, else the fastest, is kept; with importance costs (``global`` and
    ``sensitivity`` allocation) the MACs-ordered allocation is then measured beside it and kept when it
    meets the target losing less importance (:func:`_by_macs`). Out of reach (the target lies below
    the tables' floor + :data:`KNEE`, where no allocation is aimed), up to :data:`KNEE_ROUNDS` more rounds bisect towards less pruning, and the
    least pruned allocation measured within :data:`NOISE` of the fastest is kept; when even the fastest
    is within :data:`NOISE` of the original (and no group's width was fixed by ``layer=``), that is the
    original itself: nothing is pruned and the stats say ``unpruned``. Returns ``({gid: channels removed},
    stats)``; the stats say predicted and measured ratios per round, whether the target was met and by
    how much it fell short."""
    from dataclasses import replace

    from graphslim.analysis.allocation import global_allocation, uniform_allocation
    from graphslim.pipeline.progress import progress
    from graphslim.sandbox import Child, default_limits

    goal, runtime = opts.latency, opts.runtime
    threads = opts.threads or os.cpu_count() or 1
    engine = RUNTIMES[runtime]
    tables = LatencyTables(runtime, threads)
    units = layer_units(graph)
    cached = sum(1 for u in units if u.key in tables.times)
    rounds, best = [], None
    with Child(replace(default_limits(), threads=threads), label="the model being pruned") as child:
        tables.ensure(units, {}, child, progress)
        progress(f"timing the model on {runtime}")
        original = load_timed(child, graph, engine)  # loaded once (a LiteRT conversion takes seconds)
        whole = time_loaded(child, [original], rounds=7)[0]
        model = LatencyModel(units, tables, whole, candidates, orders)
        flat = sum(1 for u in units if tables.flat(u))
        # The floor: every free group at its smallest allowed width. Below floor + KNEE the modelled
        # curve is flat, so no allocation aims there: a target out of reach ends short of it, not with
        # every layer at min_channels for a saving the measurement cannot see.
        floor_removal = dict(fixed)
        floor_removal.update({g.id: g.size - counts[g.id][-1] for g in free})
        floor = model.total(floor_removal) / model.total0
        lowest = min(floor + KNEE, 1.0)

        def allocate(ratio: float) -> dict:  # the allocation for a modelled latency ratio
            if opts.allocation == "uniform":
                return uniform_allocation(model, free, fixed, counts, ratio * model.total0)
            return global_allocation(model, free, fixed, counts, costs, ratio * model.total0)

        seen, tried = set(), []  # tried: (modelled target, measured ratio)
        for n in range(MAX_ROUNDS):
            modelled = max(_next_target(goal - BAND / 2, tried), lowest)
            for _ in range(8):  # a correction that leads back to an allocation already timed: step on
                removal = allocate(modelled)
                key = tuple(sorted(removal.items()))
                if key not in seen:
                    break
                short = not tried or min(m for _, m in tried) > goal
                modelled = max(modelled - STEP, lowest) if short else min(modelled + STEP, 1.0)
            if key in seen:
                break  # no new allocation within reach of the correction
            seen.add(key)
            row = _time_allocation(child, graph, original, engine, candidates, orders, removal, model, modelled,
                                   goal, n + 1, progress, f"on {runtime}")
            rounds.append(row)
            ok = row["measured"] <= goal
            better = best is None or (ok and (not best[1]["measured"] <= goal
                                              or row["measured"] > best[1]["measured"])) \
                or (not ok and not best[1]["measured"] <= goal and row["measured"] < best[1]["measured"])
            if better:
                best = (removal, row)
            if ok and row["measured"] >= goal - BAND:
                break  # met, and not by pruning much more than asked
            tried.append((row["modelled_target"], row["measured"]))
        if not best[1]["measured"] <= goal and goal < lowest:
            # Out of reach: the fastest allocation may have bought its last few percent (or only noise)
            # with most of the importance. Bisect towards less pruning for the least pruned allocation
            # measured within NOISE of the fastest, and keep that one.
            fastest = best[1]["measured"]
            lo, hi = best[1]["modelled_target"], 1.0
            for k in range(KNEE_ROUNDS):
                mid = (lo + hi) / 2
                removal = allocate(mid)
                key = tuple(sorted(removal.items()))
                if key in seen or not any(removal.get(g.id, 0) for g in free):
                    hi = mid
                    continue
                seen.add(key)
                row = _time_allocation(child, graph, original, engine, candidates, orders, removal, model, mid,
                                       goal, len(rounds) + 1, progress, f"on {runtime}, less pruning")
                row["knee"] = True
                rounds.append(row)
                if row["measured"] <= fastest + NOISE:
                    best, lo = (removal, row), mid
                else:
                    hi = mid
        if costs is not None and (best[1]["measured"] <= goal or goal >= lowest):
            # (a target below the tables' floor is out of reach for MACs too: no rounds chasing it)
            best = _by_macs(child, graph, original, engine, candidates, free, fixed, counts, costs, orders, model,
                            goal, best, rounds, progress, f"on {runtime}")
        fastest = best[1]["measured"]
        if not best[1]["measured"] <= goal and not fixed and fastest >= 1.0 - NOISE:
            # Short, and nothing measured faster than the original beyond the noise: the least pruned
            # allocation as fast as the fastest is the original itself (no channel is worth its importance).
            best = ({}, {"round": None, "modelled_target": 1.0, "predicted": 1.0, "measured": 1.0,
                         "original_ms": best[1]["original_ms"], "pruned_ms": best[1]["original_ms"]})
        removal, row = best
        # The prediction the allocation used, taken before the new points below refit the unit tables
        # (after them, a unit's full-width time and its pruned time would come from different fits).
        saved = model.per_group(removal)
        # Each changed layer timed at its new widths: the measured saving per group beside the predicted.
        final = [(u, [tuple(u.dims), tuple(model.widths(i, removal))]) for i, u in enumerate(units)]
        tables.measure([f for f in final if f[1][0] != f[1][1]], child, progress, what="pruned layer")
    met = row["measured"] <= goal
    if costs is not None:  # the importance each round's allocation loses, as the allocators count it
        for r in rounds:
            r["lost"] = _loss(costs, free, r["removed"])
    measured = model.measured_per_group(removal)
    stats = {"latency": goal, "runtime": runtime, "threads": threads, "allocation": opts.allocation,
             "measured": row["measured"], "predicted": row["predicted"], "speedup": 1.0 / row["measured"],
             "met": met, "shortfall": None if met else row["measured"] - goal, "rounds": rounds,
             "floor": floor, "fastest": fastest, "unpruned": not removal,
             "allocator": row.get("allocator", "latency"),
             "original_ms": row["original_ms"], "pruned_ms": row["pruned_ms"],
             "tables": {"units": len(units), "cached_units": cached, "measured_points": tables.measured,
                        "flat_units": flat,
                        "file": str(tables.path) if tables.path else None},
             "groups": {f"g{gid}": {"removed": int(removal[gid]), "predicted_saved_ms": 1e3 * saved[gid], "measured_saved_ms": 1e3 * measured[gid]}
                        for gid in sorted(saved) if removal.get(gid, 0) > 0}}
    return removal, stats
