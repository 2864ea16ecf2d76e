"""``graphslim.compare`` and ``graphslim.bench``: run SavedModels side by side, as library calls.

The CLI's ``verify`` and ``bench`` only format what these return (the same dicts their ``--json``
prints), so build systems call them without a subprocess::

    import graphslim
    result = graphslim.compare("model/", "model_slim/", rtol=1e-4)      # result["ok"], result["outputs"]
    timing = graphslim.bench(["model/", "model_slim/"], rounds=9)       # timing["models"][i]["speedup"]
    timing = graphslim.bench(["model/"], runtimes=("tf", "litert"))    # a row per model and runtime

Both *execute* the models, and only in a contained child process (:mod:`graphslim.sandbox`:
Landlock, memory and CPU limits, a wall-clock timeout): each model as graphslim reads it (after the
safety scan, weights from the checkpoint reader), never the input's own restore code. With
``trusted=True`` :func:`compare` lets TensorFlow's own loader run both models instead (still in the
child): an independent check of graphslim's reader, for models you trust.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from graphslim.errors import ConversionError, GraphslimError, LoadError
from graphslim.sandbox import RUNTIMES

__all__ = ["RUNTIMES", "bench", "compare", "compare_arrays", "random_input", "read_inputs", "runtime_list",
           "saved_model_dir"]

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


def _noop(_: str) -> None:
    pass


def saved_model_dir(path, command: str = "verify") -> Path:
    """The SavedModel directory ``path`` names (the directory, or its saved_model.pb)."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory. {command} runs SavedModel directories (the "
                        "folders holding saved_model.pb and variables/).")
    if path.is_file():
        if path.name in SAVED_MODEL_FILES:
            return path.parent
        raise LoadError(f"{path} is a file, not a SavedModel directory; {command} runs SavedModels only. "
                        f"A frozen GraphDef can be converted first: graphslim optimize {path} -o DIR")
    if not any((path / f).exists() for f in SAVED_MODEL_FILES):
        raise LoadError(f"{path}: not a SavedModel directory: it has no saved_model.pb. {command} "
                        "runs SavedModel directories.")
    return path


def random_input(rng, name: str, spec, batch: int, warn: Callable[[str], None] = _noop):
    """Random values for a signature input (``spec``: a ``tf.TensorSpec``); unknown dimensions
    become ``batch`` (the first) or 1 (with a warning)."""
    dims = spec.shape.as_list() if spec.shape.rank is not None else None
    if dims is None:
        warn(f"input '{name}' has unknown rank; using shape [{batch}]")
        dims = [None]
    shape = []
    for axis, dim in enumerate(dims):
        if dim is None:
            if axis == 0:
                dim = batch
            else:
                warn(f"input '{name}' has unknown dimension {axis}; using 1")
                dim = 1
        shape.append(dim)
    dtype = spec.dtype
    if dtype.is_floating:
        return rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
    if dtype.is_bool:
        return rng.random(shape) < 0.5
    if dtype.is_integer:
        return rng.integers(0, 10, size=shape).astype(dtype.as_numpy_dtype)
    raise GraphslimError(f"cannot make random values for input '{name}' of type {dtype.name}; give "
                         "the inputs with --inputs data.npz")


def read_inputs(path, specs: dict) -> dict:
    """Arrays for every input of ``specs`` from a .npz keyed by input name (or ``input:NAME``)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise GraphslimError(f"--inputs {path}: no such file") from None
    except Exception as exc:
        raise GraphslimError(f"--inputs {path}: cannot read it as a .npz file ({exc})") from exc
    with data:
        keys = list(data.keys())
        values = {}
        for name in specs:
            for key in (name, f"input:{name}"):
                if key in keys:
                    values[name] = data[key]
                    break
            else:
                raise GraphslimError(f"--inputs {path} has no array for input '{name}'; it has "
                                     f"{', '.join(repr(k) for k in keys) or 'nothing'}. Key the "
                                     f"arrays by the signature's input names: "
                                     f"{', '.join(sorted(specs))}")
    return values


def compare_arrays(name: str, a, b, rtol: float, atol: float) -> dict:
    """One output's row: shapes, dtypes, max abs/rel error, ok (``|b - a| <= atol + rtol * |a|``),
    top-1 agreement over the last axis."""
    row = {"name": name,
           "shape_a": None if a is None else list(a.shape),
           "shape_b": None if b is None else list(b.shape),
           "dtype_a": None if a is None else str(a.dtype),
           "dtype_b": None if b is None else str(b.dtype),
           "compared": False, "ok": None, "max_abs_error": None, "max_rel_error": None,
           "top1_agreement": None}
    if a is None or b is None:
        row["status"] = "only in B" if a is None else "only in A"
        return row
    if a.shape != b.shape:
        row["status"] = "shape differs"
        return row
    row["compared"] = True
    numeric = all(np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_ for x in (a, b))
    if not numeric:
        row["ok"] = bool(np.array_equal(a, b))
    else:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        diff = np.abs(a64 - b64)
        if diff.size:
            row["max_abs_error"] = float(np.max(diff))
            ref = np.abs(a64)
            nonzero = ref > 0
            rel = diff[nonzero] / ref[nonzero]
            row["max_rel_error"] = float(np.max(rel)) if rel.size else (
                0.0 if row["max_abs_error"] == 0 else float("inf"))
        else:
            row["max_abs_error"] = row["max_rel_error"] = 0.0
        row["ok"] = bool(np.allclose(b64, a64, rtol=rtol, atol=atol, equal_nan=True))
        if a.ndim >= 2 and a.shape[-1] > 1 and a.size:
            row["top1_agreement"] = float(np.mean(np.argmax(a64, axis=-1) == np.argmax(b64, axis=-1)))
    row["status"] = "ok" if row["ok"] else "MISMATCH"
    return row


def saved_for_xla(path: Path) -> bool:
    """Whether the SavedModel has a function marked for XLA (``jit_compile=True``): TensorFlow then
    runs it compiled without being asked."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    try:
        sm.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception:  # noqa: BLE001 - unreadable: the loader says why
        return False
    return any(f.attr["_XlaMustCompile"].b for mg in sm.meta_graphs for f in mg.graph_def.library.function
               if "_XlaMustCompile" in f.attr)


# ------------------------------------------------------------------------------------ models
def _load_ir(path: Path, signature: str, allow_ops, warn, max_asset_mb=None):
    """(graph, input specs): the model as graphslim reads it (scan, checkpoint reader)."""
    import tensorflow as tf

    from graphslim.io.emitter import MARKER
    from graphslim.io.loader import load
    from graphslim.io.scan import ScanNote, UnsafeModelError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ScanNote)
            graph = load(path, signature=signature, allow_ops=allow_ops,
                         **({} if max_asset_mb is None else {"max_asset_mb": max_asset_mb}))
    except LoadError as exc:
        if (isinstance(exc, UnsafeModelError) or not (path / MARKER).is_file()
                or "no signature named" in str(exc)):  # the user's choices, not a bug
            raise
        err = LoadError(f"{path}: graphslim cannot read back a model it wrote ({MARKER}): {exc} Either "
                        "its files changed since, or this is a graphslim bug: please report it.")
        err.exit_code = 3
        raise err from exc
    for w in caught:
        if issubclass(w.category, ScanNote):
            warn(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    specs = {a.name: tf.TensorSpec(graph.shape(a.tensor), graph.dtype(a.tensor), name=a.name)
             for a in graph.inputs}
    return graph, specs


def _load_trusted(child, path: Path, signature: str, label: str):
    """(handle, specs): TensorFlow's own loader, inside the child."""
    import tensorflow as tf

    from graphslim.io.emitter import MARKER

    try:
        handle, raw, _ = child.load_saved_model(path, signature)
    except GraphslimError as exc:
        if (path / MARKER).is_file():
            err = LoadError(f"{label} {path}: TensorFlow cannot load it ({exc}). graphslim wrote this model "
                            f"({MARKER}) and checks that TensorFlow loads what it writes, so either its "
                            "files changed since or this is a graphslim bug: please report it.")
            err.exit_code = 3
            raise err from exc
        raise LoadError(f"{label} {path}: TensorFlow's loader cannot load it ({exc}). Without --trusted, "
                        "the model runs as graphslim reads it.") from exc
    specs = {k: tf.TensorSpec(shape, tf.as_dtype(dtype), name=k) for k, (shape, dtype) in raw.items()}
    return handle, specs


def _feed(specs: dict, inputs: dict, label: str) -> dict:
    from graphslim.report import shape_text

    feed = {}
    for name, spec in specs.items():
        value = np.asarray(inputs[name])
        if not spec.shape.is_compatible_with(value.shape):
            expected = spec.shape.as_list() if spec.shape.rank is not None else None
            raise GraphslimError(f"input '{name}' has shape {list(value.shape)} but {label} expects "
                                 f"{shape_text(expected)}")
        if value.dtype != spec.dtype.as_numpy_dtype:
            value = value.astype(spec.dtype.as_numpy_dtype)
        feed[name] = value
    return feed


def _inputs(inputs, specs: dict, batch: int, seed: int, warn) -> tuple[dict, str]:
    if inputs is None:
        rng = np.random.default_rng(seed)
        return ({name: random_input(rng, name, specs[name], batch, warn) for name in sorted(specs)},
                f"random (seed {seed}, batch {batch})")
    if isinstance(inputs, (str, Path)):
        return read_inputs(inputs, specs), str(inputs)
    missing = sorted(set(specs) - set(inputs))
    if missing:
        raise GraphslimError(f"no values for inputs {missing}; the inputs are {', '.join(sorted(specs))}")
    return dict(inputs), "given arrays"


# ------------------------------------------------------------------------------------ compare
def compare(a, b, *, inputs=None, batch: int = 8, seed: int = 0, signature: str = "serving_default",
            rtol: float = 1e-5, atol: float = 1e-5, trusted: bool = False, allow_ops=(), limits=None,
            max_asset_mb: float | None = None, progress: Callable[[str], None] = _noop, warn: Callable[[str], None] = _noop) -> dict:
    """Run SavedModels ``a`` and ``b`` on the same inputs (a .npz path, a dict of arrays, or random
    with ``batch`` and ``seed``) and compare every output. Returns the dict ``graphslim verify
    --json`` prints: ``outputs`` (one row per output, see :func:`compare_arrays`), ``compared``,
    ``ok`` (every compared output within tolerance, and at least one compared), ``inputs``,
    ``input_shapes``. Raises GraphslimError (exit 2) when a model cannot be read or its run fails."""
    from graphslim.sandbox import Child, default_limits

    path_a, path_b = saved_model_dir(a), saved_model_dir(b)
    if isinstance(inputs, (str, Path)) and not Path(inputs).is_file():
        raise GraphslimError(f"--inputs {inputs}: no such file")
    limits = limits or default_limits()
    label_a, label_b = f"A ({a})", f"B ({b})"
    if trusted:
        from graphslim.io.scan import check_safe

        progress("scanning A and B")
        for path in (path_a, path_b):
            check_safe(path, allow_ops=allow_ops)
        progress("starting the execution process")
        child = Child(limits, read=[path_a, path_b], label=label_a)
    else:
        progress(f"loading A {a}")
        graph_a, specs_a = _load_ir(path_a, signature, allow_ops, warn, max_asset_mb)
        progress(f"loading B {b}")
        graph_b, specs_b = _load_ir(path_b, signature, allow_ops, warn, max_asset_mb)
        progress("starting the execution process")
        child = Child(limits, label=label_a)
    with child:
        if trusted:
            progress(f"loading A {a} with TensorFlow")
            handle_a, specs_a = _load_trusted(child, path_a, signature, "A")
            progress(f"loading B {b} with TensorFlow")
            handle_b, specs_b = _load_trusted(child, path_b, signature, "B")
        else:
            handle_a = child.load_graph(graph_a)
            child.label = label_b
            handle_b = child.load_graph(graph_b)
        specs = {**specs_b, **specs_a}
        values, source = _inputs(inputs, specs, batch, seed, warn)
        progress("running A")
        child.label = label_a
        out_a = child.run(handle_a, _feed(specs_a, values, label_a))
        progress("running B")
        child.label = label_b
        out_b = child.run(handle_b, _feed(specs_b, values, label_b))
    names = list(out_a) + [n for n in sorted(out_b) if n not in out_a]
    rows = [compare_arrays(n, out_a.get(n), out_b.get(n), rtol, atol) for n in names]
    compared = [r for r in rows if r["compared"]]
    return {"a": str(a), "b": str(b), "signature": signature, "inputs": source,
            "input_shapes": {k: list(np.shape(v)) for k, v in values.items()},
            "rtol": rtol, "atol": atol, "trusted": trusted, "outputs": rows, "compared": len(compared),
            "ok": bool(compared) and all(r["ok"] for r in compared)}


# ------------------------------------------------------------------------------------ bench
#: ``bench``'s runtimes: TensorFlow's graph executor (a model written with jit_compile runs through XLA,
#: as TensorFlow would run it), XLA (``tf.function(jit_compile=True)``), LiteRT (converted to TFLite in
#: the child, run on XNNPACK) → the contained child's engine


def runtime_list(runtimes, xla: bool = False) -> list[str]:
    """``runtimes`` (names, or comma-separated lists of names) in order, each once; ``xla=True`` adds
    ``xla``. An unknown name is a GraphslimError listing the valid ones."""
    if isinstance(runtimes, str):
        runtimes = [runtimes]
    names = [n.strip() for item in runtimes for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise GraphslimError(f"unknown runtime {', '.join(map(repr, unknown))}; the runtimes are "
                             f"{', '.join(RUNTIMES)}")
    names += ["xla"] if xla else []
    if not names:
        raise GraphslimError(f"no runtime given; the runtimes are {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def _load_engine(child, graph, path: Path, model, runtime: str) -> tuple[str, str, int]:
    """(row label, runtime as run, handle) of one model in one runtime."""
    if runtime == "tf" and saved_for_xla(path):
        return str(model), "xla (saved)", child.load_graph(graph, "xla")
    label = str(model) if runtime == "tf" else f"{model} ({runtime})"
    try:
        return label, RUNTIMES[runtime], child.load_graph(graph, RUNTIMES[runtime])
    except ConversionError as exc:
        raise ConversionError(f"{exc} Time it in another runtime (--runtime tf or xla).", exc.ops) from None


def bench(models, *, inputs=None, batch: int = 1, threads: int | None = None, rounds: int = 15,
          calls: int = 3, runtimes=("tf",), xla: bool = False, signature: str = "serving_default",
          allow_ops=(), limits=None, max_asset_mb: float | None = None, progress: Callable[[str], None] = _noop,
          warn: Callable[[str], None] = _noop) -> dict:
    """Time SavedModels side by side on the same inputs, in one contained child process, in each of
    ``runtimes`` (:data:`RUNTIMES`: ``tf``, ``xla``, ``litert``; ``xla=True`` adds ``xla``). The
    models and runtimes take turns within each round; each figure is the median over the rounds of
    the mean time of one call (timed in the child). One row per (model, runtime); its ``runtime`` is
    what ran: ``graph`` (TensorFlow's graph executor, for ``tf``), ``xla (saved)`` (a model written
    for XLA, for ``tf``), ``xla`` or ``litert``. ``speedup`` is the first model's median over this
    one's within a runtime; ``vs_tf``, this model's ``tf`` median over this row's (``xla_gain`` for
    ``xla`` rows, as before). Returns the dict ``graphslim bench --json`` prints. A model that TFLite
    cannot convert raises ConversionError naming its ops."""
    import os

    from graphslim.sandbox import Child, default_limits

    models = list(models)
    runtimes = runtime_list(runtimes, xla)
    paths = [saved_model_dir(m, "bench") for m in models]
    if isinstance(inputs, (str, Path)) and not Path(inputs).is_file():
        raise GraphslimError(f"--inputs {inputs}: no such file")
    limits = replace(limits or default_limits(), threads=threads or os.cpu_count() or 1)
    graphs = []
    for model, path in zip(models, paths):
        progress(f"loading {model}")
        graphs.append(_load_ir(path, signature, allow_ops, warn, max_asset_mb))
    progress("starting the execution process")
    with Child(limits, label=str(models[0])) as child:
        entries = []  # (label, model, runtime asked, runtime as run, handle, specs)
        for model, path, (graph, specs) in zip(models, paths, graphs):
            for runtime in runtimes:
                child.label = str(model)
                progress(f"loading {model} ({runtime})")
                label, ran, handle = _load_engine(child, graph, path, model, runtime)
                entries.append((label, model, runtime, ran, handle, specs))
        interpreter = next((child.engine_info[e[4]].get("interpreter") for e in entries if e[2] == "litert"), None)
        specs = {}
        for entry in reversed(entries):
            specs.update(entry[5])
        values, source = _inputs(inputs, specs, batch, 0, warn)
        if inputs is None:
            source = f"random (batch {batch})"
        for label, _, _, _, handle, model_specs in entries:
            progress(f"warming up {label}")
            child.label = label
            feed = _feed(model_specs, values, label)
            child.run(handle, feed)  # checks the run
            child.set_inputs(handle, feed)  # XLA compiles here
        times = [[] for _ in entries]
        for r in range(rounds):
            progress(f"round {r + 1}/{rounds}")
            for i, (label, _, _, _, handle, _) in enumerate(entries):
                child.label = label
                times[i].append(child.time(handle, calls))
    medians = [statistics.median(t) for t in times]
    first, tf_median, rows = {}, {}, []
    for (_, model, runtime, _, _, _), m in zip(entries, medians):
        first.setdefault(runtime, m)
        if runtime == "tf":
            tf_median[str(model)] = m
    for (_, model, runtime, ran, _, _), m, t in zip(entries, medians, times):
        vs_tf = tf_median[str(model)] / m if runtime != "tf" and str(model) in tf_median else None
        rows.append({"model": str(model), "runtime": ran, "median_ms": 1e3 * m, "min_ms": 1e3 * min(t),
                     "max_ms": 1e3 * max(t), "speedup": first[runtime] / m, "vs_tf": vs_tf,
                     "xla_gain": vs_tf if runtime == "xla" else None})
    return {"signature": signature, "inputs": source,
            "input_shapes": {k: list(np.shape(v)) for k, v in values.items()},
            "threads": threads, "rounds": rounds, "calls": calls, "runtimes": runtimes,
            "litert_interpreter": interpreter, "models": rows}
