"""Fuzz the loader and the pipeline parser (issue 6, item 3).

    python benchmarks/fuzz.py                      # every harness, 100,000+ executions in all, bounded
    python benchmarks/fuzz.py --harness mutate --runs 5000 --seconds 600
    python benchmarks/fuzz.py --engine random      # without atheris

Harnesses (each a function of one ``bytes``):

* ``raw``      the bytes as ``saved_model.pb`` of a directory with a valid ``variables/`` (vgg_digits);
* ``mutate``   1-4 structured mutations of a fixture's SavedModel proto (vgg_digits, tf1_model,
               tf_module): delete/duplicate/rename nodes, rewire inputs, change op types, attrs,
               shapes, dtypes, constants, signatures, function signatures and bodies, the object graph;
* ``frozen``   the same kinds of mutations of the frozen GraphDef fixture;
* ``pipeline`` text built from pipeline tokens and raw bytes, through ``parse_pipeline`` (and, when
               it parses, the round trip ``parse(str(p)) == p``) and ``parse_pipeline_config``;
* ``objgraph`` structured mutations of a TF2 SavedModel's object graph (vgg_digits, tf_module):
               children/dependency cycles, out-of-range node ids, huge fan-out, long chains, wrong kinds,
               bound inputs, saveable functions, slot variables; and of the checkpoint's object graph
               (missing, duplicate, foreign checkpoint keys; cycles): the checkpoint-map walk and the scan;
* ``ckptindex`` ``variables/variables.index`` of vgg_digits and tf1_model (an SSTable of
               BundleEntryProto), re-encoded after structured mutations of its entries (dtype, shape,
               shard, offset, size, crc, slices, header, missing/duplicate/unsorted keys) or mutated byte
               by byte (block checksums fixed up or not), then loaded;
* ``funclib``  mutations of the function library (vgg_digits, tf_module, and a model with tf.cond,
               tf.while_loop and nested calls built at start): signatures, argument counts at call
               sites, nested and recursive calls, func/list(func) attrs of If/While/Case, ret maps,
               control_ret, attr placeholders, missing and duplicate functions.

A *failure* is any exception other than a GraphslimError (or a GraphslimError that only the loader's
last-resort net caught: ``unexpected``), a round-trip mismatch, a crash of the process, a hang (one
execution longer than 60 s: the child dumps its stacks and exits) or an out-of-memory (children run
under an 8 GiB address-space limit). The engine is atheris (coverage-guided, graphslim's own modules
instrumented) when it is installed, else a seeded random driver. Each harness runs in a child process,
one at a time (one core); a child that dies is restarted for the remaining executions, its input saved
and the failure named by how it died (a failed TensorFlow check's file:line, a hang, a signal and the
innermost graphslim frame). Inputs that would trigger a crash already found and reported but not fixed
yet (:func:`index_known_crash`) are counted apart as *known* and not run (with ``--skip-known``; by default they run: graphslim.io.ckpt_index refuses them since).
The summary prints executions, failures and known crashes per harness; failing inputs go to ``--out``
(default: a temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "models"

# Executions and time limit per harness for the default (long) run: 107,000 in all, at most 37 minutes
# on one core (each harness stops at its count or its time, whichever comes first). Measured on a busy
# 2-core machine, per execution: pipeline 8 ms, raw 10, frozen 10, ckptindex 14, mutate 18, funclib 32,
# objgraph 50: about 25 minutes in all.
DEFAULT_PLAN = {"pipeline": (45_000, 450), "raw": (20_000, 300), "mutate": (12_000, 330),
                "frozen": (6_000, 120), "objgraph": (6_000, 420), "ckptindex": (10_000, 240),
                "funclib": (8_000, 360)}
HANG_SECONDS = 60  # one execution longer than this is a hang
ADDRESS_SPACE = 8 << 30  # address-space limit of the harness children (an out-of-memory is a failure)


class Bug(Exception):
    """A failure found by a harness (wraps the offending exception or describes the violation)."""


class KnownCrash(Exception):
    """The input would trigger a crash already found and reported but not fixed yet (it would end the
    harness process each time): counted apart as ``known``, not run. ``--skip-known`` only."""


SKIP_KNOWN = False


# ------------------------------------------------------------------------------------ fuzzed data
class Data:
    """Consumes a byte string as a stream of choices (like atheris' FuzzedDataProvider, but the same
    for both engines). Past the end, every choice is 0."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, n: int) -> int:
        """An int in [0, n)."""
        if n <= 1:
            return 0
        v = 0
        for _ in range((n.bit_length() + 7) // 8):
            v = (v << 8) | self.byte()
        return v % n

    def pick(self, seq):
        return seq[self.int(len(seq))] if seq else None

    def bytes(self, n: int) -> bytes:
        return bytes(self.byte() for _ in range(self.int(n + 1)))

    def weird_int(self) -> int:
        return self.pick([0, 1, -1, 2, 3, -5, 255, 2**31 - 1, 2**31, -2**31, 2**40, 2**62, 2**63 - 1,
                          -2**63, self.int(64), self.int(100000)])

    def text(self, n: int) -> str:
        return self.bytes(n).decode("utf-8", "replace")


# ------------------------------------------------------------------------------------ harnesses
class Harnesses:
    """Harness functions over a work directory (fixture copies are made once)."""

    def __init__(self, work: Path):
        self.work = work
        self.raw_dir = work / "raw"
        shutil.copytree(FIXTURES / "vgg_digits", self.raw_dir)
        from tensorflow.core.framework import graph_pb2
        from tensorflow.core.protobuf import saved_model_pb2

        self.models = {}
        for name in ("vgg_digits", "tf1_model", "tf_module"):
            d = work / name
            shutil.copytree(FIXTURES / name, d)
            sm = saved_model_pb2.SavedModel()
            sm.ParseFromString((d / "saved_model.pb").read_bytes())
            self.models[name] = (d, sm.SerializeToString())
        self.saved_model_cls = saved_model_pb2.SavedModel
        self.graph_def_cls = graph_pb2.GraphDef
        self.frozen = (FIXTURES / "frozen_vgg.pb").read_bytes()
        self.frozen_path = work / "frozen" / "model.pb"
        self.frozen_path.parent.mkdir()
        self._objgraph_models = self._index_models = self._funclib_models = None

    # -- loader
    def _load(self, path) -> None:
        from graphslim.errors import GraphslimError
        from graphslim.io.loader import load

        try:
            load(path)
        except GraphslimError as exc:
            if getattr(exc, "unexpected", False):
                raise Bug(f"safety net: {exc}") from exc.__cause__
            if "\n" in str(exc).strip():
                raise Bug(f"multi-line error: {exc!r}")

    def raw(self, data: bytes) -> None:
        (self.raw_dir / "saved_model.pb").write_bytes(data)
        self._load(self.raw_dir)

    def mutate(self, data: bytes) -> None:
        d = Data(data)
        name = d.pick(sorted(self.models))
        model, blob = self.models[name]
        sm = self.saved_model_cls()
        sm.ParseFromString(blob)
        for _ in range(1 + d.int(4)):
            mutate_meta(sm.meta_graphs[0], d)
        (model / "saved_model.pb").write_bytes(sm.SerializeToString())
        self._load(model)

    def frozen_graph(self, data: bytes) -> None:
        d = Data(data)
        gd = self.graph_def_cls()
        gd.ParseFromString(self.frozen)
        for _ in range(1 + d.int(4)):
            mutate_nodes(list(gd.node), gd.node, d, [])
        self.frozen_path.write_bytes(gd.SerializeToString())
        self._load(self.frozen_path)

    # -- object graph
    def _objgraph_setup(self) -> dict:
        """name → (dir, SavedModel bytes, variables/ files, checkpoint tensors, checkpoint object graph)."""
        if self._objgraph_models is None:
            import tensorflow as tf

            self._objgraph_models = {}
            for name in ("vgg_digits", "tf_module"):
                d = self.work / "objgraph" / name
                shutil.copytree(FIXTURES / name, d)
                sm = self.saved_model_cls()
                sm.ParseFromString((d / "saved_model.pb").read_bytes())
                vdir = d / "variables"
                files = {f.name: f.read_bytes() for f in vdir.iterdir()}
                reader = tf.train.load_checkpoint(str(vdir / "variables"))
                values = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}
                tog = values["_CHECKPOINTABLE_OBJECT_GRAPH"]
                tog = tog.item() if hasattr(tog, "item") else tog
                self._objgraph_models[name] = (d, sm.SerializeToString(), files, values, bytes(tog))
        return self._objgraph_models

    def objgraph(self, data: bytes) -> None:
        from tensorflow.core.protobuf import trackable_object_graph_pb2

        d = Data(data)
        name = d.pick(["vgg_digits", "tf_module"])
        model, blob, files, values, tog_blob = self._objgraph_setup()[name]
        sm = self.saved_model_cls()
        sm.ParseFromString(blob)
        meta = sm.meta_graphs[0]
        functions = [f.signature.name for f in meta.graph_def.library.function]
        for _ in range(1 + d.int(3)):
            mutate_saved_object_graph(meta.object_graph_def, d, functions)
        (model / "saved_model.pb").write_bytes(sm.SerializeToString())
        vdir = model / "variables"
        if d.int(3) == 0:  # the checkpoint's own object graph too: missing, duplicate, foreign keys
            tog = trackable_object_graph_pb2.TrackableObjectGraph()
            tog.ParseFromString(tog_blob)
            for _ in range(1 + d.int(3)):
                mutate_trackable_graph(tog, d, sorted(values))
            _write_checkpoint(vdir, {**values, "_CHECKPOINTABLE_OBJECT_GRAPH": tog.SerializeToString()})
        else:
            _restore_files(vdir, files)
        self._load(model)

    # -- checkpoint index
    def _index_setup(self) -> dict:
        """name → (dir, index bytes, data file size, parsed entries, block layout)."""
        if self._index_models is None:
            self._index_models = {}
            for name in ("vgg_digits", "tf1_model"):
                d = self.work / "ckptindex" / name
                shutil.copytree(FIXTURES / name, d)
                raw = (d / "variables" / "variables.index").read_bytes()
                data = next((d / "variables").glob("variables.data-*")).read_bytes()
                entries, blocks = _tables().read_table(raw)
                self._index_models[name] = (d, raw, data, entries, blocks)
        return self._index_models

    def ckptindex(self, data: bytes) -> None:
        d = Data(data)
        name = d.pick(["vgg_digits", "tf1_model"])
        model, raw, tensor_data, entries, blocks = self._index_setup()[name]
        if d.int(5) < 3:
            index = mutate_index_entries(entries, d, tensor_data)
        else:
            index = mutate_index_bytes(raw, blocks, d)
        known = index_known_crash(index) if SKIP_KNOWN else None
        if known is not None:
            raise KnownCrash(known)
        (model / "variables" / "variables.index").write_bytes(index)
        self._load(model)

    # -- function library
    def _funclib_setup(self) -> dict:
        if self._funclib_models is None:
            self._funclib_models = {}
            for name in ("vgg_digits", "tf_module"):
                d = self.work / "funclib" / name
                shutil.copytree(FIXTURES / name, d)
                self._funclib_models[name] = (d, (d / "saved_model.pb").read_bytes())
            d = build_control_flow_model(self.work / "funclib" / "control_flow")
            self._funclib_models["control_flow"] = (d, (d / "saved_model.pb").read_bytes())
        return self._funclib_models

    def funclib(self, data: bytes) -> None:
        d = Data(data)
        models = self._funclib_setup()
        model, blob = models[d.pick(sorted(models))]
        sm = self.saved_model_cls()
        sm.ParseFromString(blob)
        for _ in range(1 + d.int(3)):
            mutate_function_library(sm.meta_graphs[0], d)
        (model / "saved_model.pb").write_bytes(sm.SerializeToString())
        self._load(model)

    # -- pipeline
    def pipeline(self, data: bytes) -> None:
        from graphslim.errors import GraphslimError
        from graphslim.pipeline import parse_pipeline, parse_pipeline_config

        d = Data(data)
        text = pipeline_text(d)
        try:
            p = parse_pipeline(text)
        except GraphslimError:
            p = None
        if p is not None:
            again = parse_pipeline(str(p))
            if str(again) != str(p) or [s.options for s in again] != [s.options for s in p]:
                raise Bug(f"round trip: {text!r} -> {str(p)!r} -> {str(again)!r}")
            config = p.to_toml()
            back = parse_pipeline_config(config)
            if str(back) != str(p):
                raise Bug(f"TOML round trip: {str(p)!r} -> {str(back)!r}")
        try:
            parse_pipeline_config(text)
        except GraphslimError:
            pass


_TOKENS = ["dce", "fold-batchnorm", "truncate", "prune", "subset", "separable", "extend", "nosuch",
           "{", "}", ",", "=", " ", "  ", '"', "\\", "\\\"", "keep", "ratio", "output", "tensors", "0.5",
           "-1", "1e309", "nan", "none", "true", "false", "1,2,3", "", "\n", "\t", "\x00", "é", "[[pass]]",
           'name = "dce"', "pipeline = ", "#", "'", "{}", "keep=", "=,", "1" * 30]


def pipeline_text(d: Data) -> str:
    if d.int(4) == 0:
        return d.text(200)
    return "".join(d.pick(_TOKENS) if d.int(5) else d.text(4) for _ in range(d.int(24)))


# ------------------------------------------------------------------------------------ mutations
_OPS = ["Const", "Identity", "Placeholder", "Conv2D", "MatMul", "Relu", "Add", "AddV2", "Reshape",
        "StatefulPartitionedCall", "PartitionedCall", "ReadVariableOp", "VarHandleOp", "NoOp", "Unpack",
        "ConcatV2", "Split", "BiasAdd", "NoSuchOp", "If", "While", "IdentityN", "Pack", "Fill"]


def mutate_meta(meta, d: Data) -> None:
    lib = meta.graph_def.library.function
    which = d.int(10)
    if which < 3:
        mutate_nodes(list(meta.graph_def.node), meta.graph_def.node, d, [f.signature.name for f in lib])
    elif which < 6 and len(lib):
        f = lib[d.int(len(lib))]
        mutate_nodes(list(f.node_def), f.node_def, d, [x.signature.name for x in lib], function=f)
    elif which == 6:
        mutate_signature(meta, d)
    elif which == 7 and len(lib):
        mutate_function_signature(lib[d.int(len(lib))], d, lib)
    elif which == 8:
        mutate_object_graph(meta, d)
    else:
        mutate_misc(meta, d)


def mutate_nodes(nodes, container, d: Data, functions, function=None) -> None:
    if not nodes:
        return
    nd = nodes[d.int(len(nodes))]
    names = [n.name for n in nodes]
    kind = d.int(9)
    if kind == 0:
        container.remove(nd)
    elif kind == 1:
        container.add().CopyFrom(nd)
    elif kind == 2:
        nd.name = d.pick(names) if d.int(2) else d.text(12)
    elif kind == 3:
        if nd.input:
            i = d.int(len(nd.input))
            src = d.pick(names)
            port = d.weird_int() if d.int(3) == 0 else d.int(3)
            if function is not None and d.int(2):
                nd.input[i] = f"{src}:{d.pick(['output', 'y', 'z', 'activations', 'sum'])}:{port}"
            else:
                nd.input[i] = d.pick([f"{src}:{port}", f"^{src}", src, d.text(10)])
        else:
            nd.input.append(d.pick(names))
    elif kind == 4:
        nd.op = d.pick(_OPS + functions) if d.int(3) else d.pick(names)
    elif kind == 5 and nd.input:
        del nd.input[d.int(len(nd.input))]
    elif kind == 6 and nd.attr:
        del nd.attr[d.pick(sorted(nd.attr))]
    else:
        if nd.attr:
            mutate_attr(nd.attr[d.pick(sorted(nd.attr))], d, functions)
        else:
            mutate_attr(nd.attr[d.pick(["T", "dtype", "shape", "value", "f", "N", "num"])], d, functions)


def mutate_shape(shape, d: Data) -> None:
    k = d.int(4)
    if k == 0:
        shape.unknown_rank = not shape.unknown_rank
    elif k == 1 and shape.dim:
        shape.dim[d.int(len(shape.dim))].size = d.weird_int()
    elif k == 2:
        for _ in range(d.int(6) if d.int(8) else 300):
            shape.dim.add(size=d.weird_int() if d.int(2) else d.int(10))
    elif shape.dim:
        del shape.dim[d.int(len(shape.dim)):]


def mutate_tensor(t, d: Data) -> None:
    k = d.int(6)
    if k == 0:
        mutate_shape(t.tensor_shape, d)
    elif k == 1:
        t.dtype = d.pick([0, 1, 2, 3, 7, 9, 10, 20, 21, 101, 150, 999, d.int(40)])
    elif k == 2:
        t.tensor_content = t.tensor_content[: d.int(len(t.tensor_content) + 1)]
    elif k == 3:
        t.tensor_content = d.bytes(64)
    elif k == 4:
        del t.float_val[:]
        t.int_val.extend(d.weird_int() % 2**31 for _ in range(d.int(5)))
    else:
        t.string_val.append(d.bytes(16))


def mutate_attr(v, d: Data, functions) -> None:
    kind = v.WhichOneof("value")
    k = d.int(8)
    if kind == "tensor" and k < 5:
        mutate_tensor(v.tensor, d)
    elif kind == "shape" and k < 5:
        mutate_shape(v.shape, d)
    elif kind == "list" and k < 5:
        lst = v.list
        choice = d.int(5)
        if choice == 0:
            lst.i.extend(d.weird_int() for _ in range(d.int(4)))
        elif choice == 1:
            lst.type.extend(d.pick([0, 1, 3, 20, 999]) for _ in range(d.int(4)))
        elif choice == 2:
            mutate_shape(lst.shape.add(), d)
        elif choice == 3:
            lst.Clear()
        else:
            lst.func.add(name=d.pick(functions) or "nofn")
    elif kind == "func" and k < 5:
        v.func.name = d.pick(functions) if d.int(2) and functions else d.text(8)
    else:
        choice = d.int(6)
        if choice == 0:
            v.i = d.weird_int()
        elif choice == 1:
            v.type = d.pick([0, 1, 2, 3, 7, 20, 101, 999, d.int(50)])
        elif choice == 2:
            mutate_shape(v.shape, d)
        elif choice == 3:
            v.s = d.bytes(12)
        elif choice == 4:
            v.func.name = d.pick(functions) or "nofn"
        else:
            mutate_tensor(v.tensor, d)


def mutate_signature(meta, d: Data) -> None:
    sigs = sorted(meta.signature_def)
    if not sigs:
        return
    sig = meta.signature_def[d.pick(sigs)]
    table = sig.inputs if d.int(2) else sig.outputs
    keys = sorted(table)
    if not keys:
        return
    info = table[d.pick(keys)]
    k = d.int(5)
    names = [n.name for n in meta.graph_def.node]
    if k == 0:
        info.name = d.pick([f"{d.pick(names)}:{d.int(3)}", d.text(10), ""])
    elif k == 1:
        info.dtype = d.pick([0, 1, 2, 3, 7, 20, 999])
    elif k == 2:
        mutate_shape(info.tensor_shape, d)
    elif k == 3:
        del table[d.pick(keys)]
    else:
        info.coo_sparse.values_tensor_name = d.pick(names)


def mutate_function_signature(f, d: Data, lib) -> None:
    sig = f.signature
    k = d.int(6)
    if k == 0 and sig.input_arg:
        del sig.input_arg[d.int(len(sig.input_arg))]
    elif k == 1:
        sig.input_arg.add(name=d.pick([a.name for a in sig.input_arg]) or "x", type=1)
    elif k == 2 and sig.output_arg:
        out = sig.output_arg[d.int(len(sig.output_arg))]
        nodes = [n.name for n in f.node_def] or ["x"]
        f.ret[out.name] = d.pick([f"{d.pick(nodes)}:output:0", d.pick(nodes), d.text(8)])
    elif k == 3 and sig.output_arg:
        del sig.output_arg[d.int(len(sig.output_arg))]
    elif k == 4:
        sig.name = d.pick([x.signature.name for x in lib])
    else:
        for a in sig.output_arg:
            a.number_attr = d.pick(["", "N", "num"])


def mutate_object_graph(meta, d: Data) -> None:
    og = meta.object_graph_def
    if d.int(2) and og.concrete_functions:
        cf = og.concrete_functions[d.pick(sorted(og.concrete_functions))]
        if cf.bound_inputs:
            cf.bound_inputs[d.int(len(cf.bound_inputs))] = d.weird_int() % 2**31 * d.pick([1, -1])
        else:
            cf.bound_inputs.append(d.weird_int() % 2**31)
    elif len(og.nodes):
        node = og.nodes[d.int(len(og.nodes))]
        if node.children:
            node.children[d.int(len(node.children))].node_id = d.weird_int() % 2**31
        elif node.WhichOneof("kind") == "variable":
            mutate_shape(node.variable.shape, d)


def mutate_misc(meta, d: Data) -> None:
    k = d.int(5)
    lib = meta.graph_def.library.function
    if k == 0 and len(lib):
        del lib[d.int(len(lib))]
    elif k == 1:
        meta.saver_def.restore_op_name = d.pick([n.name for n in meta.graph_def.node] + [""])
    elif k == 2:
        del meta.meta_info_def.tags[:]
        meta.meta_info_def.tags.append(d.pick(["serve", "train", ""]))
    elif k == 3:
        meta.asset_file_def.add(filename=d.pick(["../x", "/etc/passwd", "labels.txt", ""]))
    else:
        meta.graph_def.node.add(name=d.text(6), op=d.pick(_OPS))


# ------------------------------------------------------------------------------------ object graphs
def _i32(v: int) -> int:
    return (int(v) + 2**31) % 2**32 - 2**31


def _i64(v: int) -> int:
    return (int(v) + 2**63) % 2**64 - 2**63


_WEIRD_DTYPES = [0, 1, 2, 3, 7, 9, 10, 14, 17, 19, 20, 21, 23, 101, 120, 999, -1]


def mutate_saved_object_graph(og, d: Data, functions) -> None:
    """One structured mutation of a SavedObjectGraph (the SavedModel's object graph)."""
    n = len(og.nodes)
    names = sorted({c.local_name for o in og.nodes for c in o.children}) or ["x"]

    def ref_id():
        return d.int(n) if n and d.int(3) else _i32(d.weird_int())

    k = d.int(12)
    if k == 0 and n:  # an edge anywhere: cycles, self-loops, out-of-range ids
        node = og.nodes[d.int(n)]
        ref = (node.children if d.int(3) else node.dependencies).add()
        ref.node_id = ref_id()
        ref.local_name = d.pick(names + ["", "variables", "0", d.text(6)])
    elif k == 1 and n:  # huge fan-out
        node = og.nodes[d.int(n)]
        target, step = d.int(n), d.int(3)
        for i in range(d.pick([100, 1000, 20_000])):
            node.children.add(node_id=(target + i * step) % n, local_name=f"c{i}" if d.int(2) else "same")
    elif k == 2:  # a long chain of new objects, closed into a cycle, hung off an object
        length, base = d.pick([10, 1000, 30_000]), n
        close = d.pick([base, 0, base + length // 2, -1])
        for i in range(length):
            obj = og.nodes.add()
            obj.user_object.identifier = "_generic_user_object"
            obj.children.add(node_id=base + i + 1 if i + 1 < length else close,
                             local_name=d.pick(["next", "variables", "0"]))
        if n:
            og.nodes[d.int(n)].children.add(node_id=base, local_name=d.pick(names + ["chain"]))
    elif k == 3 and n:  # the wrong kind of object
        node = og.nodes[d.int(n)]
        kind = d.int(8)
        if kind == 0:
            node.user_object.identifier = d.pick(["_generic_user_object", "trackable_dict_wrapper", d.text(8)])
        elif kind == 1:
            node.variable.name = d.text(8)
            node.variable.dtype = d.pick(_WEIRD_DTYPES)
            mutate_shape(node.variable.shape, d)
            node.variable.trainable = bool(d.int(2))
        elif kind == 2:
            node.function.concrete_functions.append(d.pick(functions + [d.text(8)]) or "f")
        elif kind == 3:
            node.bare_concrete_function.concrete_function_name = d.pick(functions + [d.text(8)]) or "f"
            node.bare_concrete_function.argument_keywords.append(d.text(4))
        elif kind == 4:
            node.constant.operation = d.text(8)
        elif kind == 5:
            node.resource.device = d.text(4)
        elif kind == 6:
            node.asset.asset_file_def_index = _i32(d.weird_int())
        else:
            node.captured_tensor.name = d.text(6)
            node.captured_tensor.concrete_function = d.pick(functions + [""]) or ""
    elif k == 4 and n:  # saveable objects whose functions are out of range or wrong
        node = og.nodes[d.int(n)]
        so = node.saveable_objects[d.pick(["VARIABLE_VALUE", "value", d.text(4)])]
        so.save_function, so.restore_function = ref_id(), ref_id()
    elif k == 5 and og.concrete_functions:  # bound inputs: wrong, out of range, too many, none
        cf = og.concrete_functions[d.pick(sorted(og.concrete_functions))]
        c = d.int(4)
        if c == 0 and cf.bound_inputs:
            cf.bound_inputs[d.int(len(cf.bound_inputs))] = ref_id()
        elif c == 1:
            cf.bound_inputs.extend(ref_id() for _ in range(1 + d.int(5)))
        elif c == 2:
            del cf.bound_inputs[:]
        elif cf.bound_inputs:
            cf.bound_inputs.append(cf.bound_inputs[0])
    elif k == 6:  # concrete-function entries removed or invented
        if og.concrete_functions and d.int(2):
            del og.concrete_functions[d.pick(sorted(og.concrete_functions))]
        else:
            og.concrete_functions[d.pick(functions + [d.text(6)]) or "f"].bound_inputs.extend(
                ref_id() for _ in range(d.int(4)))
    elif k == 7 and n:  # a child renamed: to a sibling's name, empty, anything
        node = og.nodes[d.int(n)]
        if node.children:
            siblings = [c.local_name for c in node.children]
            node.children[d.int(len(node.children))].local_name = d.pick(siblings + ["", d.text(5)])
    elif k == 8 and n > 1:  # trailing objects dropped: references out of range
        del og.nodes[1 + d.int(n - 1):]
    elif k == 9 and n > 1:  # two objects swapped
        a, b = d.int(n), d.int(n)
        tmp = type(og.nodes[a])()
        tmp.CopyFrom(og.nodes[a])
        og.nodes[a].CopyFrom(og.nodes[b])
        og.nodes[b].CopyFrom(tmp)
    elif k == 10 and n:  # slot variables pointing anywhere
        og.nodes[d.int(n)].slot_variables.add(original_variable_node_id=ref_id(), slot_name=d.text(4),
                                              slot_variable_node_id=ref_id())
    elif n:  # an object emptied
        og.nodes[d.int(n)].Clear()
    else:
        og.nodes.add()


def mutate_trackable_graph(tog, d: Data, keys) -> None:
    """One mutation of the checkpoint's TrackableObjectGraph: missing, duplicate or foreign checkpoint
    keys, cycles, out-of-range children."""
    n = len(tog.nodes)
    with_attrs = [i for i, o in enumerate(tog.nodes) if o.attributes]
    k = d.int(6)
    if k == 0 and with_attrs:
        del tog.nodes[d.pick(with_attrs)].attributes[:]
    elif k == 1 and with_attrs:
        tog.nodes[d.pick(with_attrs)].attributes[0].checkpoint_key = d.pick(keys + [d.text(10), ""])
    elif k == 2 and n:
        tog.nodes[d.int(n)].children.add(node_id=d.int(n) if d.int(3) else _i32(d.weird_int()),
                                         local_name=d.pick(["variables", "0", "kernel", d.text(4)]))
    elif k == 3 and n:
        node = tog.nodes[d.int(n)]
        if node.children:
            node.children[d.int(len(node.children))].local_name = d.text(5)
    elif k == 4 and n:
        tog.nodes[d.int(n)].attributes.add(name="VARIABLE_VALUE", full_name=d.text(6),
                                           checkpoint_key=d.pick(keys + [d.text(8)]))
    elif n > 1:
        del tog.nodes[1 + d.int(n - 1):]


def _write_checkpoint(vdir: Path, values: dict) -> None:
    import tensorflow as tf

    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir()
    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=str(vdir / "variables"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[k]) for k in names])


def _restore_files(vdir: Path, files: dict) -> None:
    if vdir.is_dir() and sorted(p.name for p in vdir.iterdir()) == sorted(files):
        for name, raw in files.items():
            if (vdir / name).stat().st_size != len(raw) or name.endswith(".index"):
                (vdir / name).write_bytes(raw)
        return
    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir()
    for name, raw in files.items():
        (vdir / name).write_bytes(raw)


# ------------------------------------------------------------------------------------ checkpoint index
# The index is a table in TensorFlow's (leveldb's) format: tests/hardening/corpus.py reads and writes it
# (read_table, write_table, masked_crc), for these mutations and for the corpus' reproducers. Imported
# when first needed: importing it imports graphslim, which atheris must instrument first.
def _tables():
    if str(ROOT / "tests" / "hardening") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests" / "hardening"))
    import corpus

    return corpus


def index_known_crash(index: bytes) -> str | None:
    """The known crash (found, reported, not fixed yet) that reading this index would trigger, if any.
    TensorFlow's CheckpointReader, which graphslim's loader opens on the model's index, aborts the
    process on an entry whose value is not a BundleEntryProto (``Check failed:
    entry.ParseFromString``, checkpoint_reader.cc:122; a second entry with the empty key too), whose
    shape TensorShape refuses (``Check failed: size >= 0``, tensor_shape.cc:416: a negative dim;
    ``0 <= new_num_elements``, tensor_shape.cc:424: a running product past 2^63), whose slice has a
    negative or huge extent, or no length (the whole dim) from a start other than 0 (the same checks,
    through TensorSlice::SliceTensorShape), or comes twice for a key (``filtered_keys.insert``,
    checkpoint_reader.cc:130), or whose dtype is not a plain tensor type
    (``Unexpected type: 101``, tensor.cc:1014). It does not check the block checksums first, so
    neither does this."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import tensor_bundle_pb2

    def overflows(sizes) -> bool:  # TensorShape multiplies dim by dim and checks every product
        n = 1
        for size in sizes:
            if size < 0:
                return True
            n *= size
            if n >= 2**63:
                return True
        return False

    plain = {v for v in types_pb2.DataType.values() if 0 < v < 100}
    try:
        entries, _ = _tables().read_table(index)
    except (ValueError, IndexError):
        return None
    seen = set()  # (key, slice): the reader registers each once
    for key, value in entries[1:]:  # the reader takes the first entry for the header, whatever its key
        e = tensor_bundle_pb2.BundleEntryProto()
        try:
            e.ParseFromString(value)
        except DecodeError:
            return "checkpoint-entry-not-a-proto"
        dims = [d.size for d in e.shape.dim]
        if e.shape.unknown_rank or len(dims) > 254 or overflows(dims):
            return "checkpoint-entry-bad-shape"
        if e.dtype not in plain:
            return "checkpoint-entry-bad-dtype"
        for sl in e.slices:
            lengths = []
            for i, x in enumerate(sl.extent):
                if x.HasField("length"):
                    lengths.append(x.length)
                elif x.start != 0:  # no length means the whole dim: from anywhere but 0, length -1
                    return "checkpoint-entry-bad-slice"
                else:
                    lengths.append(dims[i] if i < len(dims) else 0)
                if x.start < 0:
                    return "checkpoint-entry-bad-slice"
            spec = (key, tuple((x.start, x.length if x.HasField("length") else -1) for x in sl.extent))
            if overflows(lengths) or spec in seen:  # a negative or huge extent; one slice twice
                return "checkpoint-entry-bad-slice"
            seen.add(spec)
    return None


def mutate_index_entries(entries, d: Data, tensor_data: bytes) -> bytes:
    """Re-encode the index after 1-4 structured mutations of its entries (BundleEntryProto values, the
    header under the empty key, the keys themselves)."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import tensor_bundle_pb2

    entries = list(entries)
    for _ in range(1 + d.int(4)):
        if not entries:
            break
        i = d.int(len(entries))
        key, value = entries[i]
        k = d.int(10)
        if k < 6 and key != b"":
            e = tensor_bundle_pb2.BundleEntryProto()
            try:
                e.ParseFromString(value)
            except DecodeError:  # made garbage by an earlier mutation
                continue
            mutate_bundle_entry(e, d, tensor_data)
            entries[i] = (key, e.SerializeToString())
        elif k < 6:
            h = tensor_bundle_pb2.BundleHeaderProto()
            try:
                h.ParseFromString(value)
            except DecodeError:
                continue
            c = d.int(4)
            if c == 0:
                h.num_shards = _i32(d.weird_int())
            elif c == 1:
                h.endianness = d.pick([1, 2, -1])
            elif c == 2:
                h.version.producer, h.version.min_consumer = _i32(d.weird_int()), _i32(d.weird_int())
            else:
                h.version.bad_consumers.extend(_i32(d.weird_int()) for _ in range(1 + d.int(3)))
            entries[i] = (key, h.SerializeToString())
        elif k == 6:  # a key missing
            del entries[i]
        elif k == 7:  # a key twice (the same or another value)
            entries.insert(i + d.int(2), (key, d.pick([value, entries[d.int(len(entries))][1]])))
        elif k == 8:  # renamed: to another key, to nothing, to anything; or two swapped (unsorted)
            c = d.int(3)
            if c == 0:
                j = d.int(len(entries))
                entries[i], entries[j] = entries[j], entries[i]
            else:
                entries[i] = (d.pick([entries[d.int(len(entries))][0], b"", d.bytes(12)]), value)
        else:  # a value that is not a proto
            entries[i] = (key, d.bytes(40))
    per_block = d.pick([16, 1, 2, 3, 1000])
    restart = d.pick([16, 1, 2, 5])
    bad = d.int(8) - 5 if d.int(4) == 0 else -1
    return _tables().write_table(entries, per_block, restart, bad)


def mutate_bundle_entry(e, d: Data, tensor_data: bytes) -> None:
    size = len(tensor_data)
    k = d.int(9)
    if k == 0:
        e.dtype = d.pick(_WEIRD_DTYPES)
    elif k == 1:
        mutate_shape(e.shape, d)
    elif k == 2:
        e.shard_id = d.pick([1, -1, 2, _i32(d.weird_int())])
    elif k == 3:
        e.offset = _i64(d.weird_int()) if d.int(2) else d.int(size + 64)
    elif k == 4:
        e.size = _i64(d.weird_int()) if d.int(2) else d.int(size + 64)
    elif k == 5:
        e.crc32c = d.int(2**32)
    elif k == 6:
        sl = e.slices.add()
        for _ in range(d.int(4)):
            ext = sl.extent.add()
            ext.start = _i64(d.weird_int())
            if d.int(2):
                ext.length = _i64(d.weird_int())
    elif k == 7:
        e.Clear()
        e.dtype = d.pick(_WEIRD_DTYPES)
    else:  # shape and size changed together, the crc made right for the new slice
        mutate_shape(e.shape, d)
        e.size = d.int(size + 1)
        e.offset = d.int(size + 1)
    if d.int(2) and 0 <= e.offset <= e.offset + e.size <= size:
        e.crc32c = _tables().masked_crc(tensor_data[e.offset:e.offset + e.size])


def mutate_index_bytes(raw: bytes, blocks, d: Data) -> bytes:
    """Bytes of the index flipped, inserted, deleted or cut; inside one block with its checksum made
    right again (so the parser behind the checksum is reached), or anywhere."""
    buf = bytearray(raw)
    k = d.int(5)
    if k < 3 and blocks:
        off, size = d.pick(blocks)
        if size:
            for _ in range(1 + d.int(6)):
                i = off + d.int(size)
                if i < len(buf):
                    buf[i] = d.byte() if d.int(2) else buf[i] ^ (1 << d.int(8))
            if k < 2 and off + size + 5 <= len(buf):
                crc = _tables().masked_crc(bytes(buf[off:off + size + 1]))
                buf[off + size + 1:off + size + 5] = crc.to_bytes(4, "little")
    elif k == 3:
        for _ in range(1 + d.int(8)):
            if buf:
                buf[d.int(len(buf))] ^= 1 << d.int(8)
    else:
        c = d.int(3)
        i = d.int(len(buf) + 1)
        if c == 0:
            buf[i:i] = d.bytes(8)
        elif c == 1:
            del buf[i:i + 1 + d.int(8)]
        else:
            buf = buf[:i]
    return bytes(buf)


# ------------------------------------------------------------------------------------ function library
_CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")


def build_control_flow_model(path: Path) -> Path:
    """A tf.Module whose signature holds tf.cond (If), tf.while_loop (While), tf.switch_case (Case) and
    nested tf.function calls: the seed that gives funclib func and list(func) attrs to mutate."""
    import tensorflow as tf

    class ControlFlow(tf.Module):
        def __init__(self):
            super().__init__()
            self.v = tf.Variable([0.5, -1.0, 2.0, 0.25], name="v")

        @tf.function
        def inner(self, x):
            return tf.nn.relu(x) * self.v

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x):
            y = tf.cond(tf.reduce_sum(x) > 0, lambda: self.inner(x), lambda: x - 1.0)
            _, y = tf.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y * 0.5 + self.v), [0, y])
            k = tf.math.floormod(tf.cast(tf.reduce_sum(y), tf.int32), 3)
            y = tf.switch_case(k, [lambda: y + 1.0, lambda: y * 2.0, lambda: self.inner(y)])
            return {"y": y}

    m = ControlFlow()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.__call__})
    return path


def _func_attr_values(nd):
    for key in sorted(nd.attr):
        v = nd.attr[key]
        if v.WhichOneof("value") == "func" or (v.WhichOneof("value") == "list" and len(v.list.func)):
            yield key, v


def _serving_functions(meta, lib) -> list[int]:
    """Indices in ``lib`` of the functions the serving signature reaches (calls and func attrs)."""
    index = {f.signature.name: i for i, f in enumerate(lib)}
    sig = meta.signature_def.get("serving_default")
    if sig is None:
        return []
    outer = {n.name: n for n in meta.graph_def.node}
    stack = [t.name.split(":")[0] for t in sig.outputs.values()]
    names, seen = [], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        nd = outer.get(name)
        if nd is not None:  # an outer node: its inputs, and what it calls
            stack.extend(i.lstrip("^").split(":")[0] for i in nd.input)
            nodes = [nd]
        elif name in index:
            names.append(name)
            nodes = list(lib[index[name]].node_def)
        else:
            continue
        for n in nodes:
            if n.op in index:
                stack.append(n.op)
            for _, v in _func_attr_values(n):
                stack.extend([v.func.name] if v.WhichOneof("value") == "func" else [x.name for x in v.list.func])
    return [index[n] for n in names]


def mutate_function_library(meta, d: Data) -> None:
    """One mutation of the function library (or of how the graph calls it); two times in three, of a
    function the serving signature reaches."""
    lib = meta.graph_def.library.function
    if not len(lib):
        return
    names = [f.signature.name for f in lib]
    served = _serving_functions(meta, lib)
    f = lib[d.pick(served) if served and d.int(3) else d.int(len(lib))]
    nodes = [n.name for n in f.node_def]
    everywhere = [n for g in [meta.graph_def.node] + [x.node_def for x in lib] for n in g]
    calls = [n for n in everywhere if n.op in _CALL_OPS or n.op in names or any(True for _ in _func_attr_values(n))]
    k = d.int(12)
    if k == 0:
        mutate_function_signature(f, d, lib)
    elif k == 1:  # an argument's type and type attrs
        args = list(f.signature.input_arg) + list(f.signature.output_arg)
        if args:
            a = d.pick(args)
            c = d.int(5)
            if c == 0:
                a.type = d.pick(_WEIRD_DTYPES)
            elif c == 1:
                a.type_attr = d.pick(["T", "Tin", "dtype", "nosuch", ""])
            elif c == 2:
                a.number_attr = d.pick(["N", "num", "nosuch", ""])
            elif c == 3:
                a.type_list_attr = d.pick(["Tin", "Tout", "nosuch", ""])
            else:
                a.is_ref = not a.is_ref
    elif k == 2 and calls:  # a call site passes more, fewer or other arguments
        nd = d.pick(calls)
        c = d.int(4)
        if c == 0 and nd.input:
            del nd.input[d.int(len(nd.input))]
        elif c == 1:
            nd.input.append(d.pick(list(nd.input) + ["x", "nosuch:0"]) or "x")
        elif c == 2:
            key = d.pick(["Tin", "Tout", "T"])
            nd.attr[key].list.type.extend(d.pick(_WEIRD_DTYPES) for _ in range(1 + d.int(3)))
        else:
            for key in ("Tin", "Tout", "T"):
                if key in nd.attr and d.int(2):
                    del nd.attr[key].list.type[:]
    elif k == 3:  # a nested call: f calls g (g may be f, or call f)
        g = d.pick(names)
        call = f.node_def.add(name=f"fuzz_call_{d.int(1000)}", op=d.pick(list(_CALL_OPS) + [g]))
        if call.op in _CALL_OPS:
            call.attr["f"].func.name = g
            call.attr["Tin"].list.SetInParent()
            call.attr["Tout"].list.SetInParent()
        for _ in range(d.int(3)):
            call.input.append(d.pick([a.name for a in f.signature.input_arg] + nodes + ["nosuch"]))
    elif k == 4 and calls:  # a func or list(func) attr pointing elsewhere
        nd = d.pick(calls)
        attrs = list(_func_attr_values(nd))
        if attrs:
            key, v = d.pick(attrs)
            if v.WhichOneof("value") == "func":
                v.func.name = d.pick(names + ["nosuch", ""])
            else:
                c = d.int(3)
                if c == 0:
                    del v.list.func[:]
                elif c == 1:
                    v.list.func.add(name=d.pick(names + ["nosuch"]))
                else:
                    v.list.func[d.int(len(v.list.func))].name = d.pick(names + ["nosuch"])
        else:
            nd.attr["f"].func.name = d.pick(names)
    elif k == 5:  # recursion through control flow: an If, While or Case that calls f from f
        op = d.pick(["If", "StatelessIf", "While", "StatelessWhile", "Case"])
        nd = f.node_def.add(name=f"fuzz_{op}_{d.int(1000)}", op=op)
        for key in {"If": ("then_branch", "else_branch"), "StatelessIf": ("then_branch", "else_branch"),
                    "While": ("cond", "body"), "StatelessWhile": ("cond", "body")}.get(op, ()):
            nd.attr[key].func.name = d.pick([f.signature.name] + names)
        if op == "Case":
            for _ in range(1 + d.int(3)):
                nd.attr["branches"].list.func.add(name=d.pick([f.signature.name] + names))
        for _ in range(d.int(3)):
            nd.input.append(d.pick([a.name for a in f.signature.input_arg] + ["nosuch"]))
    elif k == 6:  # a ret map entry: missing, extra, pointing anywhere
        outs = [a.name for a in f.signature.output_arg]
        c = d.int(3)
        if c == 0 and outs:
            f.ret.pop(d.pick(outs), None)
        else:
            key = d.pick(outs) if c == 1 and outs else d.text(5)
            src = d.pick(nodes) or "x"
            f.ret[key] = d.pick([f"{src}:output:0", f"{src}:output:{_i32(d.weird_int())}", src, f"^{src}",
                                 d.pick([a.name for a in f.signature.input_arg] or ["x"]), "nosuch:output:0", ""])
    elif k == 7:  # control returns to nowhere
        c = d.int(3)
        if c == 0:
            f.control_ret[d.text(5) or "c"] = d.pick(nodes + ["nosuch", ""]) or ""
        elif c == 1:
            f.signature.control_output.append(d.pick(nodes + ["nosuch"]))
        else:
            f.control_ret.clear()
    elif k == 8 and f.node_def:  # an attr made a placeholder for a function attr that may not exist
        nd = f.node_def[d.int(len(f.node_def))]
        key = d.pick(sorted(nd.attr) + ["T", "dtype"])
        nd.attr[key].Clear()
        nd.attr[key].placeholder = d.pick(["T", "Tin", "dtype", d.text(3)])
        if d.int(2):
            f.attr[nd.attr[key].placeholder].type = d.pick(_WEIRD_DTYPES)
    elif k == 9:  # a function removed, duplicated, or renamed onto another
        c = d.int(3)
        if c == 0:
            lib.remove(f)
        elif c == 1:
            lib.add().CopyFrom(f)
        else:
            f.signature.name = d.pick(names)
    elif k == 10:
        mutate_nodes(list(f.node_def), f.node_def, d, names, function=f)
    else:  # stateful flag, argument attrs
        c = d.int(3)
        if c == 0:
            f.signature.is_stateful = not f.signature.is_stateful
        elif c == 1 and f.signature.input_arg:
            f.arg_attr[d.int(len(f.signature.input_arg) + 2)].attr["_output_shapes"].list.shape.add().dim.add(
                size=_i64(d.weird_int()))
        else:
            f.resource_arg_unique_id[d.int(8)] = d.weird_int() % 2**32


# ------------------------------------------------------------------------------------ running
def classify(harness, fn, data: bytes):
    """None, or a (key, description) of the failure ``fn(data)`` raised."""
    from graphslim.errors import GraphslimError

    try:
        fn(data)
        return None
    except KeyboardInterrupt:
        raise
    except Bug as exc:
        cause = exc.__cause__
        return _key(harness, cause or exc), f"{exc}" + (f"\n{_tb(cause)}" if cause else "")
    except KnownCrash as exc:
        return f"known:{exc}", ""
    except GraphslimError:
        return None
    except BaseException as exc:  # noqa: BLE001 - the point of the harness
        return _key(harness, exc), f"{type(exc).__name__}: {exc}\n{_tb(exc)}"


def guarded(harness, fn, data: bytes, out: Path | None):
    """:func:`classify` under a watchdog: the input is saved first (``out/last-<harness>.bin``) and an
    execution longer than :data:`HANG_SECONDS` dumps every thread's stack and ends the process (exit
    status 1), which the parent counts as a failure (even when TensorFlow holds the main thread)."""
    import faulthandler

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"last-{harness}.bin").write_bytes(data)
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        return classify(harness, fn, data)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _tb(exc) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]


def _key(harness: str, exc: BaseException) -> str:
    where = "?"
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename
        if "graphslim" in f or "passes" in f:
            where = f"{Path(f).name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return f"{harness}:{type(exc).__name__}@{where}"


class Recorder:
    def __init__(self, harness: str, out: Path, stats_file: Path | None, flush_every: int = 250):
        self.harness, self.out, self.stats_file = harness, out, stats_file
        self.flush_every = flush_every
        self.runs, self.failures, self.kinds, self.known = 0, 0, {}, {}
        self.start = time.time()

    def record(self, data: bytes, result) -> None:
        self.runs += 1
        if result is not None and result[0].startswith("known:"):
            self.known[result[0][6:]] = self.known.get(result[0][6:], 0) + 1
        elif result is not None:
            key, text = result
            self.failures += 1
            if key not in self.kinds:
                self.kinds[key] = {"count": 0, "example": text[:4000]}
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / f"{key.replace('/', '_').replace(':', '_')}.bin").write_bytes(data)
            self.kinds[key]["count"] += 1
        if self.runs % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        if self.stats_file is not None:
            tmp = self.stats_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"harness": self.harness, "runs": self.runs, "failures": self.failures,
                                       "kinds": self.kinds, "known": self.known,
                                       "seconds": time.time() - self.start}))
            os.replace(tmp, self.stats_file)


def harness_functions(work: Path) -> dict:
    h = Harnesses(work)
    return {"raw": h.raw, "mutate": h.mutate, "frozen": h.frozen_graph, "pipeline": h.pipeline,
            "objgraph": h.objgraph, "ckptindex": h.ckptindex, "funclib": h.funclib}


def run_random(harness: str, runs: int, seconds: float, seed: int, out: Path, stats_file=None,
               work: Path | None = None) -> Recorder:
    """The seeded random engine, in this process: random byte strings, half of them mutations of
    earlier ones, through one harness."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="graphslim-fuzz-")) if own else work
    work.mkdir(parents=True, exist_ok=True)
    try:
        fn = harness_functions(work)[harness]
        rng = random.Random(seed)
        rec = Recorder(harness, out, stats_file)
        pool: list[bytes] = []
        seed_pb = (FIXTURES / "vgg_digits" / "saved_model.pb").read_bytes() if harness == "raw" else b""
        deadline = time.time() + seconds
        while rec.runs < runs and time.time() < deadline:
            if harness == "raw" and rng.random() < 0.7:
                data = bytearray(seed_pb)
                for _ in range(rng.randint(1, 16)):  # flips, truncation, splices of the real file
                    op = rng.random()
                    if op < 0.6 and data:
                        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                    elif op < 0.8:
                        data = data[: rng.randrange(len(data) + 1)]
                    elif data:
                        i = rng.randrange(len(data))
                        data[i:i] = rng.randbytes(rng.randint(1, 8))
                data = bytes(data)
            elif pool and rng.random() < 0.5:
                data = bytearray(rng.choice(pool))
                for _ in range(rng.randint(1, 4)):
                    if data:
                        data[rng.randrange(len(data))] = rng.randrange(256)
                data = bytes(data)
            else:
                data = rng.randbytes(rng.randint(0, 256))
            if len(pool) < 256:
                pool.append(data)
            rec.record(data, guarded(harness, fn, data, out))
        rec.flush()
        return rec
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def run_atheris_child(harness: str, runs: int, seconds: float, out: Path, stats_file: Path) -> None:
    """This process runs one harness under atheris (libFuzzer) until ``runs`` or ``seconds``."""
    import atheris

    with atheris.instrument_imports(include=["graphslim"]):
        import graphslim.io.loader  # noqa: F401
        import graphslim.io.scan  # noqa: F401
        import graphslim.pipeline  # noqa: F401
        import graphslim.ir.tfconv  # noqa: F401
        import graphslim.ir.graph  # noqa: F401
    work = Path(tempfile.mkdtemp(prefix="graphslim-fuzz-"))
    fn = harness_functions(work)[harness]
    rec = Recorder(harness, out, stats_file, flush_every=25)  # libFuzzer may exit without Python's atexit
    corpus_dir = out / f"corpus-{harness}"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    if harness == "raw" and not any(corpus_dir.iterdir()):
        shutil.copy(FIXTURES / "vgg_digits" / "saved_model.pb", corpus_dir / "seed")

    def one(data: bytes) -> None:
        rec.record(data, guarded(harness, fn, data, out))
        if rec.runs >= runs:
            rec.flush()
            os._exit(0)

    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-max_total_time={int(seconds)}", "-timeout=60",
                   "-rss_limit_mb=6144", f"-artifact_prefix={out}/", "-max_len=300000",
                   "-print_final_stats=0", str(corpus_dir)], one)
    try:
        atheris.Fuzz()
    finally:
        rec.flush()


def _child_limits() -> None:
    """A harness child's address space is bounded: an out-of-memory is a failure, not a swapping host."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = ADDRESS_SPACE if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def run_harness_in_children(harness: str, runs: int, seconds: float, engine: str, out: Path,
                            seed: int) -> dict:
    """Run a harness in child processes until ``runs`` or ``seconds``; a child that dies (a crash, a
    libFuzzer timeout or out-of-memory) counts as a failure and is replaced."""
    total = {"harness": harness, "runs": 0, "failures": 0, "kinds": {}, "children": 0, "known": {}}
    deadline = time.time() + seconds
    while total["runs"] < runs and time.time() < deadline - 5:
        stats_file = out / f"stats-{harness}-{total['children']}.json"
        left_runs, left_time = runs - total["runs"], deadline - time.time()
        cmd = [sys.executable, __file__, "--child", "--harness", harness, "--runs", str(left_runs),
               "--seconds", str(int(left_time)), "--engine", engine, "--out", str(out),
               "--stats", str(stats_file), "--seed", str(seed + total["children"])]
        if SKIP_KNOWN:
            cmd.append("--skip-known")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left_time + 120,
                                  preexec_fn=_child_limits)
            code, tail = proc.returncode, _crash_excerpt(proc.stderr)
        except subprocess.TimeoutExpired:
            code, tail = "timeout", "the child did not stop in time"
        total["children"] += 1
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"runs": 0, "failures": 0, "kinds": {}}
        total["runs"] += stats["runs"]
        total["failures"] += stats["failures"]
        for key, info in stats["kinds"].items():
            k = total["kinds"].setdefault(key, {"count": 0, "example": info["example"]})
            k["count"] += info["count"]
        for key, n in stats.get("known", {}).items():
            total["known"][key] = total["known"].get(key, 0) + n
        if code != 0:  # died: a crash, a hang or an OOM of the whole process
            total["failures"] += 1
            key = _child_key(harness, code, tail)
            k = total["kinds"].setdefault(key, {"count": 0, "example": tail})
            k["count"] += 1
            total["runs"] += 1  # the input that killed it
            last = out / f"last-{harness}.bin"
            if last.exists():
                shutil.copy(last, out / f"{key.replace(':', '_').replace('/', '_')}-{total['children']}.bin")
    return total


def _crash_excerpt(stderr: str) -> str:
    """What tells how a child died: a failed check, faulthandler's header and the first frames of its
    dump (not the list of extension modules it ends with); else the end of stderr."""
    lines = stderr.splitlines()
    keep = [i for i, ln in enumerate(lines)
            if "Check failed" in ln or ln.startswith(("Fatal Python error", "Timeout (", "terminate called"))
            or (ln[:1] == "F" and ln[1:5].isdigit())]
    if not keep:
        return stderr[-3000:]
    out = []
    for i in keep[:3]:
        out.extend(lines[i:i + 14])
    return "\n".join(ln for ln in out if not ln.startswith("Extension modules"))[:3000]


def _child_key(harness: str, code, tail: str) -> str:
    """A name for how a harness child died, from its exit status and the end of its stderr: a failed
    TensorFlow check (file:line), a hang (the watchdog's stack dump), a fatal signal (the innermost
    graphslim frame of faulthandler's dump), else the exit status."""
    import re

    if "Timeout (" in tail:
        where = re.findall(r'File "[^"]*/((?:graphslim|passes)/[^"]+)", line (\d+)', tail)
        return f"{harness}:hang" + (f"@{Path(where[0][0]).name}:{where[0][1]}" if where else "")
    m = re.search(r"(\w+\.cc:\d+)\] Check failed", tail)
    if m:
        return f"{harness}:check-failed@{m.group(1)}"
    m = re.search(r"^F\d{4} .*? (\w+\.cc:\d+)\]", tail, re.M)  # any other fatal log of TensorFlow
    if m:
        return f"{harness}:fatal@{m.group(1)}"
    m = re.search(r"Fatal Python error: (\w+)", tail)
    if m:
        where = re.findall(r'File "[^"]*/((?:graphslim|passes)/[^"]+)", line (\d+)', tail)
        return f"{harness}:{m.group(1)}" + (f"@{Path(where[0][0]).name}:{where[0][1]}" if where else "")
    return f"{harness}:child-exit-{code}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", choices=[*DEFAULT_PLAN, "all"], default="all")
    ap.add_argument("--runs", type=int, default=None, help="executions (per harness)")
    ap.add_argument("--seconds", type=float, default=None, help="time limit (per harness)")
    ap.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    ap.add_argument("--out", type=Path, default=None, help="where failing inputs and stats go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-known", action="store_true",
                    help="count inputs that would trigger a crash found before its fix (a hostile "
                         "variables.index, now refused by graphslim.io.ckpt_index) apart and skip them; "
                         "by default they run like any other input")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stats", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global SKIP_KNOWN
    SKIP_KNOWN = args.skip_known
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    out = args.out or Path(tempfile.mkdtemp(prefix="graphslim-fuzz-out-"))
    out.mkdir(parents=True, exist_ok=True)

    if args.child:
        import faulthandler

        faulthandler.enable()  # a crash prints the Python stacks: the parent names the failure by them
        if engine == "atheris":
            run_atheris_child(args.harness, args.runs, args.seconds, out, args.stats)
        else:
            run_random(args.harness, args.runs, args.seconds, args.seed, out, args.stats)
        return

    harnesses = list(DEFAULT_PLAN) if args.harness == "all" else [args.harness]
    results = []
    start = time.time()
    for h in harnesses:
        runs = args.runs or DEFAULT_PLAN[h][0]
        seconds = args.seconds or DEFAULT_PLAN[h][1]
        print(f"{h}: up to {runs:,} executions / {seconds:.0f}s with {engine} ...", flush=True)
        r = run_harness_in_children(h, runs, seconds, engine, out, args.seed)
        results.append(r)
        print(f"{h}: {r['runs']:,} executions, {r['failures']} failures, {len(r['kinds'])} distinct "
              f"({r['children']} child process(es))", flush=True)
        for key, info in r["kinds"].items():
            print(f"    {key} x{info['count']}: {info['example'].splitlines()[0][:300] if info['example'] else ''}")
        for key, n in r["known"].items():
            print(f"    known crash {key}: {n} input(s) not run (--skip-known)")
    print()
    print(f"{'harness':10} {'executions':>12} {'failures':>9} {'distinct':>9} {'known':>7}")
    for r in results:
        print(f"{r['harness']:10} {r['runs']:>12,} {r['failures']:>9} {len(r['kinds']):>9} "
              f"{sum(r['known'].values()):>7}")
    print(f"{'total':10} {sum(r['runs'] for r in results):>12,} {sum(r['failures'] for r in results):>9}"
          f" {'':>9} {sum(sum(r['known'].values()) for r in results):>7}")
    print(f"engine {engine}, {time.time() - start:.0f}s, inputs and stats in {out}")
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    if any(r["failures"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
