"""SavedModel / frozen GraphDef → graphslim IR, without running the model.

``load(path)`` reads ``saved_model.pb`` with protobuf, picks the MetaGraphDef by tags and the signature
by name, inlines every function call the signature makes into one flat graph, and reads the variables
from the checkpoint (``variables/``) with TensorFlow's checkpoint reader. It never calls
``tf.saved_model.load``: that revives Python objects (and fails on SavedModels written by older
TensorFlow versions, e.g. Keras models saved with optimizer slot variables), and it is slow.

How variables are found:

* TF2 SavedModels (``tf.saved_model.save``, Keras ``model.export``): the signature's call op passes the
  captured variable handles as its trailing inputs. ``object_graph_def.concrete_functions[f].bound_inputs``
  names the SavedObjectGraph nodes of those variables; the checkpoint's own object graph
  (``_CHECKPOINTABLE_OBJECT_GRAPH``), matched path by path from the root, gives each one's checkpoint key
  and its original name (``full_name``, e.g. ``conv2d_1/kernel``).
* TF1 SavedModels (``VariableV2`` + Saver): the checkpoint key is the variable's op name; the
  ``trainable_variables`` collection gives the trainable flags.
* Frozen GraphDefs: floating-point constants of rank ≥ 1 become weights named after their node.

Example::

    g = graphslim.load("resnet50/")                      # serving_default, tags {"serve"}
    g = graphslim.load("model/", signature="embed")
    g = graphslim.load("frozen.pb")
"""

from __future__ import annotations

import os
import re
import stat
from collections import deque
from pathlib import Path

import numpy as np
from google.protobuf import message as _pb_message

from graphslim.errors import GraphslimError, LoadError, VerificationError
from graphslim.ir.graph import WEIGHT_OP, Graph, SignatureArg, Tensor
from graphslim.ir import attrs as _attrs
from graphslim.ir.functions import CALL_INPUTS, closure, node_refs, specialize_resource_args
from graphslim.ir.tfconv import graph_from_node_defs, parse_input
from graphslim.io.reader import (check_node_def, check_shape_proto, const_limit, dtype_size, first_line,
                                 parse_graph_def, parse_saved_model, pick_meta_graph, refuse_variant_constants,
                                 saved_model_file, signature_names)

CALL_OPS = {"PartitionedCall", "StatefulPartitionedCall"}
VARIABLE_OPS = {"VarHandleOp", "VariableV2", "Variable"}
# ops that only exist to read or describe variables, dropped once reads become Weight edges
_MAX_INLINE_DEPTH = 64
_MAX_INLINED_NODES = 200_000  # at least; scaled with the file's own node count (see _flatten)
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
        self._fn_cache: dict = {}
        self._reader = None
        self._ckpt_specs = None
        self._bytes_read = 0
        self._const_limit = const_limit(path)
        self._node_budget = max(_MAX_INLINED_NODES, 20 * (len(meta.graph_def.node) + sum(
            len(f.node_def) for f in meta.graph_def.library.function)))

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
        self._check_inline_size(needed)
        var_info = self._variable_info(needed)
        nodes, aliases = self._flatten(needed)
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

    # ------------------------------------------------------------------ variables
    def _checkpoint(self):
        if self._reader is None:
            tf = _tf()
            prefix = self.path / "variables" / "variables"
            index = Path(str(prefix) + ".index")
            if not index.exists():
                raise LoadError(f"{self.path}: the model has variables but {index} is missing. Copy the "
                                f"whole SavedModel directory, including variables/.")
            from graphslim.io.ckpt_index import check_index

            check_index(index)  # what TensorFlow's reader would abort the process on
            try:
                self._reader = tf.train.load_checkpoint(str(prefix))
            except Exception as exc:  # noqa: BLE001 - the reader raises several unrelated types
                raise LoadError(f"{self.path}: cannot read the variables checkpoint {prefix}: "
                                f"{first_line(exc)}. The variables files are missing, truncated or from "
                                f"another model; copy the whole SavedModel directory again.") from None
        return self._reader

    def _checkpoint_specs(self):
        """(key → shape list, key → tf.DType, bytes of the variables data files), read from the index
        only: what the checkpoint *claims*, checked before any tensor is read."""
        if self._ckpt_specs is None:
            reader = self._checkpoint()
            try:
                shapes = reader.get_variable_to_shape_map()
                dtypes = reader.get_variable_to_dtype_map()
            except Exception as exc:  # noqa: BLE001
                raise LoadError(f"{self.path}: cannot read the variables index: {first_line(exc)}. The "
                                f"variables files are corrupt; copy the whole SavedModel directory "
                                f"again.") from None
            data = 0
            for f in (self.path / "variables").glob("variables.data-*"):
                try:
                    data += f.stat().st_size
                except OSError:
                    pass
            self._ckpt_specs = (shapes, dtypes, data)
        return self._ckpt_specs

    def _read_tensor(self, key: str, what: str, node=None):
        """The checkpoint value of ``key``. Its recorded dtype and shape are checked against the
        variable ``node`` (when given) and its size against the data files *before* reading, so a
        forged index cannot make the reader allocate blindly."""
        reader = self._checkpoint()
        shapes, dtypes, data_bytes = self._checkpoint_specs()
        if key not in shapes or key not in dtypes:
            raise LoadError(f"{self.path}: variable {what!r} (checkpoint key {key!r}) is not in the "
                            f"checkpoint. The variables files do not belong to this saved_model.pb; copy "
                            f"the whole SavedModel directory again.")
        shape, dtype = list(shapes[key]), dtypes[key]
        _check_var_spec(self.path, what, node, dtype, shape)
        numel = 1
        for d in shape:
            if d < 0:
                raise LoadError(f"{self.path}: the checkpoint records variable {what!r} with shape {shape}; "
                                f"the variables index is corrupt.")
            numel *= d
        try:
            itemsize = max(1, dtype.size)
        except (TypeError, ValueError, AttributeError):
            itemsize = 1  # strings: at least one byte each
        nbytes = numel * itemsize
        self._bytes_read += nbytes
        if nbytes > data_bytes + 4096 or self._bytes_read > data_bytes + 4096 * max(1, len(shapes)):
            raise LoadError(f"{self.path}: the checkpoint claims variable {what!r} (key {key!r}) is "
                            f"{dtype.name} of shape {shape} ({nbytes:,} bytes), but the variables data "
                            f"files hold only {data_bytes:,} bytes: the variables index is corrupt or "
                            f"forged; copy the whole SavedModel directory again.")
        try:
            value = reader.get_tensor(key)
        except Exception as exc:  # noqa: BLE001
            raise LoadError(f"{self.path}: cannot read variable {what!r} (checkpoint key {key!r}) from "
                            f"variables/: {first_line(exc)}. The variables files are truncated or do not "
                            f"belong to this saved_model.pb; copy the whole SavedModel directory again.") from None
        if list(np.shape(value)) != shape:
            raise LoadError(f"{self.path}: variable {what!r} (checkpoint key {key!r}) has shape "
                            f"{list(np.shape(value))} in the data files but {shape} in the index; the "
                            f"variables files are corrupt.")
        return value

    def _variable_info(self, needed) -> dict:
        """Outer variable node name → (weight name, checkpoint key, trainable)."""
        info = {}
        var_nodes = [n for n in needed if self.nodes[n].op in VARIABLE_OPS]
        if not var_nodes:
            return info
        og = self.meta.object_graph_def
        if len(og.nodes):
            ckpt_of = self._object_checkpoint_map()
            for name in needed:
                nd = self.nodes[name]
                if nd.op not in CALL_OPS:
                    continue
                fname = nd.attr["f"].func.name
                cf = og.concrete_functions.get(fname)
                if cf is None:
                    continue
                data_inputs = [i for i in nd.input if not i.startswith("^")]
                bound = list(cf.bound_inputs)
                captured = data_inputs[len(data_inputs) - len(bound):] if bound else []
                for text, node_id in zip(captured, bound):
                    src = parse_input(text)[0]
                    obj = og.nodes[node_id] if 0 <= node_id < len(og.nodes) else None
                    if obj is None or obj.WhichOneof("kind") != "variable" or src in info:
                        continue
                    key, full_name = ckpt_of.get(node_id, (None, None))
                    if key is None:
                        continue
                    info[src] = (full_name or obj.variable.name or src, key, bool(obj.variable.trainable))
        # TF1 variables (or TF2 handles not captured through a call): key = op name / shared name.
        trainable = self._tf1_trainable()
        for name in var_nodes:
            if name in info:
                continue
            nd = self.nodes[name]
            shared = nd.attr["shared_name"].s.decode("utf-8", "replace") if "shared_name" in nd.attr else ""
            for key in (name, shared):
                if key and key in self._checkpoint_specs()[0]:
                    info[name] = (key, key, trainable.get(key, True) if trainable else True)
                    break
            else:
                raise LoadError(f"{self.path}: variable node {name!r} ({nd.op}) has no value in the "
                                f"checkpoint (looked for keys {name!r}"
                                f"{' and ' + repr(shared) if shared else ''} and the object graph). The "
                                f"variables files do not belong to this saved_model.pb.")
        return info

    def _object_checkpoint_map(self) -> dict:
        """SavedObjectGraph node id → (checkpoint key, full_name), matching both graphs by child path."""
        from tensorflow.core.protobuf import trackable_object_graph_pb2

        if "_CHECKPOINTABLE_OBJECT_GRAPH" not in self._checkpoint_specs()[0]:
            raise LoadError(f"{self.path}: the variables checkpoint has no object graph "
                            f"(_CHECKPOINTABLE_OBJECT_GRAPH), but saved_model.pb is a TF2 SavedModel; the "
                            f"variables files do not belong to it. Copy the whole SavedModel directory again.")
        raw = self._read_tensor("_CHECKPOINTABLE_OBJECT_GRAPH", "object graph")
        tog = trackable_object_graph_pb2.TrackableObjectGraph()
        try:
            if not isinstance(raw, (bytes, np.ndarray, np.bytes_)) or (
                    isinstance(raw, np.ndarray) and raw.shape != ()):
                raise _pb_message.DecodeError("not a scalar string")
            tog.ParseFromString(bytes(raw.item() if hasattr(raw, "item") else raw))
        except (_pb_message.DecodeError, TypeError, ValueError):
            raise LoadError(f"{self.path}: the checkpoint's object graph is corrupt; copy the whole "
                            f"SavedModel directory again.") from None
        return _match_object_graphs(self.meta.object_graph_def, tog)

    def _tf1_trainable(self) -> dict:
        from tensorflow.core.framework import variable_pb2

        out = {}
        cols = self.meta.collection_def
        for col, flag in (("variables", False), ("trainable_variables", True)):
            if col not in cols:
                continue
            for raw in cols[col].bytes_list.value:
                vd = variable_pb2.VariableDef()
                try:
                    vd.ParseFromString(raw)
                except _pb_message.DecodeError:
                    continue
                key = vd.variable_name.split(":")[0]
                out[key] = flag or out.get(key, False)
        return out

    # ------------------------------------------------------------------ flattening
    def _function_graph(self, fname: str):
        """(body NodeDefs with GraphDef-style inputs, arg names, flat ret tensors) of a library function."""
        if fname not in self._fn_cache:
            fdef = self.library.get(fname)
            if fdef is None:
                raise LoadError(f"{self.path}: the graph calls function {fname!r}, which is not in the "
                                f"function library. The SavedModel is incomplete; re-export it.")
            self._fn_cache[fname] = _flatten_function_def(fdef, self.library, self.path)
        return self._fn_cache[fname]

    def _callee(self, nd) -> str | None:
        if nd.op in CALL_OPS:
            return nd.attr["f"].func.name if "f" in nd.attr else ""
        return nd.op if nd.op in self.library else None

    def _check_inline_size(self, needed) -> None:
        """Before inlining anything: refuse recursive functions (naming the cycle), nesting deeper
        than the limit, and call patterns whose inlined size explodes (f calls g twice, g calls h
        twice, ...), by computing every function's inlined node count once (memoized)."""
        memo: dict = {}
        budget = self._node_budget

        def size(fname: str, chain: tuple) -> int:
            if fname in memo:
                return memo[fname]
            if fname in chain:
                loop = " -> ".join(chain[chain.index(fname):] + (fname,))
                raise LoadError(f"{self.path}: function {fname!r} calls itself ({loop}); TensorFlow "
                                f"functions cannot recurse, so the model is malformed and cannot be "
                                f"flattened.")
            if len(chain) >= _MAX_INLINE_DEPTH:
                raise LoadError(f"{self.path}: function calls nest deeper than {_MAX_INLINE_DEPTH} "
                                f"levels ({' -> '.join(chain[:3])} -> ... -> {fname}); cannot flatten "
                                f"the graph.")
            fdef = self.library.get(fname)
            total = 0
            for nd in (fdef.node_def if fdef is not None else ()):
                callee = self._callee(nd)
                total += 1 + (size(callee, chain + (fname,)) if callee else 0)
                if total > budget:
                    raise LoadError(f"{self.path}: inlining function {fname!r} would produce more than "
                                    f"{budget:,} nodes; its functions call each other in an exploding "
                                    f"pattern. The model is malformed or hostile.")
            memo[fname] = total
            return total

        total = 0
        for name in needed:
            callee = self._callee(self.nodes[name])
            total += 1 + (size(callee, ()) if callee else 0)
            if total > budget:
                raise LoadError(f"{self.path}: inlining the signature's function calls would produce "
                                f"more than {budget:,} nodes; the functions call each other in an "
                                f"exploding pattern. The model is malformed or hostile.")

    def _flatten(self, needed):
        """Inline every call. Returns (ordered NodeDefs, aliases "call:i" → "inner:j")."""
        from tensorflow.core.framework import node_def_pb2

        out: dict[str, object] = {}
        aliases: dict[str, str] = {}
        work = deque((self.nodes[n], "", {}, ()) for n in needed)  # popleft/extendleft: linear
        # (node_def, name prefix, arg name -> outer tensor, call chain of function names)
        pb = self.path / "saved_model.pb"
        produced = 0
        while work:
            nd, prefix, argmap, chain = work.popleft()
            name = prefix + nd.name
            produced += 1
            if produced > self._node_budget:
                raise LoadError(f"{self.path}: inlining the signature's function calls produces more than "
                                f"{self._node_budget:,} nodes (at {name!r}); the functions call each other "
                                f"in an exploding pattern. The model is malformed or hostile.")
            depth = len(chain)

            def remap(text, prefix=prefix, argmap=argmap):
                src, port, control = parse_input(text)
                if src in argmap:
                    if control:
                        return None
                    return argmap[src]
                full = prefix + src
                return ("^" + full) if control else f"{full}:{port}"

            fname = None
            if nd.op in CALL_OPS:
                fname = nd.attr["f"].func.name
            elif nd.op in self.library:
                fname = nd.op
            if fname is not None:
                if fname in chain:
                    loop = " -> ".join(chain[chain.index(fname):] + (fname,))
                    raise LoadError(f"{self.path}: function {fname!r} calls itself ({loop}, at node "
                                    f"{name!r}); TensorFlow functions cannot recurse, so the model is "
                                    f"malformed and cannot be flattened.")
                if depth >= _MAX_INLINE_DEPTH:
                    raise LoadError(f"{self.path}: function calls nest deeper than {_MAX_INLINE_DEPTH} "
                                    f"levels at {name!r} (recursive functions?); cannot flatten the graph.")
                body, arg_names, rets = self._function_graph(fname)
                data_in = [remap(i) for i in nd.input if not i.startswith("^")]
                if len(data_in) != len(arg_names):
                    raise LoadError(f"{self.path}: call {name!r} passes {len(data_in)} inputs to "
                                    f"{fname!r}, which takes {len(arg_names)}.")
                inner_args = dict(zip(arg_names, data_in))
                inner_prefix = name + "/"
                for i, ret in enumerate(rets):
                    rsrc, rport, _ = parse_input(ret)
                    target = inner_args[rsrc] if rsrc in inner_args else f"{inner_prefix}{rsrc}:{rport}"
                    aliases[f"{name}:{i}"] = target
                arg_set = set(arg_names)
                work.extendleft(reversed([(b, inner_prefix, inner_args, chain + (fname,)) for b in body
                                          if b.name not in arg_set]))  # the body next, in order
                continue
            if name in out:
                raise LoadError(f"{self.path}: corrupt graph: two nodes are named {name!r} after "
                                f"inlining; re-export the model.")
            check_node_def(nd, pb, self._const_limit, chain[-1] if chain else None)
            new = node_def_pb2.NodeDef()
            new.CopyFrom(nd)
            new.name = name
            del new.input[:]
            for text in nd.input:
                if text.startswith("^"):
                    continue  # control edges are dropped: the serving graph is pure dataflow
                new.input.append(remap(text))
            out[name] = new
        return out, aliases

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
            value = self._read_tensor(key, wname, nd_var)
            _check_var_value(self.path, vname, nd_var, value)
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


def _match_object_graphs(og, tog) -> dict:
    """SavedObjectGraph node id → (checkpoint key, full_name) of its variable, matching the
    SavedModel's object graph ``og`` with the checkpoint's ``tog`` by child names from both roots.

    Breadth first, each saved object matched once (its shortest path wins; object graphs are not
    trees: Keras reaches a variable as ``variables/0`` and ``_all_variables/0``, and a hostile model
    can link objects in cycles), and each checkpoint object's children indexed once: time and memory
    are linear in the two graphs' sizes. (Walking pairs of nodes instead goes round two cycles of
    coprime lengths together: quadratic.)"""
    n_saved, n_ckpt = len(og.nodes), len(tog.nodes)
    out: dict = {}
    if not n_saved or not n_ckpt:
        return out
    matched = {0: 0}  # saved object id → checkpoint object id
    children: dict = {}  # checkpoint object id → {local name: child id}, built once
    queue = deque([0])
    while queue:
        sid = queue.popleft()
        cid = matched[sid]
        ckpt = tog.nodes[cid]
        for attr in ckpt.attributes:
            if attr.name == "VARIABLE_VALUE":
                out[sid] = (attr.checkpoint_key, attr.full_name)
        ckids = children.get(cid)
        if ckids is None:
            ckids = children[cid] = {}
            for c in ckpt.children:
                if 0 <= c.node_id < n_ckpt:
                    ckids.setdefault(c.local_name, c.node_id)
        for c in og.nodes[sid].children:
            child = c.node_id
            if 0 <= child < n_saved and child not in matched and c.local_name in ckids:
                matched[child] = ckids[c.local_name]
                queue.append(child)
    return out


_MAX_OUTPUT_ARGS = 100_000


def _num_args(arg_def, nd) -> int:
    if arg_def.number_attr:
        n = nd.attr[arg_def.number_attr].i if arg_def.number_attr in nd.attr else 0
    elif arg_def.type_list_attr:
        n = len(nd.attr[arg_def.type_list_attr].list.type) if arg_def.type_list_attr in nd.attr else 0
    else:
        n = 1
    if not 0 <= n <= _MAX_OUTPUT_ARGS:
        raise LoadError(f"node {nd.name!r} ({nd.op}) declares {n} values for its {arg_def.name!r} "
                        f"argument; the model is corrupt.")
    return n


def _flatten_function_def(fdef, library, where):
    """FunctionDef → body NodeDefs whose inputs use GraphDef syntax (``node:3``), its argument names,
    and its outputs as flat tensor names. FunctionDef bodies name tensors ``node:out_arg:idx``; the
    flat port is found from the op's (or called function's) output arguments."""
    from tensorflow.core.framework import node_def_pb2
    from tensorflow.python.framework import op_def_registry

    arg_names = [a.name for a in fdef.signature.input_arg]
    names = set(arg_names)
    if len(names) != len(arg_names):
        raise LoadError(f"{where}: function {fdef.signature.name!r} has two arguments with the same "
                        f"name; the model is corrupt.")
    for nd in fdef.node_def:
        if nd.name in names:
            raise LoadError(f"{where}: function {fdef.signature.name!r} has two nodes (or a node and an "
                            f"argument) named {nd.name!r}; the model is corrupt.")
        names.add(nd.name)
    flat = {}
    for a in arg_names:
        flat[a] = f"{a}:0"
    for nd in fdef.node_def:
        if nd.op in library:
            op_def = library[nd.op].signature
        else:
            op_def = op_def_registry.get(nd.op)
            if op_def is None:
                raise LoadError(f"{where}: function {fdef.signature.name!r} uses op type {nd.op!r} "
                                f"(node {nd.name!r}), which this TensorFlow does not know. The model needs a "
                                f"custom op library; graphslim cannot read it.")
        port = 0
        for out in op_def.output_arg:
            try:
                n = _num_args(out, nd)
            except LoadError as exc:
                raise LoadError(f"{where}: function {fdef.signature.name!r}: {exc}") from None
            for i in range(n):
                flat[f"{nd.name}:{out.name}:{i}"] = f"{nd.name}:{port + i}"
            port += n
    body = []
    for nd in fdef.node_def:
        new = node_def_pb2.NodeDef()
        new.CopyFrom(nd)
        del new.input[:]
        for text in nd.input:
            if text.startswith("^"):
                new.input.append(text)
                continue
            if text in flat:
                new.input.append(flat[text])
            elif text.count(":") == 0 and text in arg_names:
                new.input.append(f"{text}:0")
            else:
                raise LoadError(f"{where}: function {fdef.signature.name!r}: node {nd.name!r} reads "
                                f"{text!r}, which no node of the function produces.")
        body.append(new)
    rets = []
    for out in fdef.signature.output_arg:
        ret = fdef.ret.get(out.name)
        if ret is None or (ret not in flat and ret.split(":")[0] not in arg_names):
            raise LoadError(f"{where}: function {fdef.signature.name!r} output {out.name!r} is not "
                            f"produced by any node.")
        rets.append(flat.get(ret, f"{ret.split(':')[0]}:0"))
    return body, arg_names, rets


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


def _check_var_spec(path, vname, nd, dtype, shape) -> None:
    """The checkpoint's recorded dtype and shape against the variable node's, before reading."""
    if nd is None:
        return

    class _Spec:
        pass

    spec = _Spec()
    spec.dtype, spec.shape, spec.ndim = dtype, tuple(shape), len(shape)
    _check_var_value(path, vname, nd, spec)


def _check_var_value(path, vname, nd, value):
    if nd is None:
        return
    tf = _tf()
    if "dtype" in nd.attr and nd.attr["dtype"].type:
        try:
            want = tf.as_dtype(nd.attr["dtype"].type).base_dtype
            have = tf.as_dtype(value.dtype)
        except TypeError:
            raise LoadError(f"{path}: variable {vname!r} has an invalid dtype (enum "
                            f"{nd.attr['dtype'].type}) in the graph; the model is corrupt.") from None
        if want != have:
            raise LoadError(f"{path}: variable {vname!r} is {want.name} in the graph but "
                            f"{have.name} in the checkpoint; the variables files do not belong to this "
                            f"saved_model.pb.")
    if "shape" in nd.attr and not nd.attr["shape"].shape.unknown_rank:
        want = _attrs.shape_from_proto(nd.attr["shape"].shape)
        if want is not None and len(want) == value.ndim and any(
                w is not None and w != v for w, v in zip(want, value.shape)) or (
                want is not None and len(want) != value.ndim and len(want) > 0):
            raise LoadError(f"{path}: variable {vname!r} has shape {list(want)} in the graph but "
                            f"{list(value.shape)} in the checkpoint; the variables files do not belong "
                            f"to this saved_model.pb.")


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
