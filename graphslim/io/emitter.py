"""Write the IR as a TF2 SavedModel: fine-tunable variables, the original signature, assets.

What :func:`save` produces:

* every weight becomes a ``tf.Variable`` named like the weight (``conv2d/kernel``), with its trainable
  flag (a large weight is copied into it block by block: one copy of each weight while writing), so the checkpoint's object graph gives ``full_name == "conv2d/kernel"``. The root object
  tracks them in a dict keyed by weight name (checkpoint keys ``weights/conv2d.Skernel/...``, in
  TensorFlow's escaping of ``/``) and exposes ``variables``, ``trainable_variables`` and
  ``non_trainable_variables``;
* one ``tf.function`` whose body re-imports the IR's GraphDef with weights mapped onto variable reads
  and signature inputs onto the function arguments. Node names are kept as in the IR (no ``import/``
  prefix; a name TensorFlow already took inside the function, e.g. an input's name reused by another
  node, gets a ``_1`` suffix). It is exported both as the signature ``graph.signature_name`` and as
  the method ``serve``, and returns ``{output name: tensor}``;
* each ``graph.assets`` entry as ``<out>/assets/<file name>``, tracked as ``tf.saved_model.Asset``;
* with ``jit_compile=True``, the function is marked for XLA (``tf.function(jit_compile=True)``):
  TensorFlow compiles it with XLA when the loaded model is called (once per input shape), which fuses
  the element-wise ops between convolutions. The function is lowered to XLA's HLO before anything is
  written, so a model with an op XLA has no kernel for fails here, naming the op (see
  :func:`_check_xla` for unknown input dimensions).

Writing is atomic: everything goes into a temporary directory beside ``out_dir`` that is renamed into
place at the end. On failure nothing is left behind and :class:`~graphslim.errors.EmitError` says
why. An existing ``out_dir`` is replaced only with ``force=True``, and only once the new model is
complete, by one atomic exchange of the two directories on Linux (``renameat2``), so that ``out_dir``
always holds a whole model (elsewhere: two renames, with an instant between them).

Example::

    from graphslim.io.emitter import save

    path = save(graph, "out/model")              # EmitError if out/model exists
    loaded = tf.saved_model.load(str(path))
    probs = loaded.serve(images)["probs"]        # or loaded.signatures["serving_default"](x=images)
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import threading
import warnings

import tensorflow as tf
from tensorflow.core.framework import graph_pb2

from graphslim import signals
from graphslim.errors import EmitCheckError, EmitError, XlaCheckWarning
from graphslim.ir.functions import rename_library
from graphslim.ir.graph import WEIGHT_OP, Graph, Tensor
from graphslim.ir.storage import row_blocks
from graphslim.ir.tfconv import graph_to_graph_def, parse_input
from graphslim.version import __version__

__all__ = ["save", "xla_cpu_caveats"]

_EMITS = itertools.count()  # functions are renamed per emit: TensorFlow keeps one per name per process

# A node name TensorFlow accepts for an op created from Python (``ops._VALID_OP_NAME_REGEX``).
_VALID_OP_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")
_FLAT_NAME = re.compile(r"[^A-Za-z0-9_.-]")


class _Stage(Exception):
    """Internal: a failure with a description of what was being done (becomes the EmitError)."""


def save(graph: Graph, out_dir, *, force: bool = False, jit_compile: bool = False) -> pathlib.Path:
    """Write ``graph`` as a TF2 SavedModel directory at ``out_dir`` and return its path.

    Raises EmitError (nothing written) if ``out_dir`` exists and ``force`` is false, or if any step
    fails. With ``force=True`` an existing ``out_dir`` is replaced once the new model is complete.
    ``jit_compile=True`` marks the serving function for XLA compilation (checked before writing).
    """
    out = pathlib.Path(out_dir).absolute()
    if _exists(out) and not force:
        raise EmitError(f"cannot write the SavedModel to {out}: it exists; pass force=True / --force "
                        "to replace it")
    tmp = None
    created_parents: list = []
    try:
        # Interrupts (SIGINT, SIGTERM turned into an exception by the CLI) are held back while a
        # directory is created or renamed and during the cleanup, so that neither leaks half done;
        # they are raised as soon as that step is over, and the cleanup below runs.
        with _deferred_signals():
            created_parents = _make_parents(out)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.graphslim-tmp-", dir=out.parent))
        model_dir = tmp / "model"
        with tf.name_scope(""):  # a caller's name scope would prefix the variable names
            _write(graph, model_dir, tmp / "assets_src", jit_compile)
        with _deferred_signals():
            signals.raise_if_received()  # one that came during the write, even if its exception was lost
            _move_into_place(model_dir, out, force)
    except BaseException as exc:
        with _deferred_signals():
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for d in reversed(created_parents):
                _rmdir_quietly(d)
        if not isinstance(exc, Exception) or isinstance(exc, EmitError):
            raise
        raise EmitError(f"cannot write the SavedModel to {out}: {_describe(exc)}{_disk_hint(exc)}") from exc
    with _deferred_signals():
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_DEFERRED = tuple(sorted(signals.WATCHED))


@contextlib.contextmanager
def _deferred_signals():
    """Hold SIGINT/SIGTERM/SIGHUP back for the duration of a short critical step, then deliver them.

    Only the main thread can swap Python signal handlers; elsewhere this does nothing (the caller's
    thread is not the one a signal's exception would be raised in anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {}
    try:
        for sig in _DEFERRED:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda signum, frame: pending.append(signum))
    except (ValueError, OSError):  # not allowed here (an embedded interpreter): run unshielded
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum in pending[:1]:
            signal.raise_signal(signum)  # the restored handler runs now (raises, or exits)


def _disk_hint(exc: BaseException) -> str:
    """A hint when the failure looks like a full disk or a file size limit."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            break
        text = str(exc)
        if "No space left" in text or "File too large" in text or "Disk quota" in text:
            break
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    else:
        return ""
    if exc is None:
        return ""
    return " (the disk is full or a file size limit was reached; nothing was written)"


# ---------------------------------------------------------------------------------------------- build
def _write(graph: Graph, model_dir: pathlib.Path, assets_src: pathlib.Path, jit_compile: bool = False) -> None:
    root = tf.__internal__.tracking.AutoTrackable()
    variables = _make_variables(graph)
    # Attribute order matters: checkpoint keys come from the first path a breadth-first walk finds,
    # so the dict keyed by weight name must be tracked before the lists.
    root.weights = variables
    root.variables = list(variables.values())
    root.trainable_variables = [v for v in variables.values() if v.trainable]
    root.non_trainable_variables = [v for v in variables.values() if not v.trainable]
    if graph.assets:
        root.assets = _make_assets(graph, assets_src)

    # The function is traced once, inside tf.saved_model.save: a trace made outside the save context
    # has another cache key, so the SavedModel would hold the function body twice.
    traced = []
    root.serve = _make_function(graph, variables, traced, jit_compile)
    if jit_compile:  # before anything is written (the check traces its own copy of the function)
        _check_xla(graph, root.serve)
    try:
        tf.saved_model.save(root, str(model_dir), signatures={graph.signature_name: root.serve})
    except Exception as exc:
        if traced and not traced[-1]:
            raise _Stage(f"the graph cannot be rebuilt in TensorFlow{_where(exc, graph)} "
                         f"({_describe(exc)})") from exc
        raise _Stage(f"TensorFlow failed to write it ({_describe(exc)})") from exc
    _check_loads(graph, model_dir)
    (model_dir / MARKER).write_text(json.dumps({"written_by": "graphslim", "version": __version__}) + "\n")


#: a file beside saved_model.pb saying that graphslim wrote the model (TensorFlow ignores it)
MARKER = "graphslim.json"

#: models whose weights take more bytes than this are checked without restoring their variables
FULL_LOAD_CHECK_BYTES = 1 << 30


def _check_loads(graph: Graph, model_dir: pathlib.Path) -> None:
    """What was just written must load in TensorFlow: its function library is closed (checked here, on
    the protos) and every function imports (loading never runs the model's computation), and, unless
    the weights are larger than FULL_LOAD_CHECK_BYTES, ``tf.saved_model.load`` revives it with its
    signature. TensorFlow's part runs in the shared execution child (:mod:`graphslim.sandbox`), on a
    copy of the files in its scratch directory: a model that makes TensorFlow's loader crash, abort or
    hang ends that child (killed at its time limit), never this process. A failure is graphslim's fault,
    not the input's: EmitCheckError (exit 3)."""
    from tensorflow.core.protobuf import saved_model_pb2

    from graphslim.sandbox import ExecutionError, shared_child

    try:
        sm = saved_model_pb2.SavedModel()
        sm.ParseFromString((model_dir / "saved_model.pb").read_bytes())
        meta = sm.meta_graphs[0]
        library = {f.signature.name: f for f in meta.graph_def.library.function}
        from graphslim.ir.functions import closure, node_refs

        roots = set()
        for nd in meta.graph_def.node:
            roots |= node_refs(nd, library)
        for fdef in library.values():
            roots |= {fdef.signature.name}
        missing = sorted(closure(roots, library) - set(library))
        if missing:
            raise ValueError(f"its function library lacks {', '.join(map(repr, missing[:5]))}")
        full = sum(w.value.nbytes for w in graph.weights.values()) <= FULL_LOAD_CHECK_BYTES
        shared_child("the SavedModel graphslim wrote").check_saved_model(model_dir, graph.signature_name, full)
    except Exception as exc:  # noqa: BLE001 - whatever TensorFlow says, the model must not be written
        why = _describe(exc) if not isinstance(exc, ExecutionError) else _shorten(str(exc))
        raise EmitCheckError(
            f"internal error: the SavedModel graphslim wrote does not load in TensorFlow "
            f"({why}); nothing was written. This is a graphslim bug: please report it with the "
            f"model's op types (graphslim inspect) and the pipeline.") from exc


def xla_cpu_caveats(graph: Graph) -> list[str]:
    """Why ``jit_compile=True`` may make this model slower on CPU (empty if nothing is known).

    XLA's CPU backend has no fast kernel for depthwise convolutions: a pruned MobileNetV2 ran 4-5x
    slower under XLA than in TensorFlow's graph executor on a 2-core machine (`graphslim bench --xla`),
    while a pruned ResNet50 ran faster (benchmarks/prune_resnet50.py)."""
    depthwise = [n.name for n in graph.nodes("DepthwiseConv2dNative")]
    if not depthwise:
        return []
    return [f"the model has {len(depthwise)} depthwise convolution(s) (e.g. {depthwise[0]!r}), which XLA "
            "runs several times slower on CPU than TensorFlow's own kernels: on CPU, time the model "
            "with and without --jit-compile before deploying it (on GPU XLA handles them well)"]


# Unknown dimensions of a signature input when the XLA check lowers the function: batch 1, the others
# each of these in turn (small first; 256 suits networks that need large inputs or multiples of 64).
XLA_CHECK_DIMS = (32, 256)


def _check_xla(graph: Graph, fn) -> None:
    """Lower ``fn`` (the jit_compile serving function) to XLA's HLO, so that a model XLA cannot compile
    fails now, with the reason, and not on its first call after loading.

    XLA compiles a function per input shape; unknown input dimensions are taken as 1 for the first
    (batch) dimension and each of XLA_CHECK_DIMS in turn for the others. The model is refused when XLA
    lacks a kernel for one of its ops, or when it fails at its own, fully known, input shapes. When it
    fails only at assumed shapes (a network may need inputs larger than, or multiples of, what was
    assumed), that says nothing of the shapes it will be called with: :class:`XlaCheckWarning` is
    issued and the model is written."""
    base = []
    for arg in graph.inputs:
        spec = _input_spec(graph, arg)
        if spec.shape.rank is None:
            raise _Stage(f"jit_compile: signature input {arg.name!r} has an unknown rank, and XLA needs "
                         "static shapes; save without jit_compile (drop --jit-compile)")
        base.append((spec.shape.as_list(), spec.dtype))
    assumed = any(d is None for dims, _ in base for d in dims)
    # The same body without the input signature, whose unknown dimensions XLA cannot lower.
    check = tf.function(fn.python_function, autograph=False, jit_compile=True)
    failures = []
    for size in XLA_CHECK_DIMS if assumed else (None,):
        specs = [tf.TensorSpec([d if d is not None else (1 if i == 0 else size) for i, d in enumerate(dims)],
                               dtype) for dims, dtype in base]
        try:
            check.experimental_get_compiler_ir(*specs)(stage="hlo")
            return
        except Exception as exc:
            text = _describe(exc)
            found = re.search(r"unsupported operations when trying to compile graph \S+ on \S+: (.*?) \(No ",
                              text)
            if found or not assumed:
                what = f"XLA has no kernel for {found.group(1)}" if found else f"XLA cannot compile it ({text})"
                raise _Stage(f"jit_compile was asked for, but {what}. Save without jit_compile (drop "
                             "--jit-compile); TensorFlow's graph executor runs the model as it is") from exc
            failures.append(f"{[s.shape.as_list() for s in specs]}: {text}")
    warnings.warn(XlaCheckWarning(
        "jit_compile: the model could not be checked for XLA, because lowering it failed at the input "
        f"shapes assumed for its unknown dimensions ({'; '.join(failures)}). It is written marked for "
        "XLA; call it once at a real input shape to see that XLA compiles it, or save without "
        "jit_compile"), stacklevel=2)


#: weights at least this large become variables block by block (see :func:`_make_variable`)
BLOCKWISE_BYTES = 64 << 20


def _make_variable(name: str, value, trainable: bool):
    """A ``tf.Variable`` holding ``value``. A large one is allocated once and filled in blocks of rows
    (each block converted, assigned in place and, when the weight is file-mapped, its pages released),
    so that writing it takes one copy of the weight (the variable's), not the three a
    ``tf.Variable(array)`` briefly holds (the array, the tensor converted from it, the variable)."""
    if value.nbytes < BLOCKWISE_BYTES or value.ndim == 0 or value.dtype.kind not in "fiuc":
        return tf.Variable(value, name=name, trainable=trainable)
    shape, dtype = value.shape, tf.as_dtype(value.dtype)
    var = tf.Variable(lambda: tf.zeros(shape, dtype), name=name, trainable=trainable)
    for start, block in row_blocks(value):
        tf.raw_ops.ResourceStridedSliceAssign(ref=var.handle, begin=[start], end=[start + len(block)],
                                              strides=[1], value=block)
    return var


def _make_variables(graph: Graph) -> dict:
    variables = {}
    for name, w in graph.weights.items():
        try:
            variables[name] = _make_variable(name, w.value, bool(w.trainable))
        except Exception as exc:
            raise _Stage(f"weight {name!r} (dtype {w.value.dtype}, shape {tuple(w.value.shape)}) cannot "
                         f"become a tf.Variable ({_describe(exc)})") from exc
    return variables


def _make_assets(graph: Graph, assets_src: pathlib.Path) -> dict:
    """Write ``graph.assets`` for TensorFlow to copy into the model, within the loader's size limits
    (``graph.meta["max_asset_mb"]`` per file, 4 times that in all: a pass or plugin that made a larger
    asset is refused before anything is written)."""
    from graphslim.io.loader import ASSETS_TOTAL_FACTOR, MAX_ASSET_MB

    per_file = int(float(graph.meta.get("max_asset_mb") or MAX_ASSET_MB) * 2**20)
    contents, total = {}, 0
    for filename, content in graph.assets.items():
        if not filename or filename in (".", "..") or "/" in filename or os.sep in filename:
            raise _Stage(f"asset name {filename!r} is not a plain file name (SavedModel assets are "
                         "stored flat in assets/)")
        data = content if isinstance(content, bytes) else str(content).encode("utf-8")
        total += len(data)
        if len(data) > per_file or total > ASSETS_TOTAL_FACTOR * per_file:
            what = (f"asset {filename!r} holds {len(data):,} bytes" if len(data) > per_file else
                    f"the assets hold more than {ASSETS_TOTAL_FACTOR * per_file:,} bytes together")
            raise _Stage(f"{what}, over the limit of {per_file:,} bytes per asset file "
                         f"({ASSETS_TOTAL_FACTOR} times that in all); raise it with --max-asset-mb N "
                         "(load(max_asset_mb=N)) if the model really needs it")
        contents[filename] = data
    assets_src.mkdir()
    tracked = {}
    for filename, data in contents.items():
        path = assets_src / filename
        path.write_bytes(data)
        tracked[filename] = tf.saved_model.Asset(str(path))
    return tracked


def _input_spec(graph: Graph, arg) -> tf.TensorSpec:
    node = graph.producer(arg.tensor)
    if node.op != "Placeholder" or arg.tensor.port != 0:
        raise _Stage(f"signature input {arg.name!r} is bound to {arg.tensor} ({node.op}); inputs must be "
                     "Placeholder outputs")
    dtype = node.attr("dtype") or graph.dtype(arg.tensor)
    shape = node.attr("shape") if "shape" in node.attrs else graph.shape(arg.tensor)
    return tf.TensorSpec(shape, dtype, name=arg.name)


def _make_function(graph: Graph, variables: dict, traced: list, jit_compile: bool = False):
    """The ``tf.function`` serving the graph. Each trace appends False to ``traced`` and sets it to
    True when the body is complete, so a failure can be attributed to the graph or to the writer."""
    for kind, args in (("input", graph.inputs), ("output", graph.outputs)):
        names = [a.name for a in args]
        if len(set(names)) != len(names):
            raise _Stage(f"signature {kind} names repeat: {names}")
    specs = [_input_spec(graph, a) for a in graph.inputs]
    input_nodes = [a.tensor.node for a in graph.inputs]
    gd, handles, used_inputs = _graph_def(graph, set(input_nodes))

    import_outputs = []  # output tensors produced by imported nodes (not signature inputs)
    for o in graph.outputs:
        if o.tensor.node not in input_nodes and o.tensor not in import_outputs:
            import_outputs.append(o.tensor)

    def body(*args):
        traced.append(False)
        args_by_node = dict(zip(input_nodes, args))
        feeds = {name: args_by_node[name] for name in used_inputs}
        for key, name in handles.items():
            # Converting the eager handle captures the variable (the function's resource input).
            feeds[key] = tf.convert_to_tensor(variables[name].handle, name=key)
        results = {}
        if gd.node:
            imported = tf.graph_util.import_graph_def(
                gd, input_map=feeds, return_elements=[_tensor_name(t) for t in import_outputs], name="")
            results = dict(zip(import_outputs, imported))
        outputs = {}
        for o in graph.outputs:
            t = args_by_node[o.tensor.node] if o.tensor.node in args_by_node else results[o.tensor]
            outputs[o.name] = tf.identity(t, name=_op_name(o.name))
        traced[-1] = True
        return outputs

    return tf.function(body, input_signature=specs, autograph=False, jit_compile=jit_compile or None)


def _graph_def(graph: Graph, input_nodes: set) -> tuple[graph_pb2.GraphDef, dict, set]:
    """The GraphDef to import into the function, and what ``input_map`` must feed it.

    Signature-input Placeholders are left out (the function's arguments replace them; control inputs
    from them are dropped). Each Weight that something reads becomes a ``ReadVariableOp`` named like
    the weight, reading an input fed with the variable's handle. That input is named
    ``<weight with / as _>_resource``: without a "/", because the importer renames a node whose name
    is a scope of a node already in the function (``conv2d`` if ``conv2d/kernel/resource`` exists).
    Returns the GraphDef, ``{resource input name: weight name}`` and the signature inputs it reads.
    """
    order = []
    for node in graph.topo_order():
        if node.name in input_nodes:
            continue
        if node.op == "Placeholder":
            raise _Stage(f"node {node.name!r} is a Placeholder that no signature input is bound to")
        if node.op == WEIGHT_OP and not graph.uses(node.output(0)) and not graph.control_consumers(node):
            continue  # read by nothing: still a variable of the model, but not in the function
        order.append(node)
    gd = graph_to_graph_def(graph, order)
    rename_library(gd, f"gs{next(_EMITS)}_{os.getpid()}")
    # The function graph it is imported into has TensorFlow's current producer version, and so will
    # the SavedModel; declaring it here checks op deprecations now and avoids a version warning.
    gd.versions.producer = max(gd.versions.producer, tf.version.GRAPH_DEF_VERSION)
    handles, used_inputs = {}, set()
    for nd in gd.node:
        if nd.name in graph.weights:
            key = base = _FLAT_NAME.sub("_", nd.name) + "_resource"
            i = 0
            while key in handles or graph.has_node(key):  # "a/b" and "a_b" flatten alike
                i += 1
                key = f"{base}_{i}"
            handles[key] = nd.name
            dtype = nd.attr["dtype"].type
            nd.op = "ReadVariableOp"
            nd.attr.clear()
            nd.attr["dtype"].type = dtype
            nd.input.append(key)
            continue
        keep = []
        for text in nd.input:
            src, _, control = parse_input(text)
            if src in input_nodes:
                if control:
                    continue
                used_inputs.add(src)
            keep.append(text)
        if len(keep) != len(nd.input):
            del nd.input[:]
            nd.input.extend(keep)
    return gd, handles, used_inputs


def _op_name(name: str) -> str | None:
    """``name`` if TensorFlow accepts it as an op name, else None (TensorFlow picks one)."""
    return name if _VALID_OP_NAME.match(name) and not name.endswith("/") else None


def _tensor_name(t: Tensor) -> str:
    return f"{t.node}:{t.port}"


# ---------------------------------------------------------------------------------------------- files
def _exists(path: pathlib.Path) -> bool:
    return path.exists() or path.is_symlink()


def _make_parents(out: pathlib.Path) -> list:
    """Create the missing parents of ``out``; return those created (outermost first), to undo."""
    missing = []
    p = out.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    missing.reverse()
    try:
        for d in missing:
            d.mkdir()
    except OSError as exc:
        for d in reversed(missing):
            _rmdir_quietly(d)
        raise EmitError(f"cannot write the SavedModel to {out}: cannot create its parent directory "
                        f"({_describe(exc)})") from None
    return missing


def _rmdir_quietly(d: pathlib.Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two directories atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False when the system
    or file system cannot (then the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(model_dir: pathlib.Path, out: pathlib.Path, force: bool) -> None:
    if not _exists(out):
        os.rename(model_dir, out)
        return
    if not force:
        raise _Stage("it appeared while the model was being written; pass force=True / --force to "
                     "replace it")
    # One atomic swap where Linux offers it: out_dir holds the old model, then the new one, and is
    # never missing; the old one (now in model_dir) is deleted afterwards.
    if _exchange(model_dir, out):
        shutil.rmtree(model_dir, ignore_errors=True)
        return
    # Elsewhere: old model aside, new one in, old one deleted: out_dir holds a complete model at every
    # moment except the instant between the two renames, and a failure there puts the old one back.
    aside = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.graphslim-old-", dir=out.parent))
    old = aside / "old"
    try:
        os.rename(out, old)
    except BaseException:
        _rmdir_quietly(aside)
        raise
    try:
        os.rename(model_dir, out)
    except BaseException as exc:
        try:
            os.rename(old, out)
        except OSError:  # never delete the old model: say where it is
            raise _Stage(f"the new model could not be moved in ({_describe(exc)}) and the old one "
                         f"could not be moved back; it is in {old}") from exc
        _rmdir_quietly(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_NODE_IN_ERROR = re.compile(r"\{\{node ([^}]+)\}\}|[Nn]ode '([^']+)'")


def _where(exc: BaseException, graph: Graph) -> str:
    """`` at node 'conv1/Conv2D' (Conv2D)`` when TensorFlow's message names a node of the graph."""
    for m in _NODE_IN_ERROR.finditer(str(exc)):
        name = m.group(1) or m.group(2)
        if graph.has_node(name):
            return f" at node {name!r} ({graph.node(name).op})"
    return ""


def _shorten(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(exc: BaseException) -> str:
    """One line saying what went wrong (TensorFlow messages run to many lines of context)."""
    if isinstance(exc, _Stage):
        return str(exc)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > 400:
        text = text[:400] + "..."
    kind = type(exc).__name__
    return f"{kind}: {text}" if text else kind
