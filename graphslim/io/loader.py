"""SavedModel / frozen GraphDef → graphslim IR, without running the model.

``load(path)`` reads ``saved_model.pb`` with protobuf, picks the MetaGraphDef by tags and the signature
by name, inlines every function call the signature makes into one flat graph, and reads the variables
from the checkpoint (``variables/``) with TensorFlow's checkpoint reader. It never calls
``tf.saved_model.load``: that revives Python objects (and fails on SavedModels written by older
TensorFlow versions, e.g. Keras models saved with optimizer slot variables), and it is slow.

Function inlining is :mod:`graphslim.io.inline`; how variables are found and read (TF2 object graphs,
TF1 collections) is :mod:`graphslim.io.variables`. Frozen GraphDefs: floating-point constants of
rank ≥ 1 become weights named after their node.

Example::

    g = graphslim.load("resnet50/")                      # serving_default, tags {"serve"}
    g = graphslim.load("model/", signature="embed")
    g = graphslim.load("frozen.pb")
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np

from graphslim.errors import GraphslimError, LoadError, VerificationError
from graphslim.ir.graph import WEIGHT_OP, Graph, SignatureArg, Tensor
from graphslim.ir import attrs as _attrs
from graphslim.ir.functions import CALL_INPUTS, closure, node_refs, specialize_resource_args
from graphslim.ir.tfconv import graph_from_node_defs, parse_input
from graphslim.io.inline import FunctionInliner
from graphslim.io.reader import (check_node_def, check_shape_proto, const_limit, dtype_size, first_line,
                                 parse_graph_def, parse_saved_model, pick_meta_graph, refuse_variant_constants,
                                 saved_model_file, signature_names)
from graphslim.io.variables import CheckpointVariables, check_var_value

MAX_ASSET_MB = 64  # per asset file, by default; all assets together: ASSETS_TOTAL_FACTOR times that
ASSETS_TOTAL_FACTOR = 4


def _tf():
    import tensorflow as tf  # deferred: importing TF costs ~2 s, error paths should not pay it twice

    return tf


# --------------------------------------------------------------------------------------- entry point
def load(path, signature: str = "serving_default", tags=("serve",), *, scan: bool = True,
         allow_ops=(), max_asset_mb: float = MAX_ASSET_MB) -> Graph:
    """Read a SavedModel directory (or a frozen GraphDef ``.pb`` file) into a :class:`Graph`.

    ``signature`` picks the SignatureDef; ``tags`` the MetaGraphDef. Raises :class:`LoadError` with a
    one-paragraph message naming the file and what to do when the model cannot be read.

    With ``scan`` (the default) the model is first checked by :mod:`graphslim.io.scan`: a graph or
    function library holding ops that touch files, the network, processes or Python, or variables /
    assets leading outside the model directory, raises
    :class:`~graphslim.io.scan.UnsafeModelError`; ``allow_ops`` names op types accepted knowingly.

    Assets (``assets/``) are read into ``graph.assets``: each file may hold at most ``max_asset_mb``
    MiB and all of them together 4 times that (sizes checked before reading); a larger one raises
    LoadError naming the file (the CLI's ``--max-asset-mb``).
    """
    path = Path(path)
    if not (isinstance(max_asset_mb, (int, float)) and not isinstance(max_asset_mb, bool)
            and max_asset_mb > 0):
        raise LoadError(f"max_asset_mb={max_asset_mb!r}: give the per-file asset limit as a positive "
                        f"number of MiB (default {MAX_ASSET_MB}).")
    try:
        return _load(path, signature, tags, scan, allow_ops, max_asset_mb)
    except GraphslimError:
        raise
    except RecursionError:
        raise LoadError(f"{path}: the model nests too deeply to read (RecursionError); it is malformed "
                        f"or hostile.") from None
    except MemoryError:
        raise LoadError(f"{path}: reading the model ran out of memory; it claims tensors larger than "
                        f"this machine can hold, or it is malformed.") from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a clean error, not a traceback
        err = LoadError(f"{path}: graphslim cannot read this model ({type(exc).__name__}: "
                        f"{first_line(exc)[:300]}). The SavedModel looks malformed; if TensorFlow itself "
                        f"loads it, this is a graphslim bug: please report it (GRAPHSLIM_DEBUG=1 shows "
                        f"the traceback).")
        err.unexpected = True  # the fuzz harnesses count these as bugs to fix
        raise err from exc


def _load(path: Path, signature, tags, scan, allow_ops, max_asset_mb=MAX_ASSET_MB) -> Graph:
    if not (path.exists() or path.is_symlink()):
        raise LoadError(f"{path}: no such file or directory. Pass a SavedModel directory (the folder "
                        f"holding saved_model.pb and variables/) or a frozen GraphDef .pb file.")
    if path.is_file():
        if path.name in ("saved_model.pb", "saved_model.pbtxt"):
            path = path.parent
        else:
            return _load_frozen(path, scan=scan, allow_ops=allow_ops)
    elif not path.is_dir():
        raise LoadError(f"{path}: not a regular file or directory (a FIFO, socket, device or broken link); "
                        f"pass a SavedModel directory or a frozen GraphDef .pb file.")
    sm = parse_saved_model(saved_model_file(path))
    meta = pick_meta_graph(sm, tags, path)
    if scan:
        from graphslim.io import scan as _scan

        err = _scan.refusal(_scan.check_paths(path, meta) + _scan.scan_meta_graph(meta), path, allow_ops)
        if err is not None:
            raise err
    loader = _SavedModelReader(path, meta, max_asset_mb)
    g = loader.build(signature)
    identity = _signature_identities(meta)
    g.meta["other_signatures"] = [n for n in signature_names(meta)
                                  if n != signature and identity[n] != identity.get(signature)]
    g.meta["scanned"] = bool(scan)
    g.meta["allowed_ops"] = sorted(_allowed(allow_ops))
    g.meta["max_asset_mb"] = max_asset_mb
    return g


def _allowed(allow_ops):
    from graphslim.io.scan import parse_allow_ops

    return parse_allow_ops(allow_ops)


def _signature_identities(meta) -> dict:
    """``{signature name: what it computes}``, to tell real other signatures from aliases (Keras
    exports ``serve`` and ``serving_default``: two wrapper functions calling the same function): its
    input and output keys, and the functions its outputs' call nodes call (or, without those, the
    outputs' tensor names)."""
    nodes = {n.name: n for n in meta.graph_def.node}
    lib = {f.signature.name: f for f in meta.graph_def.library.function}
    identities = {}
    for name, sd in meta.signature_def.items():
        called = set()
        for info in sd.outputs.values():
            node = nodes.get(info.name.split(":")[0].lstrip("^"))
            fname = node.attr["f"].func.name if node is not None and "f" in node.attr else None
            if fname in lib:
                called |= {n.attr["f"].func.name for n in lib[fname].node_def if "f" in n.attr} or {fname}
            else:
                called.add(info.name)
        identities[name] = (tuple(sorted(sd.inputs)), tuple(sorted(sd.outputs)), frozenset(called))
    return identities


# --------------------------------------------------------------------------------------- SavedModel
class _SavedModelReader:
    def __init__(self, path: Path, meta, max_asset_mb: float = MAX_ASSET_MB):
        self.path = path
        self.meta = meta
        self.max_asset_mb = max_asset_mb
        self.library = {f.signature.name: f for f in meta.graph_def.library.function}
        for f in self.library.values():  # before any function can reach TensorFlow (shape inference)
            for nd in f.node_def:
                refuse_variant_constants(nd, path / "saved_model.pb", f.signature.name)
        self.nodes = {}
        for nd in meta.graph_def.node:
            if nd.name in self.nodes:
                raise LoadError(f"{path / 'saved_model.pb'}: corrupt graph: two nodes are named {nd.name!r}. "
                                f"Re-export the model.")
            self.nodes[nd.name] = nd
        self.inliner = FunctionInliner(path, meta.graph_def, self.library, self.nodes)
        self.variables = CheckpointVariables(path, meta, self.nodes)

    # ------------------------------------------------------------------ top level
    def build(self, signature: str) -> Graph:
        tf = _tf()
        if signature not in self.meta.signature_def or signature.startswith("__"):
            names = signature_names(self.meta)
            raise LoadError(f"{self.path}: no signature named {signature!r}; the model has "
                            f"{', '.join(repr(n) for n in names) or 'no signatures'}. Pass one of those "
                            f"with signature= (--signature).")
        sig = self.meta.signature_def[signature]
        if not sig.outputs:
            raise LoadError(f"{self.path}: signature {signature!r} has no outputs; nothing to optimize.")
        inputs = {k: parse_input(v.name)[:2] for k, v in sig.inputs.items() if v.name}
        outputs = {k: parse_input(v.name)[:2] for k, v in sig.outputs.items() if v.name}
        for kind, table in (("input", inputs), ("output", outputs)):
            for key, (node, _) in table.items():
                if node not in self.nodes:
                    raise LoadError(f"{self.path}: signature {signature!r} {kind} {key!r} names tensor "
                                    f"{node!r}, which is not in the graph. The SavedModel is inconsistent; "
                                    f"re-export it.")
        for kind, table, dense in (("input", sig.inputs, inputs), ("output", sig.outputs, outputs)):
            for key in table:
                if key not in dense:
                    raise LoadError(f"{self.path}: signature {signature!r} {kind} {key!r} is not a dense "
                                    f"tensor (sparse and ragged {kind}s are not supported).")
        for kind, table in (("input", sig.inputs), ("output", sig.outputs)):
            for key, info in table.items():
                where = f"{self.path}: signature {signature!r} {kind} {key!r}"
                check_shape_proto(info.tensor_shape, where)
                dtype_size(info.dtype, where)
        # Only the part of the graph the outputs need.
        needed = self._ancestors([n for n, _ in outputs.values()])
        self.inliner.check_size(needed)
        var_info = self.variables.variable_info(needed)
        nodes, aliases = self.inliner.flatten(needed)
        g = self._to_ir(nodes, aliases, var_info, inputs, outputs, sig)
        g.signature_name = signature
        g.assets = self._assets()
        g.meta = {"source": str(self.path), "format": "saved_model", "signature": signature,
                  "tags": sorted(self.meta.meta_info_def.tags),
                  "tf_version": self.meta.meta_info_def.tensorflow_version}
        _finish(g, self.path)
        _check_signature_dtypes(g, sig, signature, self.path)
        del tf
        return g

    def _ancestors(self, roots) -> list[str]:
        seen, stack = set(), list(roots)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            nd = self.nodes.get(n)
            if nd is None:
                continue
            for text in nd.input:
                src, _, control = parse_input(text)
                if not control and src not in seen:
                    if src not in self.nodes:
                        raise LoadError(f"{self.path}: corrupt graph: node {n!r} reads {text!r}, but no "
                                        f"node {src!r} exists. Re-export the model.")
                    stack.append(src)
        return [n for n in self.nodes if n in seen]  # keep file order

    # ------------------------------------------------------------------ IR
    def _to_ir(self, nodes, aliases, var_info, inputs, outputs, sig) -> Graph:
        tf = _tf()
        from tensorflow.core.framework import node_def_pb2

        def resolve(text: str) -> str:
            seen = 0
            while True:
                src, port, _ = parse_input(text)
                key = f"{src}:{port}"
                if key in aliases:
                    text = aliases[key]
                    seen += 1
                    if seen > 10000:
                        raise LoadError(f"{self.path}: function outputs refer to each other in a cycle "
                                        f"at {key!r}.")
                    continue
                return key

        for nd in nodes.values():
            ins = [resolve(i) for i in nd.input]
            del nd.input[:]
            nd.input.extend(ins)

        # Variables: outer handles → Weight nodes; reads of them → uses of the Weight.
        weights = {}
        taken = set(nodes)
        handle_to_weight = {}
        for vname, (wname, key, trainable) in var_info.items():
            nd_var = nodes.get(vname)
            value = self.variables.read_tensor(key, wname, nd_var)
            check_var_value(self.path, vname, nd_var, value)
            base = wname = _valid_node_name(wname)
            if base in weights or (base in taken and base != vname):
                i = 1
                while f"{base}_{i}" in weights or f"{base}_{i}" in taken:
                    i += 1
                wname = f"{base}_{i}"
            weights[wname] = (value, trainable)
            handle_to_weight[vname] = wname
            taken.add(wname)

        def handle_source(text: str):
            src, port, _ = parse_input(text)
            while src in nodes and nodes[src].op == "Identity" and nodes[src].input:
                src, port, _ = parse_input(nodes[src].input[0])
            return handle_to_weight.get(src)

        redirect = {}
        weight_readers = set()  # nodes whose inputs were pointed at Weights here (gathers, bodies)
        drop = set(var_info)
        ref_vars = set()
        for vname, wname in handle_to_weight.items():
            if nodes.get(vname) is not None and nodes[vname].op in ("VariableV2", "Variable"):
                ref_vars.add(vname)  # TF1 ref variables are read directly: the Weight takes their place
                if wname != vname:
                    redirect[f"{vname}:0"] = f"{wname}:0"
        for name, nd in list(nodes.items()):
            if nd.op in ("ReadVariableOp", "ResourceGather") and len(nd.input) < (
                    1 if nd.op == "ReadVariableOp" else 2):
                raise LoadError(f"{self.path}: node {name!r} ({nd.op}) has {len(nd.input)} inputs; the "
                                f"model is corrupt.")
            if nd.op == "ReadVariableOp":
                w = handle_source(nd.input[0])
                if w is None:
                    raise LoadError(f"{self.path}: node {name!r} reads a variable that is not in the "
                                    f"checkpoint; graphslim cannot give it a value.")
                redirect[f"{name}:0"] = f"{w}:0"
                drop.add(name)
            elif nd.op == "ResourceGather":
                w = handle_source(nd.input[0])
                if w is None:
                    raise LoadError(f"{self.path}: node {name!r} gathers from a variable that is not in "
                                    f"the checkpoint.")
                axis = name + "/axis"
                nodes_axis = node_def_pb2.NodeDef(name=axis, op="Const")
                nodes_axis.attr["dtype"].type = tf.int32.as_datatype_enum
                nodes_axis.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.int32(0)))
                redirect_gather = node_def_pb2.NodeDef(name=name, op="GatherV2")
                redirect_gather.input.extend([f"{w}:0", nd.input[1], f"{axis}:0"])
                redirect_gather.attr["Tparams"].type = nd.attr["dtype"].type
                redirect_gather.attr["Tindices"].type = nd.attr["Tindices"].type
                redirect_gather.attr["Taxis"].type = tf.int32.as_datatype_enum
                redirect_gather.attr["batch_dims"].i = nd.attr["batch_dims"].i if "batch_dims" in nd.attr else 0
                nodes[name] = redirect_gather
                nodes[axis] = nodes_axis
                weight_readers.add(name)
        for name in drop:
            nodes.pop(name, None)
        # Identity chains over resource handles die with the handles.
        for name in [n for n, nd in nodes.items() if nd.op == "Identity" and nd.attr["T"].type == _attrs.DT_RESOURCE]:
            nodes.pop(name)

        weight_defs = []
        for wname, (value, trainable) in weights.items():
            w = node_def_pb2.NodeDef(name=wname, op=WEIGHT_OP)
            weight_defs.append(w)
        # Variables passed into While/If/Case bodies (or calls left inside them) as handles: the
        # bodies are specialized to take the value, and the node reads the Weight.
        library = dict(self.library)
        for nd in nodes.values():
            if nd.op not in CALL_INPUTS and nd.op not in library:
                continue
            values = {}
            for i, text in enumerate(nd.input):
                w = handle_source(text)
                if w is not None:
                    value = weights[w][0]
                    values[i] = (tf.as_dtype(value.dtype).as_datatype_enum, tuple(value.shape))
                    nd.input[i] = f"{w}:0"
            if values:
                specialize_resource_args(nd, values, library, self.path / "saved_model.pb")
                weight_readers.add(nd.name)
        for nd in nodes.values():
            ins = []
            for text in nd.input:
                src, port, _ = parse_input(text)
                key = f"{src}:{port}"
                while key in redirect:
                    key = redirect[key]
                if (src in handle_to_weight and src not in ref_vars and key == f"{src}:{port}"
                        and nd.name not in weight_readers):
                    raise LoadError(f"{self.path}: node {nd.name!r} ({nd.op}) uses variable {src!r} as a "
                                    f"resource handle; only plain reads (ReadVariableOp, ResourceGather) "
                                    f"are supported.")
                ins.append(key)
            del nd.input[:]
            nd.input.extend(ins)
        # Placeholder shapes come from the signature.
        for key, info in sig.inputs.items():
            ph = nodes.get(inputs[key][0])
            if ph is not None and ph.op == "Placeholder":
                ph.attr["shape"].shape.CopyFrom(info.tensor_shape)

        # Keep only what outputs need now that reads are plain edges.
        order = _prune_to_outputs(list(weight_defs) + list(nodes.values()),
                                  [resolve(f"{n}:{p}") for n, p in outputs.values()])
        try:
            g = graph_from_node_defs(order, Graph())
        except VerificationError as exc:
            raise LoadError(f"{self.path}: {exc}") from None
        for w in weight_defs:
            if g.has_node(w.name):
                value, trainable = weights[w.name]
                g.weights[w.name] = _weight(w.name, value, trainable)
        used = closure(set().union(*(node_refs(nd, library) for nd in order)), library)
        missing = sorted(used - set(library))
        if missing:
            raise LoadError(f"{self.path}: the graph calls function(s) {', '.join(map(repr, missing[:5]))}, "
                            f"which are not in the function library. The SavedModel is incomplete; "
                            f"re-export it.")
        g.functions = {name: library[name] for name in sorted(used)}
        for key in sorted(sig.inputs):
            n, p = inputs[key]
            if g.has_node(n):
                g.inputs.append(SignatureArg(key, Tensor(n, p)))
            else:  # an input the outputs do not need: keep it in the signature
                g.add_node(n, "Placeholder", attrs={"dtype": tf.as_dtype(sig.inputs[key].dtype),
                                                    "shape": _attrs.shape_from_proto(sig.inputs[key].tensor_shape)})
                g.inputs.append(SignatureArg(key, Tensor(n, 0)))
        for key in sorted(sig.outputs):
            t = resolve(f"{outputs[key][0]}:{outputs[key][1]}")
            g.outputs.append(SignatureArg(key, Tensor.parse(t)))
        _prettify_names(g)
        return g

    def _assets(self) -> dict:
        """``assets/`` file (relative path) → bytes. Links leading outside the model are refused; every
        size is checked (``st_size``) against the per-file and total limits before anything is read,
        and each read stops one byte past its limit (a file growing meanwhile is refused too)."""
        out = {}
        adir = self.path / "assets"
        if adir.is_dir():
            root = self.path.resolve()
            if not adir.resolve().is_relative_to(root):
                raise LoadError(f"{self.path}: assets/ points outside the model directory; refusing to "
                                f"read it.")
            files = []
            for dirpath, dirnames, filenames in os.walk(adir, followlinks=False):
                files.extend(Path(dirpath) / f for f in filenames)
                if len(files) > 100_000:
                    raise LoadError(f"{self.path}: assets/ holds more than 100,000 files; refusing to "
                                    f"read them.")
            per_file = int(self.max_asset_mb * 2**20)
            total_limit = ASSETS_TOTAL_FACTOR * per_file
            sizes, total = {}, 0
            for p in sorted(files):
                if not p.resolve().is_relative_to(root):
                    raise LoadError(f"{self.path}: asset {p} points outside the model directory; "
                                    f"refusing to read it.")
                try:
                    st = p.stat()
                except OSError:
                    continue  # a dangling link: nothing to read
                if not stat.S_ISREG(st.st_mode):
                    continue  # regular files only: a FIFO would block the read forever
                self._check_asset_size(p, st.st_size, per_file)
                sizes[p] = st.st_size
                total += st.st_size
            if total > total_limit:
                raise LoadError(f"{self.path}: its {len(sizes)} asset files hold {_mib(total)} together, "
                                f"more than the {_mib(total_limit)} graphslim reads for one model "
                                f"({ASSETS_TOTAL_FACTOR} x the per-file limit of {_mib(per_file)}); if the "
                                f"model really needs them, raise the limit with --max-asset-mb N "
                                f"(load(max_asset_mb=N)).")
            for p in sizes:
                out[str(p.relative_to(adir))] = self._read_asset(p, per_file)
        return out

    def _check_asset_size(self, p: Path, size: int, limit: int) -> None:
        if size > limit:
            raise LoadError(f"{self.path}: asset {p} is {_mib(size)} ({size:,} bytes), more than the "
                            f"{_mib(limit)} graphslim reads per asset file; if the model really needs "
                            f"it, raise the limit with --max-asset-mb N (load(max_asset_mb=N)).")

    def _read_asset(self, p: Path, limit: int) -> bytes:
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise LoadError(f"{self.path}: asset {p} cannot be read ({exc.strerror or exc}).") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # replaced since it was checked
                raise LoadError(f"{self.path}: asset {p} is not a regular file; refusing to read it.")
            data = f.read(limit + 1)
        self._check_asset_size(p, len(data), limit)
        return data


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-/>]")


def _valid_node_name(name: str) -> str:
    """A checkpoint name usable as a TF node name (``[A-Za-z0-9.][A-Za-z0-9_.\-/>]*``)."""
    name = _INVALID_NAME_CHARS.sub("_", name)
    if not name or not re.match(r"[A-Za-z0-9.]", name[0]):
        name = "w" + name
    return name


def _weight(name, value, trainable):
    from graphslim.ir.graph import Weight

    return Weight(name, np.asarray(value), bool(trainable))



def _prune_to_outputs(node_defs, output_tensors):
    by_name = {nd.name: nd for nd in node_defs}
    seen, stack = set(), [parse_input(t)[0] for t in output_tensors]
    while stack:
        n = stack.pop()
        if n in seen or n not in by_name:
            continue
        seen.add(n)
        stack.extend(parse_input(i)[0] for i in by_name[n].input)
    return [nd for nd in node_defs if nd.name in seen]


_CALL_SEGMENT = re.compile(r"^(Stateful)?PartitionedCall(_\d+)?$")


def _prettify_names(g: Graph) -> None:
    """Drop the ``StatefulPartitionedCall_N/`` path segments that inlining introduced, where the
    shorter name stays unique (``StatefulPartitionedCall/sequential/conv1/Conv2D`` →
    ``sequential/conv1/Conv2D``)."""
    mapping = {}
    taken = set(g.names())
    for name in g.names():
        if g.node(name).op == WEIGHT_OP:
            continue
        parts = name.split("/")
        short = "/".join(p for p in parts if not _CALL_SEGMENT.match(p))
        if short and short != name and short not in taken:
            mapping[name] = short
            taken.add(short)
    g.rename_nodes(mapping)


def _finish(g: Graph, where) -> None:
    from graphslim.ir.canonicalize import canonicalize

    try:
        g.infer_shapes()
        _check_ports(g)
        canonicalize(g)
        g.verify()
    except VerificationError as exc:
        raise LoadError(f"{where}: the model's graph is not valid: {exc}") from None


def _check_ports(g: Graph) -> None:
    """Every edge and signature tensor names an output port its producer has (checked before the
    canonicalization, whose rewrites assume it; ``verify`` repeats the edge check after)."""
    for src, dst, _ in g.data_edges():
        if src.port >= g.node(src.node).num_outputs:
            n = g.node(src.node)
            raise VerificationError(f"node {dst!r} reads output {src.port} of {n.name!r} ({n.op}), which has "
                                    f"only {n.num_outputs} outputs")
    for kind, args in (("input", g.inputs), ("output", g.outputs)):
        for arg in args:
            if not g.has_node(arg.tensor.node):
                raise VerificationError(f"signature {kind} {arg.name!r} is bound to {arg.tensor}, which "
                                        f"nothing produces (a function call returning fewer values than "
                                        f"the signature reads?)")
            n = g.node(arg.tensor.node)
            if arg.tensor.port >= n.num_outputs:
                raise VerificationError(f"signature {kind} {arg.name!r} is bound to {arg.tensor}, but "
                                        f"{n.name!r} ({n.op}) has only {n.num_outputs} outputs")


def _check_signature_dtypes(g: Graph, sig, signature: str, where) -> None:
    """The SignatureDef's declared dtypes must be those of the tensors it names (a model whose
    signature says int32 for a float Placeholder would be emitted with a silently different API)."""
    tf = _tf()
    for kind, args, table in (("input", g.inputs, sig.inputs), ("output", g.outputs, sig.outputs)):
        for arg in args:
            info = table.get(arg.name)
            if info is None or not info.dtype:
                continue
            declared = tf.as_dtype(info.dtype)  # validated by dtype_size at the start of build()
            actual = g.dtype(arg.tensor)
            if actual is not None and declared.base_dtype != actual.base_dtype:
                raise LoadError(f"{where}: signature {signature!r} {kind} {arg.name!r} is declared "
                                f"{declared.name} but its tensor {arg.tensor} is {actual.name}; the "
                                f"SavedModel is inconsistent. Re-export it.")


def _load_frozen(file: Path, scan: bool = True, allow_ops=()) -> Graph:
    """A frozen GraphDef: Placeholders are the inputs, nodes nobody reads are the outputs."""
    tf = _tf()
    gd = parse_graph_def(file)
    if not gd.node:
        raise LoadError(f"{file}: the GraphDef has no nodes (or the file is not a GraphDef). Pass a "
                        f"SavedModel directory or a frozen GraphDef .pb file.")
    if scan:
        from graphslim.io import scan as _scan

        err = _scan.refusal(_scan.scan_graph_def(gd), file, allow_ops)
        if err is not None:
            raise err
    limit = const_limit(file)
    for nd in gd.node:
        check_node_def(nd, file, limit)
    for f in gd.library.function:
        for nd in f.node_def:
            check_node_def(nd, file, limit, f.signature.name)
    names = [nd.name for nd in gd.node]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LoadError(f"{file}: corrupt graph: two nodes are named {dup!r}.")
    library = {f.signature.name for f in gd.library.function}
    nodes = []
    for nd in gd.node:
        new = type(nd)()
        new.CopyFrom(nd)
        del new.input[:]
        new.input.extend(i for i in nd.input if not i.startswith("^"))
        nodes.append(new)
    used = {parse_input(i)[0] for nd in nodes for i in nd.input}
    outputs = [nd for nd in nodes if nd.name not in used and nd.op not in ("NoOp", "Const", "Placeholder", "Assert")]
    if not outputs:
        raise LoadError(f"{file}: the graph has no output nodes.")
    try:
        g = graph_from_node_defs(nodes, Graph())
        g.topo_order()  # a cycle: VerificationError naming it
    except VerificationError as exc:
        raise LoadError(f"{file}: the model's graph is not valid: {exc}") from None
    g.functions = {f.signature.name: f for f in gd.library.function} if library else {}
    for node in g.nodes(op="Placeholder"):
        g.inputs.append(SignatureArg(node.name, Tensor(node.name, 0)))
    for nd in outputs:
        g.outputs.append(SignatureArg(nd.name, Tensor(nd.name, 0)))
    # Float constants of rank >= 1 are the trained weights.
    for node in g.nodes(op="Const"):
        try:
            value = node.attr("value")
        except (TypeError, ValueError, KeyError) as exc:
            raise LoadError(f"{file}: constant {node.name!r} cannot be decoded ({first_line(exc)}); the "
                            f"model is corrupt.") from None
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.dtype.kind == "f":
            consumers = g.consumers(node.output(0))
            name = node.name
            g.remove_node(name, safe=False)  # re-added as a Weight under the same name, same edges
            g.add_weight(name, value, trainable=True)
            for c, port in consumers:
                g.set_input(c, port, Tensor(name, 0))
    g.meta = {"source": str(file), "format": "frozen_graphdef", "signature": "serving_default",
              "scanned": bool(scan), "allowed_ops": sorted(_allowed(allow_ops))}
    _finish(g, file)
    del tf
    return g


def describe(path, tags=("serve",)) -> dict:
    """What a model offers without loading it: ``{"format", "tags", "signatures": {name: {"inputs":
    {key: (dtype name, shape)}, "outputs": {...}}}}``. Frozen GraphDefs have one pseudo-signature."""
    path = Path(path)
    try:
        return _describe(path, tags)
    except GraphslimError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in load(): a clean error, never a traceback
        err = LoadError(f"{path}: graphslim cannot describe this model ({type(exc).__name__}: "
                        f"{first_line(exc)[:300]}). The SavedModel looks malformed.")
        err.unexpected = True
        raise err from exc


def _dtype_name(enum) -> str:
    if not enum:
        return "?"
    try:
        return _tf().as_dtype(enum).name
    except TypeError:
        return f"invalid dtype {enum}"


def _describe(path, tags) -> dict:
    path = Path(path)
    if path.is_file() and path.name not in ("saved_model.pb", "saved_model.pbtxt"):
        g = _load_frozen(path, scan=False)  # describe reads; load() (which inspect runs first) scans
        sig = {"inputs": {a.name: (g.dtype(a.tensor).name, g.shape(a.tensor)) for a in g.inputs},
               "outputs": {a.name: (g.dtype(a.tensor).name, g.shape(a.tensor)) for a in g.outputs}}
        return {"format": "frozen_graphdef", "tags": [], "signatures": {"serving_default": sig}}
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory.")
    sm = parse_saved_model(saved_model_file(path))
    meta = pick_meta_graph(sm, tags, path)
    sigs = {}
    for name in signature_names(meta):
        sd = meta.signature_def[name]
        sigs[name] = {kind: {k: (_dtype_name(v.dtype),
                                 _attrs.shape_from_proto(v.tensor_shape)) for k, v in sorted(table.items())}
                      for kind, table in (("inputs", sd.inputs), ("outputs", sd.outputs))}
    return {"format": "saved_model", "tags": sorted(meta.meta_info_def.tags), "signatures": sigs,
            "tf_version": meta.meta_info_def.tensorflow_version}
