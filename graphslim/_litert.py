"""LiteRT (TFLite) in the execution child of :mod:`graphslim.sandbox`: imported only by ``_worker``.

graphslim's own IR (the GraphDef and the weights the loader read, exactly what the graph engine
receives) becomes one ``tf.function`` with the weights as constants, which TensorFlow's TFLite
converter turns into a flatbuffer with builtin ops only (no SELECT_TF_OPS: a model that needs
TensorFlow kernels is refused, naming the ops). The input SavedModel's own functions and restore code
are never loaded. :class:`LiteRTEngine` runs the flatbuffer with the maintained LiteRT interpreter
(``ai_edge_litert``, the ``litert`` extra) or, where that is not installed, TensorFlow's own
``tf.lite.Interpreter``; both apply XNNPACK by default, with the child's thread count.

The converter writes a temporary SavedModel under ``TMPDIR``, which the sandbox points at the child's
scratch directory (the only place Landlock lets it write).
"""

from __future__ import annotations

import itertools
import keyword
import re
import time

__all__ = ["ConversionFailed", "LiteRTEngine", "RuntimeMissing", "convert", "interpreter_class"]

_CONVERSIONS = itertools.count(1)
_NO_KERNEL = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
_ERROR_LINE = re.compile(r"error: (.+)")
_SIGNATURE = "serving_default"
_PLAIN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ConversionFailed(Exception):
    """The TFLite converter refused the graph. ``details``: what the parent needs to word the error
    (``kind``: ``tflite``; ``reason``: the message; ``ops``: op types TFLite has no builtin kernel
    for)."""

    def __init__(self, message: str, ops=()):
        super().__init__(message)
        self.details = {"kind": "tflite", "reason": message, "ops": sorted(set(ops))}


def signature_keys(names, prefix: str) -> dict:
    """name → the key it has in the TFLite model's signature: the name itself where TensorFlow takes
    it as a function argument name, else ``<prefix>_<position>`` (TensorFlow would rename it, and the
    converter then drops the signature)."""
    keys = {}
    for i, name in enumerate(names):
        ok = _PLAIN_NAME.match(name) and not keyword.iskeyword(name)
        keys[name] = name if ok else f"{prefix}_{i}"
    if len(set(keys.values())) != len(keys):  # a renamed one met a real one
        keys = {name: f"{prefix}_{i}" for i, name in enumerate(names)}
    return keys


def _split_graph_def(graph_def, inputs: dict, weights: dict):
    """The GraphDef without the signature inputs' and the weights' Placeholders (the function's
    arguments and constants replace them, through ``input_map``; control inputs from them dropped),
    which of those the rest reads, and their Placeholders by name."""
    from tensorflow.core.framework import graph_pb2

    input_nodes = {tensor.split(":")[0] for tensor in inputs.values()}
    dropped = input_nodes | set(weights)
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    placeholders, read = {}, set()
    for nd in graph_def.node:
        if nd.name in dropped:
            placeholders[nd.name] = nd
            continue
        keep = [i for i in nd.input if not (i.startswith("^") and i[1:] in dropped)]
        read.update(i.split(":")[0] for i in keep if not i.startswith("^"))
        new = out.node.add()
        new.CopyFrom(nd)
        del new.input[:]
        new.input.extend(keep)
    if out.library.function:
        from graphslim.ir.functions import rename_library

        rename_library(out, f"litert{next(_CONVERSIONS)}")
    return out, read & dropped, placeholders


def _function(tf, graph_def, inputs: dict, outputs: dict, weights: dict):
    """A ``tf.function`` over the graph: inputs by their Placeholders' dtype and shape, named like the
    signature's inputs; outputs a dict keyed by the signature's output names (both through
    :func:`signature_keys`)."""
    gd, read, placeholders = _split_graph_def(graph_def, inputs, weights)
    names = list(inputs)
    nodes = [inputs[n].split(":")[0] for n in names]
    in_keys, out_keys = signature_keys(names, "input"), signature_keys(list(outputs), "output")
    specs = []
    for name, node in zip(names, nodes):
        nd = placeholders[node]
        shape = tf.TensorShape(nd.attr["shape"].shape) if "shape" in nd.attr else tf.TensorShape(None)
        specs.append(tf.TensorSpec(shape, tf.as_dtype(nd.attr["dtype"].type), name=in_keys[name]))
    direct = {t.split(":")[0] for t in outputs.values()} & set(placeholders)  # outputs not imported
    imported = [t for t in dict.fromkeys(outputs.values()) if t.split(":")[0] not in direct]

    def body(*args):
        values = {f"{node}:0": arg for node, arg in zip(nodes, args)}
        for w in (read | direct) & set(weights):
            dtype = tf.as_dtype(placeholders[w].attr["dtype"].type)
            values[f"{w}:0"] = tf.constant(weights[w], dtype=dtype)
        if imported:
            feeds = {t: v for t, v in values.items() if t.split(":")[0] in read}  # input_map: only what is read
            values.update(zip(imported, tf.graph_util.import_graph_def(
                gd, input_map=feeds, return_elements=imported, name="")))
        return {out_keys[name]: tf.identity(values[t]) for name, t in outputs.items()}

    return tf.function(body, input_signature=specs, autograph=False)


def _reason(exc: Exception) -> tuple[str, list]:
    text = str(exc)
    ops = sorted(set(_NO_KERNEL.findall(text)))
    if ops:
        return (f"TFLite has no builtin kernel for {', '.join(ops)} (graphslim converts with TFLite's "
                "builtin ops only, which LiteRT runs without TensorFlow)"), ops
    lines = [" ".join(m.split()) for m in _ERROR_LINE.findall(text)]
    lines = [ln for ln in dict.fromkeys(lines) if not ln.startswith("failed while converting")]
    detail = "; ".join(lines[:3]) or " ".join(text.split())
    return f"the TFLite converter failed: {detail[:600]}", []


def convert(tf, graph_def, inputs: dict, outputs: dict, weights: dict) -> bytes:
    """The TFLite flatbuffer of the graph (builtin ops, float as in the model). ``inputs`` and
    ``outputs``: signature name → tensor name; ``weights``: weight name → array. ConversionFailed
    names the ops TFLite lacks or the converter's reason."""
    try:
        fn = _function(tf, graph_def, inputs, outputs, weights)
        concrete = fn.get_concrete_function()
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the reason
        raise ConversionFailed(f"TensorFlow cannot trace the graph for the converter: "
                               f"{' '.join(str(exc).split())[:600]}") from exc
    holder = tf.Module()
    holder.serve = fn
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        return bytes(converter.convert())
    except Exception as exc:  # noqa: BLE001 - ConverterError and whatever MLIR raised
        message, ops = _reason(exc)
        raise ConversionFailed(message, ops) from exc


class RuntimeMissing(Exception):
    """No TFLite interpreter is installed in the child's Python. ``details`` as in ConversionFailed
    (``kind``: ``runtime``)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.details = {"kind": "runtime", "runtime": "litert", "reason": message}


def interpreter_class(tf):
    """(Interpreter class, its name and version): LiteRT's where installed, else TensorFlow's;
    RuntimeMissing where neither is (TensorFlow has announced the removal of ``tf.lite.Interpreter``)."""
    try:
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, f"ai_edge_litert {getattr(ai_edge_litert, '__version__', '')}".strip()
    except ImportError as exc:
        missing = exc
    interpreter = getattr(getattr(tf, "lite", None), "Interpreter", None)
    if interpreter is None:
        raise RuntimeMissing(f"no TFLite interpreter is installed (ai_edge_litert: {missing}; TensorFlow "
                             f"{tf.__version__} has no tf.lite.Interpreter)")
    return interpreter, f"tf.lite {tf.__version__}"


class LiteRTEngine:
    """A converted model in the LiteRT interpreter (XNNPACK, ``threads`` threads): ``run``,
    ``set_inputs``, ``time`` like the child's other engines. Inputs whose batch (or any) dimension is
    unknown are resized to the fed shape."""

    def __init__(self, tf, flatbuffer: bytes, inputs: dict, outputs: dict, threads: int):
        import numpy as np

        self.np = np
        cls, self.interpreter = interpreter_class(tf)
        self.flatbuffer_size = len(flatbuffer)
        self.interp = cls(model_content=flatbuffer, num_threads=int(threads))
        runner = self.interp.get_signature_runner(_SIGNATURE)
        ins, outs = runner.get_input_details(), runner.get_output_details()
        del runner  # a live SignatureRunner holds the interpreter: allocate_tensors would refuse to run
        in_keys, out_keys = signature_keys(list(inputs), "input"), signature_keys(list(outputs), "output")
        missing = [k for k in in_keys.values() if k not in ins] + [k for k in out_keys.values() if k not in outs]
        if missing:
            raise ValueError(f"the converted model's signature does not name {missing}; it has inputs "
                             f"{sorted(ins)} and outputs {sorted(outs)}")
        self.inputs = {n: ins[k] for n, k in in_keys.items()}
        self.outputs = {n: outs[k]["index"] for n, k in out_keys.items()}
        self.interp.allocate_tensors()
        self._shapes = {n: tuple(d["shape"].tolist()) for n, d in self.inputs.items()}

    def _set(self, inputs: dict) -> None:
        np = self.np
        values = {}
        for name, detail in self.inputs.items():
            value = np.asarray(inputs[name])
            if value.dtype != detail["dtype"]:
                value = value.astype(detail["dtype"])
            values[name] = value
        resized = False
        for name, value in values.items():
            if tuple(value.shape) != self._shapes[name]:
                try:
                    self.interp.resize_tensor_input(self.inputs[name]["index"], list(value.shape), strict=True)
                except Exception as exc:  # noqa: BLE001 - worded for the user
                    raise ValueError(f"LiteRT cannot run input {name!r} at shape {list(value.shape)}: the "
                                     f"converted model takes {self.inputs[name]['shape_signature'].tolist()} "
                                     f"(-1: any size) ({' '.join(str(exc).split())[:300]})") from exc
                self._shapes[name] = tuple(value.shape)
                resized = True
        if resized:
            self.interp.allocate_tensors()
        for name, value in values.items():
            self.interp.set_tensor(self.inputs[name]["index"], value)

    def _outputs(self) -> dict:
        return {name: self.interp.get_tensor(index) for name, index in self.outputs.items()}

    def run(self, inputs: dict, fetch) -> dict:
        if fetch is not None:
            raise ValueError("the litert engine returns the signature's outputs only; fetching "
                             "intermediate tensors needs the graph engine")
        self._set(inputs)
        self.interp.invoke()
        return self._outputs()

    def set_inputs(self, inputs: dict) -> None:
        self._set(inputs)
        self.interp.invoke()  # the first call sets up XNNPACK's packed weights, outside the timed calls

    def time(self, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            self.interp.invoke()
            self._outputs()
        return (time.perf_counter() - start) / calls

    def close(self) -> None:
        self.interp = None
