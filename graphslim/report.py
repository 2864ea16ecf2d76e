"""The data behind ``graphslim optimize``'s summary table and ``--report`` JSON (no printing here).

The CLI takes a :func:`layer_snapshot` of the graph before and after the pipeline, then builds one
JSON-ready dict with :func:`optimize_report`. The helpers that turn numbers into short text
(:func:`human_bytes`, :func:`compact_stats`, :func:`ratio_text`) live here too so that the table and
the report agree.

Example::

    before = layer_snapshot(graph)
    report = graphslim.run_pipeline(graph, "fold-batchnorm,dce")
    after = layer_snapshot(graph)
    data = optimize_report(input_path="m/", output_path="out/", pipeline_report=report,
                           before=before, after=after, ...)
    json.dumps(data)    # always serializable: numpy scalars and arrays become numbers and lists
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphslim.ir import ops

__all__ = ["LayerInfo", "Snapshot", "compact_stats", "dir_size", "human_bytes", "jsonable",
           "layer_rows", "layer_snapshot", "optimize_report", "output_channels", "ratio",
           "ratio_text", "shape_text"]


# ------------------------------------------------------------------------------------------- values
def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, tuples, sets and paths turned into JSON types.

    Non-finite floats become None (JSON has no NaN or infinity); unknown objects become ``str``.

    Example::

        jsonable({"n": np.int64(3), "w": np.zeros(2)})   # {'n': 3, 'w': [0.0, 0.0]}
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays (and tf.TensorShape-likes)
        return jsonable(value.tolist())
    return str(value)


def dir_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a file, or of every file under a directory (symlinks not followed).

    Example::

        dir_size("fixtures/models/vgg_digits")   # 105123
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def human_bytes(n: int | None) -> str:
    """``1536`` → ``'1.5 KiB'``; None → ``'-'``."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def ratio(after: float | None, before: float | None) -> float | None:
    """``after / before`` (None when either is unknown or ``before`` is 0)."""
    if after is None or before is None or before == 0:
        return None
    return after / before


def ratio_text(after: float | None, before: float | None) -> str:
    """``'0.93x'``; ``'-'`` when there is no ratio."""
    r = ratio(after, before)
    return "-" if r is None else f"{r:.3g}x"


def shape_text(shape) -> str:
    """``(None, 8, 8, 1)`` → ``'[?, 8, 8, 1]'``; None (unknown rank) → ``'unknown'``."""
    if shape is None:
        return "unknown"
    return "[" + ", ".join("?" if d is None or d == -1 else str(d) for d in shape) + "]"


def _compact_value(value: Any, depth: int = 0) -> str:
    value = jsonable(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if len(value) <= 24 else value[:21] + "..."
    if isinstance(value, list):
        if depth == 0 and len(value) <= 4 and all(isinstance(v, (int, float, str, bool)) or v is None
                                                  for v in value):
            return "[" + ",".join(_compact_value(v, 1) for v in value) + "]"
        return f"[{len(value)} items]"
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def compact_stats(stats: Mapping[str, Any], width: int = 72) -> str:
    """Pass stats as one short line: scalars as ``key=value``, long lists and dicts as counts.

    Example::

        compact_stats({"folded_layers": 6, "layers": [{...}] * 6})
        # 'folded_layers=6 layers=[6 items]'
    """
    parts = [f"{key}={_compact_value(value)}" for key, value in stats.items()]
    text = " ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


# ------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class LayerInfo:
    """One node with params or MACs: its op, output shape and channels, params and MACs."""

    name: str
    op: str
    shape: tuple | None
    channels: int | None
    params: int
    macs: int


@dataclass
class Snapshot:
    """Totals and per-layer costs of a graph at one moment (layers in topological order)."""

    params: int
    macs: int
    layers: dict[str, LayerInfo] = field(default_factory=dict)


def output_channels(node) -> int | None:
    """The channel count of a node's first output: axis 1 for ``NC..`` data formats, else the last
    axis; None when unknown."""
    shape = node.shapes[0] if node.shapes else None
    if not shape:
        return None
    dim = shape[ops.channel_axis(node, len(shape))]
    return None if dim is None or dim < 0 else int(dim)


def layer_snapshot(graph) -> Snapshot:
    """Params and MACs of ``graph`` in total and per node (only nodes that have either)."""
    cost = graph.cost()
    layers = {}
    for c in cost.nodes:
        node = graph.node(c.name)
        shape = tuple(node.shapes[0]) if node.shapes and node.shapes[0] is not None else None
        layers[c.name] = LayerInfo(c.name, c.op, shape, output_channels(node), int(c.params),
                                   int(c.macs))
    return Snapshot(int(cost.params), int(cost.macs), layers)


def layer_rows(before: Snapshot, after: Snapshot) -> list[dict[str, Any]]:
    """Per layer: name, op, output channels / params / MACs before and after. A layer the pipeline
    removed has ``after`` = None; a layer it created has ``before`` = None. Order: the original
    layers in their order, then new ones."""
    rows = []
    names = list(before.layers) + [n for n in after.layers if n not in before.layers]
    for name in names:
        b, a = before.layers.get(name), after.layers.get(name)
        rows.append({
            "name": name,
            "op": (a or b).op,
            "output_channels": {"before": b and b.channels, "after": a and a.channels},
            "params": {"before": b and b.params, "after": a and a.params},
            "macs": {"before": b and b.macs, "after": a and a.macs},
        })
    return rows


# ------------------------------------------------------------------------------------------- report
def _before_after(before, after) -> dict[str, Any]:
    return {"before": before, "after": after, "ratio": ratio(after, before)}


def optimize_report(*, version: str, input_path, output_path, signature: str, tags, pipeline_report,
                    verify: bool, before: Snapshot, after: Snapshot, size_before: int | None,
                    size_after: int | None, load_seconds: float, save_seconds: float,
                    plugins=(), jit_compile: bool = False, other_signatures=()) -> dict[str, Any]:
    """The JSON-ready report of one ``graphslim optimize`` run.

    Keys: ``graphslim_version``, ``input``, ``output``, ``signature``, ``tags``, ``plugins``,
    ``pipeline`` (canonical text), ``verify``, ``passes`` (``text``, ``name``, ``seconds``,
    ``verify_seconds``, ``changed``, ``stats``), ``jit_compile`` (the model was written for XLA),
    ``signatures_not_written`` (the input's other signatures, not aliases of the one rewritten),
    ``params``, ``macs``, ``size_bytes`` (each
    ``before``/``after``/``ratio``), ``seconds`` (``load``, ``input_verify``, ``passes``,
    ``save``, ``total``) and ``layers`` (see :func:`layer_rows`).
    """
    passes = []
    for record in pipeline_report.passes:
        passes.append({
            "text": record["text"],
            "name": record["name"],
            "seconds": record["seconds"],
            "verify_seconds": record["verify_seconds"],
            "changed": record["changed"],
            "stats": record["stats"],
            "warnings": record.get("warnings", []),
        })
    input_verify = pipeline_report.input_verify_seconds or 0.0
    passes_seconds = pipeline_report.seconds - input_verify  # passes and their verification
    data = {
        "graphslim_version": version,
        "input": os.fspath(input_path),
        "output": os.fspath(output_path),
        "signature": signature,
        "tags": list(tags),
        "plugins": list(plugins),
        "pipeline": pipeline_report.pipeline,
        "verify": verify,
        "passes": passes,
        "jit_compile": bool(jit_compile),
        "signatures_not_written": list(other_signatures),
        "params": _before_after(before.params, after.params),
        "macs": _before_after(before.macs, after.macs),
        "size_bytes": _before_after(size_before, size_after),
        "seconds": {
            "load": load_seconds,
            "input_verify": pipeline_report.input_verify_seconds,
            "passes": passes_seconds,
            "save": save_seconds,
            "total": load_seconds + input_verify + passes_seconds + save_seconds,
        },
        "layers": layer_rows(before, after),
    }
    return jsonable(data)
