"""Contained execution: every run of a model happens in a child process that the model cannot escape.

A SavedModel is a program. graphslim's scan keeps models with ops outside its allow-list from being
run at all; what passes still runs as TensorFlow's native code, on model-chosen tensors, so the run
itself is contained too. :class:`Child` starts ``python -m graphslim._worker`` (TensorFlow imported
there, never in the caller's process for the model's sake) with:

* **a fresh, empty working directory** (a scratch directory, removed afterwards) and ``HOME`` and
  ``TMPDIR`` pointing at it;
* **resource limits**: address space (``Limits.memory``), CPU time per request, no core files, a
  file-size limit; and a **wall-clock timeout** per request after which the parent kills the child
  (SIGKILL): an endless loop, a blocked queue or a long sleep ends there;
* **Landlock** (Linux ≥ 5.13; :mod:`graphslim.landlock`), applied by the child after importing
  TensorFlow and before it receives a model: reads only beneath the Python installation, system
  libraries, the scratch directory (and, for :meth:`Child.load_saved_model`, the model directory);
  writes only beneath the scratch directory; no TCP. Where the kernel lacks Landlock this is said
  once (a warning) and the rest still applies;
* its own session (``start_new_session``): Ctrl-C and SIGTERM reach the parent, whose handlers run
  because the parent only waits on a pipe, and the parent then kills the child; the child also dies
  with the parent (``PR_SET_PDEATHSIG``).

The child runs graphslim's *own* IR of the model (a GraphDef and the weights the loader read with
the checkpoint reader), never the input's restore functions or save/restore ops: in TensorFlow's graph
executor, compiled by XLA, or converted to TFLite there and run by LiteRT (``engine="litert"``;
:meth:`Child.to_tflite` returns the converted flatbuffer). Only
:meth:`Child.load_saved_model` (the ``--trusted`` comparison of ``graphslim verify``) lets
TensorFlow's loader run a SavedModel, and still inside the child; :meth:`Child.check_saved_model`
is the emitter's check that what graphslim wrote loads (a copy in the scratch directory, nothing run).

Messages are length-prefixed JSON headers followed by raw array bytes; the parent accepts only
numeric, boolean and byte-string arrays whose declared shape matches their size (no pickle: a child
that a model subverted must not be able to run code in the parent).

A crash (SIGSEGV), an abort, a child that exits without answering, a limit or a timeout raise
:class:`ExecutionError` (exit status 2) naming what was being run and the signal.

    with Child(Limits(timeout=60)) as child:
        h = child.load_graph(graph)
        out = child.run(h, {"input_1": x})
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from graphslim.errors import ConversionError, GraphslimError, RuntimeUnavailable

__all__ = ["RUNTIMES", "Child", "ExecutionError", "Limits", "SandboxNote", "decode_arrays", "default_limits", "encode", "set_default_limits",
           "shared_child", "close_shared"]

#: runtime name (what users write: ``--runtime``, ``runtime=``) → the child's engine that runs it
RUNTIMES = {"tf": "graph", "xla": "xla", "litert": "litert"}
_HEADER_MAX = 64 << 20
_LEN = struct.Struct("<Q")
_CHUNK = 1 << 20
_DTYPE = re.compile(r"^[<>|=]?[biufc]\d{1,2}$")
_STARTUP_SECONDS = 300.0
#: the least time :meth:`Child.check_saved_model` is given (a short --timeout is meant for model runs)
CHECK_SECONDS = 300.0


class ExecutionError(GraphslimError):
    """Running a model in its contained child process failed: it crashed, aborted, hit a limit, timed
    out, or TensorFlow raised an error while running it. Exit status 2."""

    exit_code = 2


class SandboxNote(UserWarning):
    """Something about the containment the user should know (Landlock unavailable)."""


@dataclass(frozen=True)
class Limits:
    """Limits of one child process. ``timeout``: wall-clock seconds per request (a run, a batch, a
    timing round); ``memory``: bytes of address space (None: three quarters of this machine's RAM,
    at least 8 GiB); ``cpu``: CPU seconds per request (None: ``timeout`` × CPU count + 60);
    ``threads``: TensorFlow's intra-op threads (inter-op: 1)."""

    timeout: float = 900.0
    memory: int | None = None
    cpu: float | None = None
    threads: int = 2
    file_size: int = 4 << 30

    def memory_bytes(self) -> int:
        if self.memory is not None:
            return int(self.memory)
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 16 << 30
        return max(8 << 30, ram * 3 // 4)

    def cpu_seconds(self) -> float:
        return self.cpu if self.cpu is not None else self.timeout * (os.cpu_count() or 1) + 60


_DEFAULT = Limits()


def default_limits() -> Limits:
    return _DEFAULT


def set_default_limits(**changes) -> Limits:
    """Change the limits every later child starts with (the CLI's ``--timeout``/``--max-memory``);
    returns the previous limits. Shared children started with other limits are closed."""
    global _DEFAULT
    previous = _DEFAULT
    _DEFAULT = replace(_DEFAULT, **{k: v for k, v in changes.items() if v is not None})
    if _DEFAULT != previous:
        close_shared()
    return previous


# ------------------------------------------------------------------------------------ wire format
def encode(header: dict, arrays: dict | None = None) -> list:
    """Chunks to send: header length, header JSON (with an ``arrays`` list), then each array's bytes."""
    arrays = arrays or {}
    specs, blobs = [], []
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.kind in "OSU":
            items = [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in a.reshape(-1).tolist()]
            lengths = np.array([len(x) for x in items], dtype="<u8")
            data = b"".join(items)
            specs.append({"name": name, "kind": "bytes", "shape": list(a.shape), "nbytes": lengths.nbytes + len(data)})
            blobs.extend([lengths.tobytes(), data])
            continue
        if a.dtype.kind not in "biufc":
            a = a.astype(np.float32)  # bfloat16 and other extension types travel as float32
        a = np.ascontiguousarray(a)
        specs.append({"name": name, "kind": "array", "dtype": a.dtype.str, "shape": list(a.shape),
                      "nbytes": a.nbytes})
        blobs.append(memoryview(a).cast("B") if a.nbytes else b"")
    head = json.dumps({**header, "arrays": specs}).encode("utf-8")
    return [_LEN.pack(len(head)), head, *blobs]


def decode_arrays(specs, read) -> dict:
    out = {}
    if not isinstance(specs, list):
        raise ValueError("arrays is not a list")
    for spec in specs:
        shape = spec["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < (1 << 40) for d in shape):
            raise ValueError(f"bad shape {shape!r}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = int(spec["nbytes"])
        if spec["kind"] == "bytes":
            if nbytes < 8 * count:
                raise ValueError("bad byte-string array size")
            lengths = np.frombuffer(read(8 * count), dtype="<u8")
            data = bytes(read(nbytes - 8 * count))
            if int(lengths.sum()) != len(data):
                raise ValueError("byte-string lengths do not add up")
            items, pos = [], 0
            for n in lengths.tolist():
                items.append(data[pos:pos + n])
                pos += n
            arr = np.empty(count, dtype=object)
            arr[:] = items
            out[spec["name"]] = arr.reshape(shape)
            continue
        dtype_text = spec["dtype"]
        if not isinstance(dtype_text, str) or not _DTYPE.match(dtype_text):
            raise ValueError(f"dtype {dtype_text!r} is not numeric")
        dtype = np.dtype(dtype_text)
        if count * dtype.itemsize != nbytes:
            raise ValueError(f"{spec['name']!r}: {nbytes} bytes do not make shape {shape} of {dtype}")
        buf = read(nbytes)
        out[spec["name"]] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return out


# ------------------------------------------------------------------------------------ the child
def _signal_text(signum: int, limits: Limits) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    gib = limits.memory_bytes() / (1 << 30)
    why = {
        "SIGSEGV": "a crash in TensorFlow's native code, e.g. on a malformed tensor of the model",
        "SIGBUS": "a crash in TensorFlow's native code",
        "SIGILL": "a crash in TensorFlow's native code",
        "SIGFPE": "a crash in TensorFlow's native code (arithmetic fault)",
        "SIGABRT": f"TensorFlow aborted: a failed internal check, or memory exhausted under the limit of "
                   f"{gib:.1f} GiB (--max-memory)",
        "SIGKILL": "killed from outside the process (e.g. the kernel's out-of-memory killer)",
        "SIGXCPU": f"it used more than its CPU-time limit of {limits.cpu_seconds():.0f} s",
        "SIGXFSZ": "it wrote a file larger than its limit",
    }.get(name, "")
    return f"{name}" + (f" ({why})" if why else "")


def _python_read_paths() -> list[str]:
    """What the child may read besides its scratch directory: the Python installation (interpreter,
    standard library, site-packages, graphslim itself) and the system's shared libraries."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             str(Path(sys.executable).resolve().parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib", "include", "scripts", "data"):
        p = sysconfig.get_paths().get(key)
        if p:
            paths.add(p)
    try:
        import site

        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
    except Exception:  # noqa: BLE001 - a minimal interpreter may lack site's helpers
        pass
    paths.add(str(Path(__file__).resolve().parent))  # graphslim itself (this file's package)
    try:
        import passes

        paths.add(str(Path(passes.__file__).resolve().parent))
    except ImportError:
        pass
    paths.update(["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/usr/share/zoneinfo",
                  "/etc/ld.so.cache", "/etc/localtime", "/proc/self", "/proc/cpuinfo",
                  "/sys/devices/system/cpu", "/sys/fs/cgroup", "/dev/urandom", "/dev/random"])
    return sorted(p for p in paths if p and os.path.exists(p))


_LANDLOCK_WARNED = False


class Child:
    """One contained worker process. Not thread-safe: one request at a time."""

    def __init__(self, limits: Limits | None = None, read=(), label: str = "the model"):
        self.limits = limits or _DEFAULT
        self.label = label
        self.scratch = Path(tempfile.mkdtemp(prefix="graphslim-exec-"))
        self._stderr_path = self.scratch / ".stderr"
        self._dead: str | None = None
        self._next = 0
        self._released: list[int] = []  # handles to drop with the next request (see release)
        self.engine_info: dict[int, dict] = {}
        config = {
            "scratch": str(self.scratch),
            "read": _python_read_paths() + [str(Path(p).resolve()) for p in read],
            "write": [str(self.scratch), "/dev/null"],
            "memory": self.limits.memory_bytes(),
            "file_size": int(self.limits.file_size),
            "threads": int(self.limits.threads),
        }
        env = dict(os.environ)
        env.update(HOME=str(self.scratch), TMPDIR=str(self.scratch), PYTHONDONTWRITEBYTECODE="1",
                   PYTHONUNBUFFERED="1")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        path = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        stderr = open(self._stderr_path, "wb")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "graphslim._worker", json.dumps(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=self.scratch, env=env,
                start_new_session=True, close_fds=True)
        except BaseException:
            stderr.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise
        stderr.close()
        self._in = self._proc.stdout.fileno()
        self._out = self._proc.stdin.fileno()
        os.set_blocking(self._out, False)
        try:
            ready, _ = self._request({"op": "hello"}, None, "starting the execution process",
                                     max(_STARTUP_SECONDS, self.limits.timeout))
        except BaseException:
            self.close()
            raise
        self.landlock = ready.get("landlock", 0)
        global _LANDLOCK_WARNED
        if not self.landlock and not _LANDLOCK_WARNED:
            _LANDLOCK_WARNED = True
            warnings.warn(f"models run without Landlock file-system containment: "
                          f"{ready.get('landlock_reason') or 'unavailable'}; the other limits still apply",
                          SandboxNote, stacklevel=2)

    # ------------------------------------------------------------------ plumbing
    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    def _stderr_tail(self) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def _kill(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _failure(self, what: str, timeout: float | None = None) -> ExecutionError:
        if timeout is not None:
            self._kill()
            self._dead = "timed out"
            return ExecutionError(
                f"{what}: {self.label} did not finish within {timeout:g} s, so its process was killed "
                "(SIGKILL). The model may loop forever, block or sleep; if it is merely slow, raise the "
                "limit with --timeout SECONDS.")
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self._proc.returncode
        tail = self._stderr_tail()
        detail = f" Its last message: {tail}" if tail else ""
        if code is not None and code < 0:
            self._dead = f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else "killed"
            return ExecutionError(f"{what}: the process running {self.label} was killed by "
                                  f"{_signal_text(-code, self.limits)}; no result.{detail}")
        self._dead = f"exit status {code}"
        return ExecutionError(f"{what}: the process running {self.label} ended (exit status {code}) "
                              f"without an answer; the model may hold an op that ends the process "
                              f"(Abort) or TensorFlow hit a fatal error.{detail}")

    def _write_all(self, chunks, deadline: float, what: str, timeout: float) -> None:
        for chunk in chunks:
            view = memoryview(chunk).cast("B") if not isinstance(chunk, memoryview) else chunk
            pos = 0
            while pos < len(view):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._failure(what, timeout)
                _, w, _ = select.select([], [self._out], [], min(remaining, 0.5))
                if not w:
                    if self._proc.poll() is not None:
                        raise self._failure(what)
                    continue
                try:
                    pos += os.write(self._out, view[pos:pos + _CHUNK])
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    raise self._failure(what) from None

    def _read_exact(self, n: int, deadline: float, what: str, timeout: float) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure(what, timeout)
            r, _, _ = select.select([self._in], [], [], min(remaining, 0.5))
            if not r:
                continue
            k = os.readv(self._in, [view[got:got + _CHUNK]])
            if k == 0:
                raise self._failure(what)
            got += k
        return buf

    def _request(self, header: dict, arrays, what: str, timeout: float | None = None):
        if self._dead is not None:
            raise ExecutionError(f"{what}: the process running {self.label} is no longer usable "
                                 f"({self._dead}); start again")
        timeout = self.limits.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        header = {**header, "cpu": self.limits.cpu_seconds()}
        if self._released:
            header["release"], self._released = self._released, []
        try:
            self._write_all(encode(header, arrays), deadline, what, timeout)
            (size,) = _LEN.unpack(self._read_exact(_LEN.size, deadline, what, timeout))
            if size > _HEADER_MAX:
                raise ValueError(f"header of {size} bytes")
            reply = json.loads(bytes(self._read_exact(size, deadline, what, timeout)))
            if not isinstance(reply, dict):
                raise ValueError("the reply is not an object")
            arrays = decode_arrays(reply.get("arrays", []),
                                    lambda n: self._read_exact(n, deadline, what, timeout))
        except ExecutionError:
            raise
        except BaseException as exc:
            # interrupted (Ctrl-C, SIGTERM) or a malformed reply: the child is in an unknown state
            self._kill()
            self._dead = "interrupted" if isinstance(exc, KeyboardInterrupt) else "protocol error"
            if isinstance(exc, (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError)):
                raise ExecutionError(f"{what}: the process running {self.label} sent a malformed reply "
                                     f"({exc}); it was killed") from None
            raise
        if "error" in reply:
            if reply.get("kind") == "runtime":
                raise RuntimeUnavailable(
                    f"{what}: the {reply.get('runtime', 'requested')} runtime is not installed where models "
                    f"run: {str(reply.get('reason'))[:500]}. Install it with pip install 'graphslim[litert]' "
                    f"(the ai-edge-litert package), or choose another runtime (tf, xla).")
            if reply.get("kind") == "tflite":
                ops = reply.get("ops")
                raise ConversionError(str(reply.get("reason") or reply["error"])[:2000],
                                      ops=[str(op)[:200] for op in ops[:20]] if isinstance(ops, list) else [])
            raise ExecutionError(f"{what}: {reply['error']}")
        return reply, arrays

    # ------------------------------------------------------------------ API
    def _graph_request(self, graph, header: dict, what: str, timeout: float | None = None):
        """Send ``graph`` (graphslim IR: its GraphDef and the weights the loader read) with ``header``;
        a TFLite conversion failure is a ConversionError naming the label and nodes of the ops."""
        from graphslim.ir.tfconv import graph_to_graph_def

        arrays = {"graph_def": np.frombuffer(graph_to_graph_def(graph).SerializeToString(), dtype=np.uint8)}
        for name, w in graph.weights.items():
            arrays[f"w:{name}"] = w.value
        header = {**header, "inputs": [[a.name, str(a.tensor)] for a in graph.inputs],
                  "outputs": [[a.name, str(a.tensor)] for a in graph.outputs], "weights": list(graph.weights)}
        try:
            return self._request(header, arrays, what, timeout)
        except ConversionError as exc:
            nodes = [f"{op} at {', '.join(repr(n.name) for n in graph.nodes(op)[:3])}" for op in exc.ops
                     if graph.nodes(op)]
            where = f" (nodes: {'; '.join(nodes)})" if nodes else ""
            raise ConversionError(f"{self.label} cannot be converted to TFLite: {exc}{where}.",
                                  ops=exc.ops) from None

    def load_graph(self, graph, engine: str = "graph") -> int:
        """Send ``graph`` (graphslim IR: GraphDef + weights) to the child; returns a handle. ``engine``:
        ``graph`` (a TF1-style session: TensorFlow's graph executor with Grappler), ``xla``
        (``tf.function(jit_compile=True)``) or ``litert`` (converted to TFLite with builtin ops in
        the child and run by the LiteRT interpreter, XNNPACK, ``Limits.threads`` threads; it returns
        the signature's outputs only). A graph TFLite cannot convert raises ConversionError. What the
        child said about the engine (``interpreter``, ``tflite_bytes``) is in ``engine_info[handle]``."""
        self._next += 1
        handle = self._next
        converting = engine == "litert"
        reply, _ = self._graph_request(
            graph, {"op": "load", "id": handle, "engine": engine},
            f"loading {self.label}" + (" into LiteRT" if converting else ""),
            max(self.limits.timeout, CHECK_SECONDS) if converting else None)
        self.engine_info[handle] = {k: v if isinstance(v, (int, float)) else str(v)[:200]
                                    for k, v in reply.items() if k in ("interpreter", "tflite_bytes")}
        return handle

    def load_trainer(self, graph, trainable, terms: list) -> int:
        """Send ``graph`` as a trainer (:mod:`graphslim._trainer`): the weights named in ``trainable``
        become trainable variables; ``terms`` are the loss terms (``key``, ``kind``, ``tensor``,
        ``weight``, and ``scale`` or ``temperature``). Returns a handle for :meth:`train_step`,
        :meth:`evaluate` and :meth:`trained_weights`."""
        self._next += 1
        handle = self._next
        self._graph_request(graph, {"op": "load", "id": handle, "engine": "trainer",
                                    "trainable": sorted(trainable), "terms": list(terms)},
                            f"loading {self.label} for training")
        return handle

    def train_step(self, handle: int, inputs: dict, targets: dict, lr: float) -> dict:
        """One Adam step on a batch; ``{"loss": before the step, "parts": per term}``."""
        reply, _ = self._request({"op": "train", "id": handle, "lr": float(lr)}, _batch(inputs, targets),
                                 f"training {self.label}")
        return {"loss": float(reply["loss"]), "parts": {k: float(v) for k, v in reply["parts"].items()}}

    def evaluate(self, handle: int, inputs: dict, targets: dict) -> tuple[dict, dict]:
        """The loss on a batch without a step, and the signature outputs."""
        reply, arrays = self._request({"op": "evaluate", "id": handle}, _batch(inputs, targets),
                                      f"evaluating {self.label}")
        return ({"loss": float(reply["loss"]), "parts": {k: float(v) for k, v in reply["parts"].items()}},
                {k[4:]: v for k, v in arrays.items() if k.startswith("out:")})

    def trained_weights(self, handle: int) -> dict:
        """The trainer's trainable weights now: ``{weight name: array}``."""
        _, arrays = self._request({"op": "weights", "id": handle}, None, f"reading the weights of {self.label}")
        return {k[2:]: v for k, v in arrays.items() if k.startswith("w:")}

    def grad_products(self, handle: int, inputs: dict, logits: str, tensors: list) -> list:
        """On a trainer (:meth:`load_trainer`) and a batch: per requested ``(tensor, axis)``, an array
        ``[batch, tensor's size along axis]`` of ``Σ ∂L/∂a · a`` over the example's other axes, L the summed
        cross-entropy of ``logits`` against their own argmax (:func:`graphslim.analysis.calibration.collect_gradients`)."""
        _, arrays = self._request({"op": "grad_products", "id": handle, "logits": str(logits),
                                   "tensors": [[str(t), int(a)] for t, a in tensors]},
                                  {f"in:{k}": v for k, v in inputs.items()}, f"computing gradients of {self.label}")
        return [arrays[f"g{i}"] for i in range(len(tensors))]

    def to_tflite(self, graph) -> bytes:
        """The TFLite flatbuffer of ``graph``, converted in the child (TensorFlow's TFLite converter,
        builtin ops; see :mod:`graphslim._litert`). ConversionError names the ops TFLite lacks or
        the converter's reason. The request's time limit is at least :data:`CHECK_SECONDS`."""
        _, arrays = self._graph_request(graph, {"op": "to_tflite"}, f"converting {self.label} to TFLite",
                                        max(self.limits.timeout, CHECK_SECONDS))
        flatbuffer = arrays.get("tflite")
        if flatbuffer is None or flatbuffer.dtype != np.uint8 or flatbuffer.ndim != 1:
            raise ExecutionError(f"converting {self.label} to TFLite: the child sent no flatbuffer")
        return flatbuffer.tobytes()

    def load_saved_model(self, path, signature: str = "serving_default") -> tuple[int, dict, list]:
        """TensorFlow's own loader on ``path`` inside the child (trusted inputs only: it runs the
        model's restore functions). Returns (handle, input specs {name: (shape, dtype name)}, output
        names). The child must have been started with ``read=[path]``."""
        self._next += 1
        handle = self._next
        reply, _ = self._request({"op": "load_saved_model", "id": handle, "path": str(path),
                                  "signature": signature}, None, f"loading {self.label} with TensorFlow")
        return handle, {k: (v[0], v[1]) for k, v in reply["inputs"].items()}, reply["outputs"]

    def check_saved_model(self, path, signature: str, full: bool = True) -> None:
        """Check in the child that TensorFlow loads the SavedModel at ``path`` (what the emitter just
        wrote): every function of its library imports and, with ``full``, ``tf.saved_model.load``
        revives it with the signature ``signature`` (nothing is run, nothing kept). The child may read
        only its scratch directory, so the files are copied there first (a copy, not a link: the child
        cannot change the originals) and removed afterwards; without ``full`` only ``saved_model.pb``.
        The request's time limit is at least :data:`CHECK_SECONDS`. ExecutionError when TensorFlow
        refuses the model or the child fails (crash, limit, timeout)."""
        self._next += 1
        copy = self.scratch / f"check-{self._next}"
        try:
            if full:
                shutil.copytree(path, copy, symlinks=True)
            else:
                copy.mkdir()
                shutil.copyfile(Path(path) / "saved_model.pb", copy / "saved_model.pb")
            self._request({"op": "check_saved_model", "path": str(copy), "signature": signature, "full": full},
                          None, f"checking {self.label}", max(self.limits.timeout, CHECK_SECONDS))
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    def run(self, handle: int, inputs: dict, fetch=None) -> dict:
        _, arrays = self._request({"op": "run", "id": handle, "fetch": fetch},
                                  {f"in:{k}": v for k, v in inputs.items()}, f"running {self.label}")
        return arrays

    def set_inputs(self, handle: int, inputs: dict) -> None:
        self._request({"op": "set_inputs", "id": handle}, {f"in:{k}": v for k, v in inputs.items()},
                      f"feeding {self.label}")

    def time(self, handle: int, calls: int) -> float:
        """Seconds per call, ``calls`` calls on the inputs of :meth:`set_inputs`, timed in the child."""
        reply, _ = self._request({"op": "time", "id": handle, "calls": int(calls)}, None,
                                 f"timing {self.label}")
        return float(reply["seconds"])

    def release(self, handle: int) -> None:
        """Drop ``handle`` with the next request (safe from ``__del__``: sends nothing now)."""
        self._released.append(handle)
        self.engine_info.pop(handle, None)

    def drop(self, handle: int) -> None:
        self.engine_info.pop(handle, None)
        if self.alive:
            self._request({"op": "drop", "id": handle}, None, f"releasing {self.label}")

    def close(self) -> None:
        try:
            if self._proc.poll() is None and self._dead is None:
                try:
                    self._write_all(encode({"op": "exit"}), time.monotonic() + 2, "closing", 2)
                    self._proc.wait(timeout=5)
                except (ExecutionError, subprocess.TimeoutExpired, OSError):
                    pass
            self._kill()
        finally:
            for f in (self._proc.stdin, self._proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            shutil.rmtree(self.scratch, ignore_errors=True)
            self._dead = self._dead or "closed"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _batch(inputs: dict, targets: dict) -> dict:
    """A train/evaluate request's arrays: ``in:NAME`` signature inputs, ``t:KEY`` loss targets (the
    worker splits them back with ``_inputs_and_targets``)."""
    return {**{f"in:{k}": v for k, v in inputs.items()}, **{f"t:{k}": v for k, v in targets.items()}}


# ------------------------------------------------------------------------------------ shared child
_SHARED: dict = {}
_SHARED_LOCK = threading.Lock()


def shared_child(label: str = "the model") -> Child:
    """A child with the default limits, reused across runs in this process (TensorFlow's start-up is
    paid once). Each model is loaded as its own graph and session; a child that failed is replaced."""
    with _SHARED_LOCK:
        key = (_DEFAULT, threading.get_ident())
        child = _SHARED.get(key)
        if child is None or not child.alive:
            if child is not None:
                child.close()
            child = _SHARED[key] = Child(_DEFAULT)
        child.label = label
        return child


def close_shared() -> None:
    with _SHARED_LOCK:
        children = list(_SHARED.values())
        _SHARED.clear()
    for child in children:
        child.close()


atexit.register(close_shared)
