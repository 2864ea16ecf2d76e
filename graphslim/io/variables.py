"""The variables of a SavedModel: checkpoint keys, original names and trainable flags, and their values.

How variables are found:

* TF2 SavedModels (``tf.saved_model.save``, Keras ``model.export``): the signature's call op passes the
  captured variable handles as its trailing inputs. ``object_graph_def.concrete_functions[f].bound_inputs``
  names the SavedObjectGraph nodes of those variables; the checkpoint's own object graph
  (``_CHECKPOINTABLE_OBJECT_GRAPH``), matched path by path from the root, gives each one's checkpoint key
  and its original name (``full_name``, e.g. ``conv2d_1/kernel``).
* TF1 SavedModels (``VariableV2`` + Saver): the checkpoint key is the variable's op name; the
  ``trainable_variables`` collection gives the trainable flags.

Values are read with TensorFlow's checkpoint reader, after :func:`graphslim.io.ckpt_index.check_index`
checked the index and each tensor's recorded dtype, shape and size were checked against the graph and the
data files. A numeric tensor of at least ``MAP_BYTES`` stored whole in one data file is not read but
memory-mapped (:func:`graphslim.ir.storage.map_array`, read-only): the weights of a large model are then
paged in from the file when used, and a pass or the emitter walking them does not keep them all
resident (its checksum is not verified; its bounds are, against the data file's size). Used by :mod:`graphslim.io.loader`::

    variables = CheckpointVariables(path, meta, nodes)
    info = variables.variable_info(needed)       # {variable node: (weight name, key, trainable)}
    value = variables.read_tensor(key, weight_name, node)
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
from google.protobuf import message as _pb_message

from graphslim.errors import LoadError
from graphslim.ir import attrs as _attrs
from graphslim.ir.tfconv import parse_input
from graphslim.io.inline import CALL_OPS
from graphslim.io.reader import first_line

VARIABLE_OPS = {"VarHandleOp", "VariableV2", "Variable"}
MAP_BYTES = 16 << 20  # checkpoint tensors at least this large are memory-mapped, not read


def _tf():
    import tensorflow as tf  # deferred: importing TF costs ~2 s

    return tf


class CheckpointVariables:
    """The checkpoint (``variables/``) of the SavedModel at ``path``, read lazily and checked before any
    tensor is read. ``meta`` is its MetaGraphDef, ``nodes`` its outer graph's NodeDefs by name.

    Example::

        variables = CheckpointVariables(path, meta, {nd.name: nd for nd in meta.graph_def.node})
        info = variables.variable_info(["serving_default_x", "StatefulPartitionedCall", ...])
    """

    def __init__(self, path: Path, meta, nodes: dict):
        self.path = path
        self.meta = meta
        self.nodes = nodes
        self._reader = None
        self._ckpt_specs = None
        self._bytes_read = 0
        self._entries: dict = {}

    def _checkpoint(self):
        if self._reader is None:
            tf = _tf()
            prefix = self.path / "variables" / "variables"
            index = Path(str(prefix) + ".index")
            if not index.exists():
                raise LoadError(f"{self.path}: the model has variables but {index} is missing. Copy the "
                                f"whole SavedModel directory, including variables/.")
            from graphslim.io.ckpt_index import check_index

            self._entries = check_index(index)  # what TensorFlow's reader would abort the process on
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

    def read_tensor(self, key: str, what: str, node=None):
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
        mapped = self._mapped(key, dtype, shape, nbytes)
        if mapped is not None:
            return mapped
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

    def _mapped(self, key: str, dtype, shape: list, nbytes: int):
        """The tensor ``key`` as a read-only view of its data file when it is numeric, at least
        MAP_BYTES, stored whole and within the file; else None (read it)."""
        entry, header = self._entries.get(key), self._entries.get("")
        if entry is None or header is None or nbytes < MAP_BYTES or len(entry.slices) or entry.size != nbytes:
            return None
        try:
            np_dtype = np.dtype(dtype.as_numpy_dtype)
        except (TypeError, AttributeError):
            return None
        if np_dtype.kind not in "fiuc" or np_dtype.itemsize != dtype.size:
            return None
        shard = self.path / "variables" / f"variables.data-{entry.shard_id:05d}-of-{header.num_shards:05d}"
        try:
            if entry.offset + entry.size > shard.stat().st_size:
                return None  # the reader reports it
            from graphslim.ir.storage import map_array

            return map_array(shard, np_dtype, shape, entry.offset)
        except (OSError, ValueError):
            return None

    def variable_info(self, needed) -> dict:
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
        raw = self.read_tensor("_CHECKPOINTABLE_OBJECT_GRAPH", "object graph")
        tog = trackable_object_graph_pb2.TrackableObjectGraph()
        try:
            if not isinstance(raw, (bytes, np.ndarray, np.bytes_)) or (
                    isinstance(raw, np.ndarray) and raw.shape != ()):
                raise _pb_message.DecodeError("not a scalar string")
            tog.ParseFromString(bytes(raw.item() if hasattr(raw, "item") else raw))
        except (_pb_message.DecodeError, TypeError, ValueError):
            raise LoadError(f"{self.path}: the checkpoint's object graph is corrupt; copy the whole "
                            f"SavedModel directory again.") from None
        return match_object_graphs(self.meta.object_graph_def, tog)

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


def match_object_graphs(og, tog) -> dict:
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


def _check_var_spec(path, vname, nd, dtype, shape) -> None:
    """The checkpoint's recorded dtype and shape against the variable node's, before reading."""
    if nd is None:
        return

    class _Spec:
        pass

    spec = _Spec()
    spec.dtype, spec.shape, spec.ndim = dtype, tuple(shape), len(shape)
    check_var_value(path, vname, nd, spec)


def check_var_value(path, vname, nd, value) -> None:
    """Raise LoadError when ``value`` (an array, or anything with ``dtype``, ``shape`` and ``ndim``) does
    not have the dtype and static shape the variable node ``nd`` (named ``vname``) declares; nothing to
    check when ``nd`` is None.

    Example::

        check_var_value(path, "conv/kernel", var_node_def, np.zeros((3, 3, 3, 8), np.float32))
    """
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
