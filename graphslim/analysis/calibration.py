"""Calibration data and batched activation statistics (the only analysis that runs the model).

Two halves:

* :func:`load_calibration` reads user data for a graph's signature inputs from a ``.npz`` file or a
  directory of ``.npy`` files keyed by input name, and checks names, shapes and dtypes against the
  graph (a :class:`CalibrationError` names the file and lists the expected inputs otherwise).
* :func:`collect` runs the graph on that data in batches (:class:`graphslim.runtime.Runner`), fetches
  the requested intermediate tensors and feeds each batch to an *accumulator*. Accumulators keep
  fixed-size running sums (per-channel moments, input-patch second moments at sampled spatial
  positions, least-squares normal equations), so memory is bounded by one batch of the fetched
  tensors, never by the data set. Tensors are fetched in groups whose batch fits ``max_bytes``.

Any object with ``update(value: np.ndarray)`` is an accumulator; the built-in ones:

==========================  ===============================================================================
:class:`ChannelMoments`     per channel: count, mean, second moment, variance, mean |x|, fraction of zeros
:class:`FeatureMoments`     mean and second-moment matrix of the channel vectors (rows sampled per batch)
:class:`PatchMoments`       for a convolution's input: per-channel K·K patch second moments (optionally
                            the full (K·K·C)² matrix) at sampled output positions
:class:`Regression`         normal equations FᵀF, FᵀT, ‖T‖² of features/targets of a layer's input rows
                            (patches or channel vectors), optionally against a reference model
==========================  ===============================================================================

Patch vectors are ordered like a reshaped HWIO kernel: ``p[(kh·KW + kw)·C + c]``, so that
``patches @ kernel.reshape(-1, Cout)`` is the convolution's output at the sampled positions.

Example::

    from graphslim.analysis.calibration import ChannelMoments, PatchMoments, ConvGeometry, collect, load_calibration

    data = load_calibration("calib.npz", g)             # {"image": array [N, 224, 224, 3]}
    conv = g.node("block1_conv2/convolution")
    stats = collect(g, data, {
        "relu": ("block1_conv1/Relu:0", ChannelMoments()),
        "patches": (g.input(conv, 0), PatchMoments(ConvGeometry.of(g, conv), positions=64)),
    }, batch_size=16)
    stats["relu"].zero_fraction                          # per-channel APoZ
    stats["patches"].channel_second_moments              # [C, 9, 9]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Mapping

import numpy as np

from graphslim.errors import GraphslimError

__all__ = ["CalibrationError", "ChannelMoments", "ConvGeometry", "FeatureMoments", "PatchMoments",
           "Regression", "collect", "describe_inputs", "extract_patches", "iterate_batches",
           "load_calibration", "load_class_ids", "patch_index"]


class CalibrationError(GraphslimError):
    """Calibration data is missing, unreadable, or does not fit the model's signature inputs."""


# ------------------------------------------------------------------------------------------ loading
def _input_specs(graph) -> list[tuple[str, tuple | None, np.dtype]]:
    specs = []
    for arg in graph.inputs:
        dtype = graph.dtype(arg.tensor)
        specs.append((arg.name, graph.shape(arg.tensor), np.dtype(dtype.as_numpy_dtype)))
    return specs


def describe_inputs(graph) -> str:
    """The signature inputs as text for messages: ``image: [N, 8, 8, 1] float32; meta: [N, 4] float32``."""
    parts = []
    for name, shape, dtype in _input_specs(graph):
        dims = "?" if shape is None else "[" + ", ".join(
            "N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(shape)) + "]"
        parts.append(f"{name}: {dims} {dtype.name}")
    return "; ".join(parts)


def _read_arrays(path: Path, expected: list[str]) -> dict[str, np.ndarray]:
    how = ("a .npz file (np.savez(path, **{name: array})) or a directory of .npy files named "
           "<input name>.npy")
    if not path.exists():
        raise CalibrationError(f"calibration data {path} does not exist; give {how}")
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise CalibrationError(f"calibration directory {path} holds no .npy files; expected "
                                       f"{', '.join(n + '.npy' for n in expected)}")
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if path.suffix == ".npy":
            return {path.stem: np.load(path, allow_pickle=False)}
    except CalibrationError:
        raise
    except Exception as exc:  # corrupt file, pickled objects, ...
        raise CalibrationError(f"cannot read calibration data {path}: {type(exc).__name__}: {exc}") from exc
    raise CalibrationError(f"calibration data {path} is neither a .npz/.npy file nor a directory; give {how}")


def load_calibration(spec, graph, *, max_examples: int | None = None) -> dict[str, np.ndarray]:
    """Calibration inputs for ``graph``'s signature: ``{input name: array [N, ...]}``.

    ``spec`` is a ``.npz`` file keyed by input name, a directory of ``<input name>.npy`` files, a
    single ``.npy`` file (single-input models), or a mapping of arrays. Arrays that name no input are
    ignored (a ``.npz`` may also hold labels); a model with one input also accepts a file holding
    exactly one array under any name. Each array must match the input's static shape (batch axis
    free) and have a numeric dtype castable to the input's; all inputs need the same number of
    examples. ``max_examples`` keeps the first N. Raises :class:`CalibrationError` naming the file,
    the expected inputs with shapes, and what the file holds.

    Example::

        np.savez("calib.npz", image=x_train[:256])
        data = load_calibration("calib.npz", g)       # {"image": float32 [256, 8, 8, 1]}
    """
    specs = _input_specs(graph)
    expected = [s[0] for s in specs]
    if isinstance(spec, Mapping):
        source, arrays = "the calibration data", {str(k): np.asarray(v) for k, v in spec.items()}
    else:
        path = Path(spec)
        source, arrays = str(path), _read_arrays(path, expected)
    want = describe_inputs(graph)
    held = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in arrays.items()) or "nothing"
    if not expected:
        raise CalibrationError("the model has no signature inputs to calibrate")
    picked = {n: arrays[n] for n in expected if n in arrays}
    if len(picked) < len(expected):
        if len(expected) == 1 and len(arrays) == 1 and not picked:
            picked = {expected[0]: next(iter(arrays.values()))}
        else:
            missing = [n for n in expected if n not in picked]
            raise CalibrationError(
                f"{source} has no array for input(s) {', '.join(missing)}; the model expects {want}, "
                f"the file holds {held}")
    out, count = {}, None
    for name, shape, dtype in specs:
        a = picked[name]
        if shape is not None:
            ok = a.ndim == len(shape) and all(d is None or d == s for d, s in zip(shape[1:], a.shape[1:]))
            if not ok:
                raise CalibrationError(
                    f"{source}: array {name!r} has shape {list(a.shape)}, which does not fit the input "
                    f"(the model expects {want}; axis 0 is the example axis)")
        if a.dtype.kind not in "biuf" or (dtype.kind in "iu" and a.dtype.kind == "f") or a.dtype.kind == "c":
            raise CalibrationError(f"{source}: array {name!r} has dtype {a.dtype}, not castable to the "
                                   f"input's {dtype.name} (the model expects {want})")
        if a.ndim == 0 or a.shape[0] == 0:
            raise CalibrationError(f"{source}: array {name!r} holds no examples (the model expects {want})")
        if count is not None and a.shape[0] != count:
            raise CalibrationError(f"{source}: inputs have different numbers of examples "
                                   f"({held}); every input needs one row per example")
        count = a.shape[0]
        out[name] = np.ascontiguousarray(a[:max_examples] if max_examples else a, dtype=dtype)
    return out


def load_class_ids(path, key: str, count: int, need: str, what: str) -> np.ndarray:
    """The integer array ``key`` of a calibration file (a ``.npz``, or ``KEY.npy`` in a directory): one
    class id per example (shape ``[count]``). CalibrationError starts with ``what`` (the option and
    the file) and ends with ``need`` (what the array must hold)."""
    p = Path(path)
    try:
        if p.is_dir():
            f = p / f"{key}.npy"
            if not f.is_file():
                raise CalibrationError(f"{what}: no {key}.npy in the directory; it needs {need}")
            y = np.load(f, allow_pickle=False)
        else:
            with np.load(p, allow_pickle=False) as z:
                if key not in z.files:
                    raise CalibrationError(f"{what}: no array {key!r} (the file holds "
                                           f"{', '.join(z.files) or 'nothing'}); it needs {need}")
                y = z[key]
    except CalibrationError:
        raise
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{what}: cannot read {key!r}: {exc}") from exc
    if y.dtype.kind not in "iu" or y.shape != (count,):
        raise CalibrationError(f"{what}: {key!r} is {y.dtype} {list(y.shape)}; it needs {need}")
    return y.astype(np.int64)


def iterate_batches(data: Mapping[str, np.ndarray], batch_size: int):
    """Yield ``{name: array[i:i + batch_size]}`` over the examples of ``data``."""
    n = len(next(iter(data.values())))
    for start in range(0, n, max(1, int(batch_size))):
        yield {k: v[start:start + batch_size] for k, v in data.items()}


# ------------------------------------------------------------------------------------------ running
def _bytes_per_example(graph, tensor) -> int | None:
    shape = graph.shape(tensor)
    if shape is None or any(d is None for d in shape[1:]):
        return None
    return math.prod(shape[1:]) * graph.dtype(tensor).size


def collect(graph, data: Mapping[str, np.ndarray],
            requests: Mapping[Hashable, tuple], *, reference=None, batch_size: int = 32,
            max_bytes: int = 256 << 20) -> dict:
    """Run ``graph`` on ``data`` in batches; feed each requested tensor's batch to its accumulator.

    ``requests`` maps a key to ``(tensor, accumulator)``; the tensor is a :class:`Tensor`, ``"node:port"``
    or a node. With a ``reference`` graph (e.g. the original model while ``graph`` is being rewritten),
    a request is ``(tensor, reference tensor, accumulator)`` and the accumulator gets
    ``update(value, reference_value)`` for the same examples. Returns ``{key: accumulator}``.

    Memory: tensors are fetched in groups so that one batch of a group fits ``max_bytes`` (each group
    re-runs the graph for that batch); a single tensor larger than that lowers the batch size.

    Example::

        stats = collect(g, data, {"c1": ("conv1/Relu:0", ChannelMoments())}, batch_size=64)
        stats["c1"].mean
    """
    from graphslim.ir.graph import as_tensor
    from graphslim.runtime import Runner

    if not requests:
        return {}
    items = []
    for key, req in requests.items():
        if reference is None:
            t, acc = req
            items.append((key, as_tensor(t), None, acc))
        else:
            t, rt, acc = req
            items.append((key, as_tensor(t), as_tensor(rt), acc))
    sizes = {}
    for _, t, rt, _ in items:
        sizes[("g", str(t))] = _bytes_per_example(graph, t)
        if rt is not None:
            sizes[("r", str(rt))] = _bytes_per_example(reference, rt)
    largest = max((s or 0) for s in sizes.values())
    if largest:
        batch_size = max(1, min(batch_size, max_bytes // (2 * largest if reference is not None else largest)))
    budget = max(max_bytes, largest * batch_size * (2 if reference is not None else 1))
    # group requests (with their reference tensors) so that one batch of a group fits the budget
    groups: list[list] = []
    used = 0
    for item in items:
        _, t, rt, _ = item
        size = ((sizes[("g", str(t))] or budget) + (sizes.get(("r", str(rt)), 0) or 0)) * batch_size
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += size
    runner = Runner(graph)
    ref_runner = Runner(reference) if reference is not None else None
    try:
        for batch in iterate_batches(data, batch_size):
            for group in groups:
                values = runner.run(batch, fetch=list(dict.fromkeys(str(t) for _, t, _, _ in group)))
                refs = {}
                if ref_runner is not None:
                    refs = ref_runner.run(batch, fetch=list(dict.fromkeys(str(rt) for _, _, rt, _ in group)))
                for _, t, rt, acc in group:
                    if rt is None:
                        acc.update(values[str(t)])
                    else:
                        acc.update(values[str(t)], refs[str(rt)])
                del values, refs
    finally:
        runner.close()
        if ref_runner is not None:
            ref_runner.close()
    return {key: acc for key, _, _, acc in items}


def through_identity(graph, tensor: str) -> str:
    """``tensor``, or what it copies through Identity/StopGradient."""
    node = graph.producer(tensor)
    while node.op in ("Identity", "StopGradient") and graph.inputs_of(node):
        tensor = str(graph.input(node, 0))
        node = graph.producer(tensor)
    return tensor


def output_logits(graph, tensor: str) -> tuple[str, str]:
    """(kind, tensor) of a signature output (looking through Identity/StopGradient): a Softmax output's
    logits (``kl``), a Sigmoid's (``bce``), else the tensor itself (``l2``)."""
    tensor = through_identity(graph, tensor)
    node = graph.producer(tensor)
    if node.op == "Softmax":
        return "kl", str(graph.input(node, 0))
    if node.op == "Sigmoid":
        return "bce", str(graph.input(node, 0))
    return "l2", tensor


def collect_gradients(graph, data: Mapping[str, np.ndarray], requests: Mapping[Hashable, tuple], *,
                      batch_size: int = 32, allow_ops=None) -> dict:
    """Run ``graph`` on ``data`` in batches with gradients (the execution child's trainer engine, after
    the same safety scan as :func:`collect`). ``requests`` maps a key to ``(tensor, axis, accumulator)``;
    per batch the accumulator gets ``update(v)`` with ``v[n, i] = Σ ∂L/∂a · a`` over every axis of
    example ``n``'s activation ``a`` but ``axis`` (the derivative of L with respect to a mask multiplying
    position ``i`` of ``axis``). L is the summed cross-entropy of the first signature output's logits
    (before its Softmax, if any) against the model's own predicted classes: no labels needed (the
    empirical Fisher of Kwon et al. 2022). Returns ``{key: accumulator}``.

    Example::

        got = collect_gradients(g, data, {"c1": ("conv1/Relu:0", 3, MaskGradients())})
        fisher = np.square(got["c1"].values).sum(0)
    """
    from graphslim.io.scan import check_safe
    from graphslim.ir.graph import as_tensor
    from graphslim.sandbox import shared_child

    if not requests:
        return {}
    check_safe(graph, allow_ops=graph.meta.get("allowed_ops", ()) if allow_ops is None else allow_ops)
    logits = output_logits(graph, str(graph.outputs[0].tensor))[1]
    wanted = list(dict.fromkeys((str(as_tensor(t)), int(axis)) for t, axis, _ in requests.values()))
    child = shared_child(f"the model {graph.meta.get('source', '')}".rstrip())
    handle = child.load_trainer(graph, [], [])
    try:
        for batch in iterate_batches(data, batch_size):
            values = dict(zip(wanted, child.grad_products(handle, dict(batch), logits, wanted)))
            for t, axis, acc in requests.values():
                acc.update(values[(str(as_tensor(t)), int(axis))])
    finally:
        child.drop(handle)
    return {key: acc for key, (_, _, acc) in requests.items()}


class MaskGradients:
    """Keeps the per-example mask derivatives of :func:`collect_gradients` mapped to channels:
    ``values[n, c]`` sums the positions of channel ``c`` (``index_map``; every position its own channel
    without one). The Fisher importance of channel ``c`` is ``Σ_n values[n, c]²``, after the parts of one
    mask (several tensors reading the same channels) are added per example."""

    def __init__(self, index_map=None):
        self.index_map = index_map
        self._parts: list = []

    def update(self, value: np.ndarray) -> None:
        v = np.asarray(value, np.float64)
        if self.index_map is not None:
            rows = self.index_map.rows
            valid = rows >= 0
            v = (v[:, np.where(valid, rows, 0)] * valid).sum(axis=2)
        self._parts.append(v)

    @property
    def count(self) -> int:
        return sum(len(p) for p in self._parts)

    @property
    def values(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros((0, 0))


# ------------------------------------------------------------------------------------------ accumulators
class ChannelMoments:
    """Per-channel running count, mean, second moment, variance, mean |x| and fraction of zeros.

    ``axis`` is the channel axis of the fetched tensor (-1 for NHWC and dense, 1 for NCHW).
    """

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.count = 0
        self.sum = self.sum_sq = self.sum_abs = self.zeros = None

    def update(self, value: np.ndarray) -> None:
        x = np.moveaxis(np.asarray(value, np.float64), self.axis, -1).reshape(-1, np.shape(value)[self.axis])
        if self.sum is None:
            c = x.shape[1]
            self.sum, self.sum_sq, self.sum_abs, self.zeros = (np.zeros(c) for _ in range(4))
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_sq += np.square(x).sum(0)
        self.sum_abs += np.abs(x).sum(0)
        self.zeros += (x == 0).sum(0)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def second_moment(self) -> np.ndarray:
        return self.sum_sq / max(self.count, 1)

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.second_moment - self.mean ** 2, 0.0)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sum_abs / max(self.count, 1)

    @property
    def zero_fraction(self) -> np.ndarray:
        return self.zeros / max(self.count, 1)


class FeatureMoments:
    """Mean and second-moment matrix E[x xᵀ] of the channel vectors of a tensor.

    Every position (all axes but ``axis``) is one row; at most ``max_rows`` rows per batch are kept,
    sampled uniformly (seeded). For a dense layer's input this is the input covariance; for a 1×1
    convolution's input, that of its pixels.
    """

    def __init__(self, axis: int = -1, max_rows: int | None = 4096, seed: int = 0):
        self.axis, self.max_rows = axis, max_rows
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.sum = self.xx = None

    def update(self, value: np.ndarray) -> None:
        v = np.asarray(value)
        x = np.moveaxis(v, self.axis, -1).reshape(-1, v.shape[self.axis])
        if self.max_rows and x.shape[0] > self.max_rows:
            x = x[self.rng.choice(x.shape[0], self.max_rows, replace=False)]
        x = x.astype(np.float64)
        if self.sum is None:
            self.sum, self.xx = np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.xx += x.T @ x

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def second_moment(self) -> np.ndarray:
        return self.xx / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        m = self.mean
        return self.second_moment - np.outer(m, m)


@dataclass(frozen=True)
class ConvGeometry:
    """Where a 2-D convolution reads its input: kernel size, strides, dilations, padding, layout.

    ``padding`` is ``SAME``, ``VALID`` or ``EXPLICIT`` (then ``explicit`` = top, bottom, left, right).
    Padding amounts depend on the input size and follow TensorFlow's rules (:meth:`pads`).
    """

    kh: int
    kw: int
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    explicit: tuple[int, int, int, int] = (0, 0, 0, 0)
    nchw: bool = False

    @classmethod
    def of(cls, graph, node) -> "ConvGeometry":
        """The geometry of a Conv2D / DepthwiseConv2dNative node (kernel shape from its input 1)."""
        nchw = node.attr("data_format", "NHWC").startswith("NC")
        h, w = (2, 3) if nchw else (1, 2)
        strides = node.attr("strides", [1, 1, 1, 1])
        dil = node.attr("dilations", [1, 1, 1, 1]) or [1, 1, 1, 1]
        kshape = graph.shape(graph.input(node, 1))
        padding = node.attr("padding", "VALID")
        explicit = (0, 0, 0, 0)
        if padding == "EXPLICIT":
            p = list(node.attr("explicit_paddings", []))
            explicit = (p[2 * h], p[2 * h + 1], p[2 * w], p[2 * w + 1])
        return cls(int(kshape[0]), int(kshape[1]), (int(strides[h]), int(strides[w])),
                   (int(dil[h]), int(dil[w])), padding, tuple(int(v) for v in explicit), nchw)

    @property
    def effective(self) -> tuple[int, int]:
        """The dilated kernel's extent (kh-1)·dh+1, (kw-1)·dw+1."""
        return ((self.kh - 1) * self.dilations[0] + 1, (self.kw - 1) * self.dilations[1] + 1)

    def pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding for an h×w input, as TensorFlow computes it."""
        if self.padding == "EXPLICIT":
            return self.explicit
        if self.padding == "VALID":
            return (0, 0, 0, 0)
        out = []
        for size, s, k in ((h, self.strides[0], self.effective[0]), (w, self.strides[1], self.effective[1])):
            o = -(-size // s)
            total = max((o - 1) * s + k - size, 0)
            out += [total // 2, total - total // 2]
        return tuple(out)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        pt, pb, pl, pr = self.pads(h, w)
        eh, ew = self.effective
        return ((h + pt + pb - eh) // self.strides[0] + 1, (w + pl + pr - ew) // self.strides[1] + 1)


def patch_index(shape, geo: ConvGeometry, positions: int | None = None,
                rng: np.random.Generator | None = None) -> tuple:
    """Which output positions :func:`extract_patches` takes for an input of ``shape`` (a batch):
    ``(example index, output row, output column)`` arrays; ``positions`` per example sampled uniformly
    without replacement (all when None or when there are fewer), else all, example- and row-major."""
    b = shape[0]
    h, w = (shape[2], shape[3]) if geo.nchw else (shape[1], shape[2])
    oh, ow = geo.out_size(h, w)
    total = oh * ow
    if positions is None or positions >= total:
        idx = np.tile(np.arange(total), b)
    else:
        rng = rng or np.random.default_rng(0)
        idx = np.concatenate([rng.choice(total, positions, replace=False) for _ in range(b)])
    return np.repeat(np.arange(b), len(idx) // b), idx // ow, idx % ow


def extract_patches(x: np.ndarray, geo: ConvGeometry, positions: int | None = None,
                    rng: np.random.Generator | None = None, index: tuple | None = None) -> np.ndarray:
    """Input patches ``[n, KH, KW, C]`` of a convolution at output positions of ``x`` (a batch).

    The positions are ``index`` (from :func:`patch_index`) or sampled like it: without ``positions``
    every position is taken, example-major and row-major, so that
    ``patches.reshape(n, -1) @ kernel.reshape(-1, Cout)`` is the convolution output flattened.
    ``x`` is NCHW when the geometry says so.
    """
    if index is None:
        index = patch_index(x.shape, geo, positions, rng)
    if geo.nchw:
        x = np.transpose(x, (0, 2, 3, 1))
    _, h, w, _ = x.shape
    n_idx, orow, ocol = index
    pt, pb, pl, pr = geo.pads(h, w)
    if pt or pb or pl or pr:
        x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    rows = (orow * geo.strides[0])[:, None] + np.arange(geo.kh)[None, :] * geo.dilations[0]
    cols = (ocol * geo.strides[1])[:, None] + np.arange(geo.kw)[None, :] * geo.dilations[1]
    return x[n_idx[:, None, None], rows[:, :, None], cols[:, None, :], :]


class PatchMoments:
    """Second moments of a convolution's input patches at sampled output positions.

    Always: per input channel ``c`` the K·K×K·K matrix E[p_c p_cᵀ] (``channel_second_moments``,
    shape [C, K·K, K·K]) and mean patch (``channel_means``, [C, K·K]); memory C·K⁴. With ``full=True``
    also E[p pᵀ] over the whole K·K·C patch vector (``second_moment``), memory (K·K·C)²: ask for it
    only for small layers. ``positions`` output positions are sampled per example (None: all).
    """

    def __init__(self, geometry: ConvGeometry, positions: int | None = 64, full: bool = False, seed: int = 0):
        self.geo, self.positions, self.full = geometry, positions, full
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.blocks = self.sums = self.xx = None

    def update(self, value: np.ndarray) -> None:
        p = extract_patches(np.asarray(value), self.geo, self.positions, self.rng)
        n, kh, kw, c = p.shape
        p = p.reshape(n, kh * kw, c).astype(np.float64)
        if self.blocks is None:
            self.blocks = np.zeros((c, kh * kw, kh * kw))
            self.sums = np.zeros((c, kh * kw))
            if self.full:
                self.xx = np.zeros((kh * kw * c,) * 2)
        self.count += n
        self.blocks += np.einsum("nkc,nlc->ckl", p, p, optimize=True)
        self.sums += p.sum(0).T
        if self.full:
            flat = p.reshape(n, -1)
            self.xx += flat.T @ flat

    @property
    def channel_second_moments(self) -> np.ndarray:
        return self.blocks / max(self.count, 1)

    @property
    def channel_means(self) -> np.ndarray:
        return self.sums / max(self.count, 1)

    @property
    def second_moment(self) -> np.ndarray:
        if self.xx is None:
            raise ValueError("PatchMoments(full=False) keeps only the per-channel blocks")
        return self.xx / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        """The mean patch vector in kernel order ``(kh·KW + kw)·C + c``."""
        return self.channel_means.T.reshape(-1)


class Regression:
    """Normal equations of a least-squares fit whose rows are a layer's input vectors.

    Rows are input patches of a convolution (``geometry`` given: ``P [n, K·K·C]`` in kernel order at
    ``positions`` sampled output positions per example) or, without geometry, the channel vectors
    along ``axis`` (a dense layer's input rows). Per batch, ``F = features(rows)`` and
    ``T = targets(reference rows)`` accumulate ``FᵀF`` (``ff``), ``FᵀT`` (``ft``), ``‖T‖²`` (``tt``)
    and the row count. The reference rows are taken at the same positions from ``update``'s second
    argument (default: the same tensor), which fits a rewritten layer's *current* input to the
    *original* model's output. ``residual(B)`` is then the mean squared error ‖T − F·B‖²/n.
    """

    def __init__(self, features: Callable[[np.ndarray], np.ndarray], targets: Callable[[np.ndarray], np.ndarray],
                 geometry: ConvGeometry | None = None, axis: int = -1, positions: int | None = 64, seed: int = 0):
        self.features, self.targets, self.geo, self.axis, self.positions = features, targets, geometry, axis, positions
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.ff = self.ft = None
        self.tt = 0.0

    def _rows(self, value, index):
        if self.geo is not None:
            p = extract_patches(value, self.geo, index=index)
            return p.reshape(p.shape[0], -1).astype(np.float64)
        v = np.moveaxis(value, self.axis, -1)
        return v.reshape(-1, v.shape[-1]).astype(np.float64)

    def update(self, value: np.ndarray, reference: np.ndarray | None = None) -> None:
        value = np.asarray(value)
        reference = value if reference is None else np.asarray(reference)
        index = patch_index(value.shape, self.geo, self.positions, self.rng) if self.geo is not None else None
        f = self.features(self._rows(value, index))
        t = self.targets(self._rows(reference, index))
        if self.ff is None:
            self.ff, self.ft = np.zeros((f.shape[1],) * 2), np.zeros((f.shape[1], t.shape[1]))
        self.count += f.shape[0]
        self.ff += f.T @ f
        self.ft += f.T @ t
        self.tt += float(np.square(t).sum())

    def residual(self, b: np.ndarray) -> float:
        """Mean squared error per row of predicting the targets as ``F @ b``."""
        err = self.tt - 2.0 * float(np.sum(b * self.ft)) + float(np.sum(b * (self.ff @ b)))
        return max(err, 0.0) / max(self.count, 1)

    @property
    def target_power(self) -> float:
        """Mean ‖T‖² per row (the denominator of a relative error)."""
        return self.tt / max(self.count, 1)
