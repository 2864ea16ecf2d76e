"""The execution child of :mod:`graphslim.sandbox` (``python -m graphslim._worker CONFIG``).

Order matters: limits first, then TensorFlow is imported (trusted code, before any model data
arrives), then Landlock closes the file system, and only then are requests read. The protocol runs
on the original stdin/stdout, which are moved to private descriptors; fd 1 then points at stderr so
that anything TensorFlow or a library prints cannot corrupt the protocol.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time

import graphslim._litert as litert

_PR_SET_PDEATHSIG = 1


def _limits(config: dict) -> None:
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    for which, value in ((resource.RLIMIT_AS, config["memory"]), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_FSIZE, config["file_size"])):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


def _cpu_budget(seconds: float) -> None:
    """SIGXCPU once this request has used ``seconds`` more CPU time (soft limit; the hard limit stays)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    total = used.ru_utime + used.ru_stime
    soft = int(total + max(1.0, seconds)) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ValueError, OSError):
        pass


class _Pipe:
    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd

    def read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = os.readv(self.rfd, [view[got:got + (1 << 20)]])
            if k == 0:
                raise EOFError
            got += k
        return buf

    def write(self, chunks) -> None:
        for chunk in chunks:
            view = memoryview(chunk).cast("B") if not isinstance(chunk, memoryview) else chunk
            pos = 0
            while pos < len(view):
                pos += os.write(self.wfd, view[pos:pos + (1 << 20)])


class _Engine:
    """A loaded model: ``run(feed, fetch)`` and ``time(calls)``."""

    inputs: dict
    outputs: dict


def _graph_def(arrays):
    from tensorflow.core.framework import graph_pb2

    gd = graph_pb2.GraphDef()
    gd.ParseFromString(arrays.pop("graph_def").tobytes())
    return gd


class _GraphEngine(_Engine):
    def __init__(self, tf, np, header, arrays, threads):
        gd = _graph_def(arrays)
        self.tf = tf
        self.inputs = dict(header["inputs"])
        self.outputs = dict(header["outputs"])
        self.graph = tf.Graph()
        feed = {}
        mapping = {}
        with self.graph.as_default():
            with tf.name_scope("graphslim.weights"):
                init = []
                for name in header["weights"]:
                    value = arrays.pop(f"w:{name}")
                    ph = tf.compat.v1.placeholder(tf.as_dtype(value.dtype), value.shape)
                    var = tf.Variable(ph, trainable=False, shape=value.shape)
                    feed[ph] = value
                    init.append(var.initializer)
                    mapping[f"{name}:0"] = var.read_value()
            tf.graph_util.import_graph_def(gd, input_map=mapping, name="")
        self.session = tf.compat.v1.Session(graph=self.graph, config=tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1))
        if init:
            self.session.run(init, feed_dict=feed)
        self._fetch_cache = {}
        self._feed = None

    def _fetchable(self, name):
        """Fetch through an Identity of our own: Grappler's remapper (oneDNN) may fuse a fetched node
        away without honouring the fetch (e.g. Conv2D+BiasAdd+Sigmoid+Mul), never a node read
        outside its pattern."""
        tensor = self._fetch_cache.get(name)
        if tensor is None:
            source = self.graph.get_tensor_by_name(name)
            with self.graph.as_default(), self.tf.control_dependencies(None):
                tensor = self.tf.identity(source, name="graphslim_fetch")
            self._fetch_cache[name] = tensor
        return tensor

    def feed(self, inputs):
        return {self.graph.get_tensor_by_name(self.inputs[k]): v for k, v in inputs.items()}

    def run(self, inputs, fetch):
        names = list(self.outputs) if fetch is None else list(fetch)
        tensors = [self._fetchable(self.outputs[n] if fetch is None else n) for n in names]
        values = self.session.run(tensors, feed_dict=self.feed(inputs))
        return dict(zip(names, values))

    def set_inputs(self, inputs):
        self._feed = self.feed(inputs)
        self._targets = [self._fetchable(t) for t in self.outputs.values()]

    def time(self, calls):
        start = time.perf_counter()
        for _ in range(calls):
            self.session.run(self._targets, feed_dict=self._feed)
        return (time.perf_counter() - start) / calls

    def close(self):
        self.session.close()


class _EagerEngine(_Engine):
    """A callable taking keyword inputs (XLA-compiled graph, or a loaded signature)."""

    def __init__(self, tf, fn, inputs, outputs):
        self.tf, self.fn, self.inputs, self.outputs = tf, fn, inputs, outputs
        self._feed = None

    def _call(self, inputs):
        out = self.fn(**{k: self.tf.constant(v) for k, v in inputs.items()})
        if not isinstance(out, dict):
            out = {"output_0": out}
        return out

    def run(self, inputs, fetch):
        if fetch is not None:
            raise ValueError("fetching intermediate tensors needs the graph engine")
        return {k: v.numpy() for k, v in self._call(inputs).items()}

    def set_inputs(self, inputs):
        self._feed = {k: self.tf.constant(v) for k, v in inputs.items()}
        self._call(inputs)  # compiles (XLA) outside the timed calls

    def time(self, calls):
        start = time.perf_counter()
        for _ in range(calls):
            out = self.fn(**self._feed)
        for t in (out.values() if isinstance(out, dict) else [out]):
            t.numpy()
        return (time.perf_counter() - start) / calls

    def close(self):
        pass


def _xla_engine(tf, np, header, arrays):
    gd = _graph_def(arrays)
    inputs, outputs = dict(header["inputs"]), dict(header["outputs"])
    weights = header["weights"]

    def body():
        tf.graph_util.import_graph_def(gd, name="")

    wrapped = tf.compat.v1.wrap_function(body, [])
    g = wrapped.graph
    feeds = [g.get_tensor_by_name(inputs[k]) for k in inputs] + [g.get_tensor_by_name(f"{w}:0") for w in weights]
    fetches = {k: g.get_tensor_by_name(t) for k, t in outputs.items()}
    pruned = wrapped.prune(feeds, fetches)
    values = [tf.constant(arrays.pop(f"w:{w}")) for w in weights]
    names = list(inputs)

    @tf.function(jit_compile=True)
    def compiled(**kw):
        return pruned(*[kw[n] for n in names], *values)

    return _EagerEngine(tf, compiled, inputs, outputs)


def _tflite(tf, header, arrays) -> bytes:
    """The graph of a ``load``/``to_tflite`` request as a TFLite flatbuffer (:mod:`graphslim._litert`)."""
    gd = _graph_def(arrays)
    weights = {name: arrays.pop(f"w:{name}") for name in header["weights"]}
    return litert.convert(tf, gd, dict(header["inputs"]), dict(header["outputs"]), weights)


def _load(tf, np, header, arrays, threads):
    """(engine, reply) of a ``load`` request."""
    engine = header["engine"]
    if engine == "graph":
        return _GraphEngine(tf, np, header, arrays, threads), {}
    if engine == "xla":
        return _xla_engine(tf, np, header, arrays), {}
    if engine == "trainer":
        from graphslim._trainer import TrainerEngine

        return TrainerEngine(tf, np, header, arrays, threads, _graph_def(arrays)), {}
    if engine == "litert":
        litert.interpreter_class(tf)  # before converting: RuntimeMissing if nothing could run the result
        flatbuffer = _tflite(tf, header, arrays)
        loaded = litert.LiteRTEngine(tf, flatbuffer, dict(header["inputs"]), dict(header["outputs"]), threads)
        return loaded, {"interpreter": loaded.interpreter, "tflite_bytes": loaded.flatbuffer_size}
    raise ValueError(f"unknown engine {engine!r}")


def _saved_model_engine(tf, path, signature):
    loaded = tf.saved_model.load(path)
    sigs = getattr(loaded, "signatures", {}) or {}
    if signature not in sigs:
        raise KeyError(f"no signature named {signature!r}; it has {sorted(sigs)}")
    fn = sigs[signature]
    args, kwargs = fn.structured_input_signature
    specs = dict(kwargs)
    for i, spec in enumerate(args):
        specs.setdefault(getattr(spec, "name", None) or f"arg_{i}", spec)
    engine = _EagerEngine(tf, fn, {k: k for k in specs}, {k: k for k in fn.structured_outputs})
    engine.keep = loaded
    engine.specs = {k: [None if s.shape.rank is None else s.shape.as_list(), s.dtype.name]
                    for k, s in specs.items()}
    return engine


def _inputs_and_targets(arrays) -> tuple[dict, dict]:
    """A train/evaluate request's arrays: ``in:NAME`` signature inputs, ``t:KEY`` loss targets."""
    return ({k[3:]: v for k, v in arrays.items() if k.startswith("in:")},
            {k[2:]: v for k, v in arrays.items() if k.startswith("t:")})


def _check_saved_model(tf, path, signature, full):
    """The emitter's load check (:meth:`graphslim.sandbox.Child.check_saved_model`): every function of
    the library imports; with ``full``, ``tf.saved_model.load`` revives the model with ``signature``."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model import function_deserialization

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    meta = sm.meta_graphs[0]
    function_deserialization.load_function_def_library(meta.graph_def.library, meta.object_graph_def)
    if full:
        loaded = tf.saved_model.load(path)
        if signature not in loaded.signatures:
            raise ValueError(f"the loaded model has no signature {signature!r}")


def main() -> None:
    config = json.loads(sys.argv[1])
    pipe = _Pipe(os.dup(0), os.dup(1))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    _limits(config)
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(config["threads"]))
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from graphslim import landlock
    from graphslim.sandbox import decode_arrays, encode

    status = landlock.restrict(read=config["read"], write=config["write"])
    os.chdir(config["scratch"])
    engines: dict = {}
    first = True
    while True:
        try:
            size = int.from_bytes(pipe.read(8), "little")
            header = json.loads(bytes(pipe.read(size)))
            arrays = decode_arrays(header.get("arrays", []), pipe.read)
        except EOFError:
            return
        op = header.get("op")
        _cpu_budget(float(header.get("cpu", 3600)))
        for handle in header.get("release", ()):
            engine = engines.pop(handle, None)
            if engine is not None:
                engine.close()
        reply, out = {}, None
        try:
            if op == "hello" and first:
                reply = {"landlock": status.abi, "landlock_reason": status.reason}
            elif op == "exit":
                return
            elif op == "load":
                engines[header["id"]], reply = _load(tf, np, header, arrays, int(config["threads"]))
            elif op == "to_tflite":
                out = {"tflite": np.frombuffer(_tflite(tf, header, arrays), dtype=np.uint8)}
            elif op == "load_saved_model":
                engine = _saved_model_engine(tf, header["path"], header["signature"])
                engines[header["id"]] = engine
                reply = {"inputs": engine.specs, "outputs": list(engine.outputs)}
            elif op == "check_saved_model":
                _check_saved_model(tf, header["path"], header["signature"], bool(header["full"]))
            elif op == "run":
                feed = {k[3:]: v for k, v in arrays.items()}
                out = engines[header["id"]].run(feed, header.get("fetch"))
            elif op == "set_inputs":
                engines[header["id"]].set_inputs({k[3:]: v for k, v in arrays.items()})
            elif op == "train":
                split = _inputs_and_targets(arrays)
                reply = engines[header["id"]].train(*split, float(header["lr"]))
            elif op == "evaluate":
                reply, outs = engines[header["id"]].evaluate(*_inputs_and_targets(arrays))
                out = {f"out:{k}": v for k, v in outs.items()}
            elif op == "grad_products":
                feed = {k[3:]: v for k, v in arrays.items()}
                engine = engines[header["id"]]
                if not hasattr(engine, "grad_products"):
                    raise ValueError("gradients need the trainer engine")
                values = engine.grad_products(feed, str(header["logits"]), list(header["tensors"]))
                out = {f"g{i}": v for i, v in enumerate(values)}
            elif op == "weights":
                out = {f"w:{k}": v for k, v in engines[header["id"]].weights().items()}
            elif op == "time":
                reply = {"seconds": engines[header["id"]].time(int(header["calls"]))}
            elif op == "drop":
                engine = engines.pop(header["id"], None)
                if engine is not None:
                    engine.close()
            else:
                reply = {"error": f"unknown request {op!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises a clean error
            text = " ".join(str(exc).split()) or type(exc).__name__
            reply = {**getattr(exc, "details", {}), "error": f"{type(exc).__name__}: {text[:800]}"}
            out = None
        first = False
        del arrays
        pipe.write(encode(reply, out))


if __name__ == "__main__":
    main()
