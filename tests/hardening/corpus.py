"""Builders of broken and dangerous models, made from the bundled fixtures (issue 6, items 1 and 2).

Each :class:`Case` writes one model under a directory and says what a clear error must mention.
Cases are built by protobuf surgery on copies of the fixtures (fast, exact) and, for checkpoints,
with TensorFlow's own ``SaveV2``. Used by the tests in this folder and by ``benchmarks/fuzz.py``.

    python -m tests.hardening.corpus OUT_DIR      # writes every case, prints one line per case
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from graphslim.io.ckpt_index import block_entries, read_varint
from graphslim.testing import fixture_path

VGG, TF1, TF_MODULE, FROZEN = "vgg_digits", "tf1_model", "tf_module", "frozen_vgg"


@dataclass
class Case:
    """``build(dst)`` writes the model under the fresh directory ``dst`` and returns the path to load.
    A clear error must contain every string of ``expect``; ``may_load`` cases may instead load (then
    they must round-trip)."""

    name: str
    build: Callable[[Path], Path]
    expect: tuple = ()
    may_load: bool = False
    tags: tuple = field(default_factory=tuple)
    in_process: bool = True  # False: a regression would abort the process (TensorFlow CHECK failure)


# ------------------------------------------------------------------------------------ proto helpers
def copy_fixture(name: str, dst: Path) -> Path:
    src = fixture_path(name)
    if src.is_file():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst / src.name)
        return dst / src.name
    shutil.copytree(src, dst / name)
    return dst / name


def read_saved_model(model: Path):
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((model / "saved_model.pb").read_bytes())
    return sm


def write_saved_model(model: Path, sm) -> None:
    (model / "saved_model.pb").write_bytes(sm.SerializeToString())


def serving_body(meta):
    """The FunctionDef with the model's layers (Keras exports: ``__inference___call___N`` called by
    the serving signature's wrapper)."""
    bodies = [f for f in meta.graph_def.library.function if f.signature.name.startswith("__inference___call___")]
    return max(bodies, key=lambda f: len(f.node_def))


def function(meta, prefix: str):
    return next(f for f in meta.graph_def.library.function if f.signature.name.startswith(prefix))


def edit(fixture: str, fn: Callable, name: str | None = None) -> Callable[[Path], Path]:
    """A builder: copy ``fixture``, apply ``fn(meta)`` to its MetaGraphDef, write it back."""
    def build(dst: Path) -> Path:
        model = copy_fixture(fixture, dst)
        sm = read_saved_model(model)
        fn(sm.meta_graphs[0])
        write_saved_model(model, sm)
        return model
    return build


def node_def(name: str, op: str, inputs=(), **attrs):
    from tensorflow.core.framework import node_def_pb2

    nd = node_def_pb2.NodeDef(name=name, op=op)
    nd.input.extend(inputs)
    for k, v in attrs.items():
        nd.attr[k].CopyFrom(v)
    return nd


def attr(**kw):
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue(**kw)


def _type_list(*dtypes):
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue.ListValue(type=[d.as_datatype_enum for d in dtypes])


def string_const(name: str, value: bytes):
    import tensorflow as tf

    return node_def(name, "Const", dtype=attr(type=tf.string.as_datatype_enum),
                    value=attr(tensor=tf.make_tensor_proto(value)))


def add_function(meta, name: str, nodes, calls=()):
    """Add a FunctionDef ``name`` (no inputs, no outputs) with ``nodes`` and a call of each function
    in ``calls``."""
    from tensorflow.core.framework import function_pb2

    f = function_pb2.FunctionDef()
    f.signature.name = name
    f.signature.is_stateful = True
    f.node_def.extend(nodes)
    for i, callee in enumerate(calls):
        call = f.node_def.add(name=f"call_{i}", op="StatefulPartitionedCall")
        call.attr["f"].func.name = callee
        call.attr["Tin"].list.SetInParent()
        call.attr["Tout"].list.SetInParent()
    meta.graph_def.library.function.append(f)
    return f


def call_from_body(meta, callee: str) -> None:
    """Make the serving body call ``callee`` (a dead call: inlining still reaches it)."""
    body = serving_body(meta)
    call = body.node_def.add(name=f"call_{callee}", op="StatefulPartitionedCall")
    call.attr["f"].func.name = callee
    call.attr["Tin"].list.SetInParent()
    call.attr["Tout"].list.SetInParent()


def write_checkpoint(prefix: Path, tensors: dict, slices: dict | None = None) -> None:
    """A TF checkpoint with ``tensors`` (name → array); ``slices`` gives a shape-and-slice spec per
    name (e.g. ``"2000000000 0,1"``: the index then records the full shape)."""
    import tensorflow as tf

    names = sorted(tensors)
    specs = [(slices or {}).get(n, "") for n in names]
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=specs,
                      tensors=[tf.constant(tensors[n]) for n in names])


def checkpoint_values(model: Path) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(model / "variables" / "variables"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


def rewrite_checkpoint(model: Path, values: dict, slices: dict | None = None) -> None:
    vdir = model / "variables"
    shutil.rmtree(vdir)
    vdir.mkdir()
    write_checkpoint(vdir / "variables", values, slices)


def set_shape(shape_proto, dims) -> None:
    del shape_proto.dim[:]
    for d in dims:
        shape_proto.dim.add(size=d)


# ------------------------------------------------------------------------------------ bad inputs
def _truncate(frac: float):
    def build(dst):
        model = copy_fixture(VGG, dst)
        pb = model / "saved_model.pb"
        data = pb.read_bytes()
        pb.write_bytes(data[: int(len(data) * frac)])
        return model
    return build


def _pb_fifo(dst):
    model = copy_fixture(VGG, dst)
    (model / "saved_model.pb").unlink()
    os.mkfifo(model / "saved_model.pb")
    return model


def _pb_directory(dst):
    model = copy_fixture(VGG, dst)
    (model / "saved_model.pb").unlink()
    (model / "saved_model.pb").mkdir()
    return model


def _cycle(meta):
    body = serving_body(meta)
    convs = [n for n in body.node_def if n.op == "Conv2D"]
    relus = [n for n in body.node_def if n.op == "Relu"]
    convs[0].input[0] = f"{relus[1].name}:activations:0"  # conv1 reads conv2's relu: a cycle


def _dangling_function(meta):
    node = next(n for n in serving_body(meta).node_def if n.op == "Conv2D")
    node.input[0] = "nosuch_node:output:0"


def _dangling_outer(meta):
    call = next(n for n in meta.graph_def.node if n.name == "StatefulPartitionedCall_1")
    call.input[0] = "ghost_tensor:0"


def _duplicate_outer(meta):
    meta.graph_def.node.append(meta.graph_def.node[0])


def _duplicate_function(meta):
    body = serving_body(meta)
    body.node_def.append(next(n for n in body.node_def if n.op == "Conv2D"))


def _signature_shape(dims):
    def fn(meta):
        sig = meta.signature_def["serving_default"]
        set_shape(sig.inputs["image"].tensor_shape, dims)
        ph = next(n for n in meta.graph_def.node if n.name == "serving_default_image")
        set_shape(ph.attr["shape"].shape, dims)
    return fn


def _huge_const(meta):
    import numpy as np
    import tensorflow as tf

    t = tf.make_tensor_proto(np.float32(1.0))
    set_shape(t.tensor_shape, [2**40])  # a splat: one value, 2**40 elements declared
    serving_body(meta).node_def.append(node_def("huge_splat", "Const", dtype=attr(type=1), value=attr(tensor=t)))


def _overfull_const(meta):
    import numpy as np
    import tensorflow as tf

    t = tf.make_tensor_proto(np.array([1, 2], np.int32))
    t.ClearField("tensor_content")
    t.int_val.extend([1, 2, 3, 4, 5])  # five values for two elements (found by the fuzzer)
    serving_body(meta).node_def.append(node_def("overfull", "Const", dtype=attr(type=3), value=attr(tensor=t)))


def _served_variable(meta):
    """The VarHandleOp of the first variable the serving signature's call captures."""
    call = next(n for n in meta.graph_def.node if n.name == "StatefulPartitionedCall_1")
    names = {i.split(":")[0] for i in call.input}
    return next(n for n in meta.graph_def.node if n.op == "VarHandleOp" and n.name in names)


def _variable_shape_huge(meta):
    var = _served_variable(meta)
    set_shape(var.attr["shape"].shape, [2**40])


def _variable_dtype(meta):
    var = _served_variable(meta)
    var.attr["dtype"].type = 2  # DT_DOUBLE; the checkpoint holds float32


def _recursive(meta):
    add_function(meta, "ping_fn", [], calls=["pong_fn"])
    add_function(meta, "pong_fn", [], calls=["ping_fn"])
    call_from_body(meta, "ping_fn")


def _self_recursive(meta):
    add_function(meta, "loop_fn", [], calls=["loop_fn"])
    call_from_body(meta, "loop_fn")


def _exploding(meta):
    depth = 40
    for i in range(depth):
        callee = [f"fan_{i + 1}"] * 2 if i + 1 < depth else []
        add_function(meta, f"fan_{i}", [node_def("c", "Const", dtype=attr(type=1),
                                                 value=attr(tensor=_scalar()))], calls=callee)
    call_from_body(meta, "fan_0")


def _scalar():
    import numpy as np
    import tensorflow as tf

    return tf.make_tensor_proto(np.float32(0))


def _sig_output_missing(meta):
    meta.signature_def["serving_default"].outputs["output_0"].name = "nope_tensor:0"


def _sig_input_missing(meta):
    meta.signature_def["serving_default"].inputs["image"].name = "no_such_input:0"


def _sig_wrong_dtype(meta):
    meta.signature_def["serving_default"].inputs["image"].dtype = 3  # DT_INT32; the Placeholder is float


def _sig_invalid_dtype(meta):
    meta.signature_def["serving_default"].inputs["image"].dtype = 999


def _unknown_op(meta):
    node = next(n for n in serving_body(meta).node_def if n.op == "Relu")
    node.op = "NoSuchOpAnywhere"


def _call_arity(meta):
    call = next(n for n in meta.graph_def.node if n.name == "StatefulPartitionedCall_1")
    del call.input[1]


def _huge_number_attr(meta):
    body = serving_body(meta)
    node = node_def("unpack_bomb", "Unpack", [f"{body.signature.input_arg[0].name}"],
                    T=attr(type=1), num=attr(i=2**40), axis=attr(i=0))
    body.node_def.append(node)


def _bound_input_negative(meta):
    for cf in meta.object_graph_def.concrete_functions.values():
        if cf.bound_inputs:
            cf.bound_inputs[0] = -1


def _missing_data_file(dst):
    model = copy_fixture(VGG, dst)
    for f in (model / "variables").glob("variables.data-*"):
        f.unlink()
    return model


def _empty_index(dst):
    model = copy_fixture(VGG, dst)
    (model / "variables" / "variables.index").write_bytes(b"")
    return model


def _garbage_index(dst):
    model = copy_fixture(VGG, dst)
    (model / "variables" / "variables.index").write_bytes(random.Random(1).randbytes(2048))
    return model


def _data_bitflip(dst):
    model = copy_fixture(VGG, dst)
    data = next((model / "variables").glob("variables.data-*"))
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] ^= 0x5A
    data.write_bytes(bytes(raw))
    return model


def _forged_huge_checkpoint(dst):
    """A TF1 model whose checkpoint *claims* an 8 GB bias (a slice of it, 4 bytes, is all the data)
    and whose graph agrees: reading it blindly would allocate 8 GB."""
    import numpy as np

    model = copy_fixture(TF1, dst)
    values = checkpoint_values(model)
    values["dense_1/bias"] = np.zeros([1], np.float32)
    rewrite_checkpoint(model, values, slices={"dense_1/bias": "2000000000 0,1"})
    sm = read_saved_model(model)
    var = next(n for n in sm.meta_graphs[0].graph_def.node if n.name == "dense_1/bias")
    set_shape(var.attr["shape"].shape, [2000000000])
    write_saved_model(model, sm)
    return model


def _weights_contradict_ops(dst):
    """dense_1/kernel is (4, 16) in the checkpoint and in the variable, but MatMul reads x[:, 5]."""
    import numpy as np

    model = copy_fixture(TF1, dst)
    values = checkpoint_values(model)
    k = values["dense_1/kernel"]
    values["dense_1/kernel"] = np.ascontiguousarray(k[:-1])
    rewrite_checkpoint(model, values)
    sm = read_saved_model(model)
    var = next(n for n in sm.meta_graphs[0].graph_def.node if n.name == "dense_1/kernel")
    set_shape(var.attr["shape"].shape, list(values["dense_1/kernel"].shape))
    write_saved_model(model, sm)
    return model


def _tf1_checkpoint_in_tf2(dst):
    model = copy_fixture(VGG, dst)
    shutil.rmtree(model / "variables")
    shutil.copytree(fixture_path(TF1) / "variables", model / "variables")
    return model


def _variables_symlink_loop(dst):
    model = copy_fixture(VGG, dst)
    idx = model / "variables" / "variables.index"
    idx.unlink()
    os.symlink(idx, idx)  # points at itself
    return model


def _frozen_edit(fn):
    def build(dst):
        from tensorflow.core.framework import graph_pb2

        f = copy_fixture(FROZEN, dst)
        gd = graph_pb2.GraphDef()
        gd.ParseFromString(f.read_bytes())
        fn(gd)
        f.write_bytes(gd.SerializeToString())
        return f
    return build


def _frozen_cycle(gd):
    nodes = [n for n in gd.node if n.op in ("Conv2D", "Relu")]
    nodes[0].input[0] = nodes[-1].name


def _frozen_dangling(gd):
    next(n for n in gd.node if n.op == "Conv2D").input[0] = "nowhere"


def _frozen_port_overflow(gd):
    # an output index past int32 makes TensorFlow's importer crash the process (found by the fuzzer)
    conv = next(n for n in gd.node if n.op == "Conv2D")
    conv.input[0] = conv.input[0].split(":")[0] + ":2147483648"


def _frozen_duplicate(gd):
    gd.node.append(gd.node[-1])


def _frozen_huge_const(gd):
    import numpy as np
    import tensorflow as tf

    t = tf.make_tensor_proto(np.float32(1.0))
    set_shape(t.tensor_shape, [2**20, 2**20])
    gd.node.append(node_def("splat", "Const", dtype=attr(type=1), value=attr(tensor=t)))


def _frozen_const_dtype_mismatch(gd):
    """Found by the fuzzer: a Const feeding StridedSlice whose value is bool while its dtype attr
    says int32 made TensorFlow's shape inference abort the process (Check failed in tensor.cc)."""
    slice_node = next(n for n in gd.node if n.op == "StridedSlice")
    begin = next(n for n in gd.node if n.name == slice_node.input[1].split(":")[0])
    begin.attr["value"].tensor.dtype = 10  # DT_BOOL


def _frozen_truncated(dst):
    f = copy_fixture(FROZEN, dst)
    f.write_bytes(f.read_bytes()[:2000])
    return f


BAD_INPUTS = [
    Case("pb_truncated_10", _truncate(0.10), ("saved_model.pb",)),
    Case("pb_truncated_50", _truncate(0.50), ("saved_model.pb",)),
    Case("pb_truncated_99", _truncate(0.99), ("saved_model.pb",)),
    Case("pb_fifo", _pb_fifo, ("not a regular file",)),
    Case("pb_directory", _pb_directory, ("not a regular file",)),
    Case("graph_cycle", edit(VGG, _cycle), ("cycle",)),
    Case("dangling_input_in_function", edit(VGG, _dangling_function), ("nosuch_node",)),
    Case("dangling_input_outer", edit(VGG, _dangling_outer), ("ghost_tensor",)),
    Case("duplicate_node_outer", edit(VGG, _duplicate_outer), ("two nodes",)),
    Case("duplicate_node_in_function", edit(VGG, _duplicate_function), ("two nodes",)),
    Case("negative_shape", edit(VGG, _signature_shape([-1, 8, -5, 1])), ("-5",)),
    Case("rank_300", edit(VGG, _signature_shape([1] * 300)), ("rank 300",)),
    Case("huge_placeholder_2_40", edit(VGG, _signature_shape([2**40, 8, 8, 1])), (), may_load=True),
    Case("huge_const_splat", edit(VGG, _huge_const), ("huge_splat", "declares a constant")),
    Case("const_more_values_than_elements", edit(VGG, _overfull_const), ("overfull", "5 values")),
    Case("variable_shape_2_40", edit(VGG, _variable_shape_huge), ("1099511627776",)),
    Case("variable_dtype_mismatch", edit(VGG, _variable_dtype), ("float64",)),
    Case("forged_huge_checkpoint", _forged_huge_checkpoint, ("dense_1/bias", "claims")),
    Case("mutually_recursive_functions", edit(VGG, _recursive), ("calls itself", "ping_fn")),
    Case("self_recursive_function", edit(VGG, _self_recursive), ("calls itself", "loop_fn")),
    Case("exploding_function_calls", edit(VGG, _exploding), ("more than",)),
    Case("signature_output_missing", edit(VGG, _sig_output_missing), ("nope_tensor",)),
    Case("signature_input_missing", edit(VGG, _sig_input_missing), ("no_such_input",)),
    Case("signature_wrong_dtype", edit(VGG, _sig_wrong_dtype), ("int32", "float32")),
    Case("signature_invalid_dtype", edit(VGG, _sig_invalid_dtype), ("invalid dtype",)),
    Case("unknown_op", edit(VGG, _unknown_op), ("NoSuchOpAnywhere",)),
    Case("call_arity", edit(VGG, _call_arity), ("StatefulPartitionedCall_1",)),
    Case("huge_number_attr", edit(VGG, _huge_number_attr), ("unpack_bomb",)),
    Case("bound_input_negative", edit(VGG, _bound_input_negative), ()),
    Case("variables_data_missing", _missing_data_file, ("variables",)),
    Case("variables_index_empty", _empty_index, ("variables",)),
    Case("variables_index_garbage", _garbage_index, ("variables",)),
    Case("variables_data_bitflip", _data_bitflip, ("variables",)),
    Case("weights_contradict_ops", _weights_contradict_ops, ("MatMul",)),
    Case("tf1_checkpoint_in_tf2_model", _tf1_checkpoint_in_tf2, ("variables",)),
    Case("variables_symlink_loop", _variables_symlink_loop, ("variables",)),
    Case("frozen_cycle", _frozen_edit(_frozen_cycle), ("cycle",)),
    Case("frozen_output_index_overflow", _frozen_edit(_frozen_port_overflow), ("2147483648", "out of range")),
    Case("frozen_dangling", _frozen_edit(_frozen_dangling), ("nowhere",)),
    Case("frozen_duplicate", _frozen_edit(_frozen_duplicate), ("two nodes",)),
    Case("frozen_huge_const", _frozen_edit(_frozen_huge_const), ("splat", "declares a constant")),
    Case("frozen_truncated", _frozen_truncated, ("frozen_vgg.pb",)),
    Case("frozen_const_dtype_mismatch", _frozen_edit(_frozen_const_dtype_mismatch),
         ("declares dtype int32 but its value is bool",), in_process=False),
]


def bit_flipped(seed: int) -> Case:
    """vgg_digits with 1-8 random bits of saved_model.pb flipped: a clear error, or a model that
    loads and computes what the flipped model computes."""
    def build(dst):
        model = copy_fixture(VGG, dst)
        pb = model / "saved_model.pb"
        raw = bytearray(pb.read_bytes())
        rng = random.Random(seed)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(raw))
            raw[i] ^= 1 << rng.randrange(8)
        pb.write_bytes(bytes(raw))
        return model
    return Case(f"bit_flip_{seed}", build, (), may_load=True)


# ------------------------------------------------------------------------------------ dangerous models
def _inject_function(op, **attrs):
    def fn(meta):
        inputs = []
        nodes = [string_const("path", b"/etc/passwd")]
        if op in ("ReadFile", "MatchingFiles"):
            inputs = ["path:output:0"]
        elif op == "WriteFile":
            nodes.append(string_const("contents", b"owned"))
            inputs = ["path:output:0", "contents:output:0"]
        nodes.append(node_def("evil", op, inputs, **attrs))
        add_function(meta, "__inference_evil_helper_1", nodes)
    return fn


def _nested_function(meta):
    import tensorflow as tf

    add_function(meta, "__inference_inner_2", [string_const("path", b"/tmp/x"),
                                                node_def("py", "EagerPyFunc", ["path:output:0"],
                                                         token=attr(s=b"pyfunc_0"),
                                                         Tin=attr(list=_type_list(tf.string)),
                                                         Tout=attr(list=_type_list()))])
    add_function(meta, "__inference_outer_1", [], calls=["__inference_inner_2"])


def _in_serving_body(op, name="evil", **attrs):
    def fn(meta):
        body = serving_body(meta)
        body.node_def.append(string_const("evil_path", b"/etc/passwd"))
        body.node_def.append(node_def(name, op, ["evil_path:output:0"], **attrs))
    return fn


def _outer_node(meta):
    meta.graph_def.node.append(string_const("evil_path", b"/tmp/owned"))
    meta.graph_def.node.append(string_const("evil_contents", b"x"))
    meta.graph_def.node.append(node_def("evil_write", "WriteFile", ["evil_path", "evil_contents"]))


def _save_in_serving_body(meta):
    import tensorflow as tf

    body = serving_body(meta)
    body.node_def.append(string_const("ckpt_prefix", b"/tmp/stolen"))
    body.node_def.append(string_const("ckpt_names", b"x"))
    body.node_def.append(node_def("sneaky_save", "SaveV2",
                                  ["ckpt_prefix:output:0", "ckpt_names:output:0", "ckpt_names:output:0",
                                   "ckpt_names:output:0"],
                                  dtypes=attr(list=_type_list(tf.string))))


def _serving_calls_saver(meta):
    saver = function(meta, "__inference__traced_save_")
    call_from_body(meta, saver.signature.name)


def _tf1_save_outside(meta):
    import tensorflow as tf

    meta.graph_def.node.append(string_const("rogue/prefix", b"/tmp/rogue"))
    meta.graph_def.node.append(string_const("rogue/names", b"x"))
    meta.graph_def.node.append(node_def("rogue/SaveV2", "SaveV2",
                                        ["rogue/prefix", "rogue/names", "rogue/names", "rogue/names"],
                                        dtypes=attr(list=_type_list(tf.string))))


def _tf1_saver_feeds_serving(meta):
    """The signature's output depends (by a control edge) on the TF1 restore op: the RestoreV2 is
    reachable from serving, so it is no longer pure checkpoint machinery."""
    out = next(n for n in meta.graph_def.node if n.name == "scores")
    out.input.append("^save/RestoreV2")


def _variables_symlink_out(dst):
    model = copy_fixture(VGG, dst)
    outside = dst / "elsewhere_variables"
    shutil.move(model / "variables", outside)
    os.symlink(outside, model / "variables")
    return model


def _asset_symlink_out(dst):
    model = copy_fixture(VGG, dst)
    (model / "assets" / "labels.txt").unlink()
    os.symlink("/etc/passwd", model / "assets" / "labels.txt")
    return model


def _asset_name_escapes(meta):
    meta.asset_file_def[0].filename = "../../../etc/passwd"


def _asset_fifo(dst):
    model = copy_fixture(VGG, dst)
    os.mkfifo(model / "assets" / "pipe")
    return model


def _frozen_pyfunc(gd):
    gd.node.append(string_const("py_arg", b"x"))
    gd.node.append(node_def("frozen_py", "PyFunc", ["py_arg"], token=attr(s=b"pyfunc_1")))


DANGEROUS = [
    Case("read_file_in_unreachable_function", edit(VGG, _inject_function("ReadFile")),
         ("ReadFile", "__inference_evil_helper_1", "--allow-ops ReadFile")),
    Case("write_file_in_unreachable_function", edit(VGG, _inject_function("WriteFile")),
         ("WriteFile", "__inference_evil_helper_1")),
    Case("matching_files", edit(VGG, _inject_function("MatchingFiles")), ("MatchingFiles",)),
    Case("pyfunc_in_nested_function", edit(VGG, _nested_function), ("EagerPyFunc", "__inference_inner_2")),
    Case("pyfunc_in_serving_body", edit(VGG, _in_serving_body("PyFunc", token=attr(s=b"pyfunc_0"))),
         ("PyFunc",)),
    Case("dataset_op", edit(VGG, _in_serving_body("TFRecordDataset", name="records")),
         ("TFRecordDataset", "records")),
    Case("immutable_const", edit(VGG, _inject_function("ImmutableConst")), ("ImmutableConst",)),
    Case("print_to_file", edit(VGG, _in_serving_body("PrintV2", name="leak",
                                                     output_stream=attr(s=b"file:///tmp/leak.txt"))),
         ("PrintV2", "file:///tmp/leak.txt")),
    Case("debug_identity", edit(VGG, _in_serving_body("DebugIdentityV2", name="dbg")), ("DebugIdentityV2",)),
    Case("write_file_outer_graph", edit(VGG, _outer_node), ("WriteFile", "evil_write", "in the graph")),
    Case("save_v2_in_serving_body", edit(VGG, _save_in_serving_body), ("SaveV2", "sneaky_save")),
    Case("serving_calls_traced_save", edit(VGG, _serving_calls_saver), ("SaveV2", "__inference__traced_save_")),
    Case("tf1_save_outside_saver", edit(TF1, _tf1_save_outside), ("SaveV2", "rogue/SaveV2")),
    Case("tf1_restore_feeds_serving", edit(TF1, _tf1_saver_feeds_serving), ("RestoreV2", "save/RestoreV2")),
    Case("variables_symlink_out", _variables_symlink_out, ("variables", "outside the model directory")),
    Case("asset_symlink_out", _asset_symlink_out, ("labels.txt", "outside the model directory")),
    Case("asset_name_escapes", edit(VGG, _asset_name_escapes), ("../../../etc/passwd",)),
    Case("asset_fifo", _asset_fifo, ("pipe", "not a regular file")),
    Case("frozen_pyfunc", _frozen_edit(_frozen_pyfunc), ("PyFunc", "frozen_py")),
]


def build_all(out: Path, cases) -> dict:
    """Build every case under ``out/<name>/``; returns name → model path."""
    paths = {}
    for case in cases:
        d = out / case.name
        d.mkdir(parents=True)
        paths[case.name] = case.build(d)
    return paths


# ------------------------------------------------------------------------------------ checkpoint tables
# variables.index is a table in TensorFlow's format (leveldb's): data blocks of prefix-compressed entries
# with restart points, each followed by a trailer (compression type, masked CRC32C); an index block
# mapping each data block's last key to its handle; an empty metaindex block; a 48-byte footer (two
# handles, the magic). The keys are checkpoint keys, the values BundleEntryProtos (the empty key: the
# BundleHeaderProto). Used by benchmarks/fuzz.py (ckptindex) and by the reproducers in attacks.py.
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TensorFlow's tables and checkpoints use it."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """The CRC-32C of ``data`` masked as leveldb stores it (block trailers, BundleEntryProto.crc32c)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_table(raw: bytes, verify: bool = False) -> tuple[list, list]:
    """(entries [(key, value)], blocks [(offset, size)] of data, index and metaindex) of a table;
    ``verify``: block checksums too (ValueError when one is wrong)."""
    footer = raw[-_FOOTER:]
    if len(raw) < _FOOTER or int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
        raise ValueError("not a table")

    def block(off, size):
        if off + size + 5 > len(raw):
            raise ValueError("block out of range")
        stored = int.from_bytes(raw[off + size + 1:off + size + 5], "little")
        if verify and masked_crc(raw[off:off + size + 1]) != stored:
            raise ValueError("bad block checksum")
        return raw[off:off + size]

    meta_off, pos = read_varint(footer, 0)
    meta_size, pos = read_varint(footer, pos)
    index_off, pos = read_varint(footer, pos)
    index_size, pos = read_varint(footer, pos)
    entries, blocks = [], [(meta_off, meta_size), (index_off, index_size)]
    for _, handle in block_entries(block(index_off, index_size)):
        off, p = read_varint(handle, 0)
        size, _ = read_varint(handle, p)
        blocks.append((off, size))
        entries.extend(block_entries(block(off, size)))
    return entries, blocks


def _block(entries, restart: int) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        prev = key
    restarts = restarts or [0]
    for r in restarts:
        out += r.to_bytes(4, "little")
    out += len(restarts).to_bytes(4, "little")
    return bytes(out)


def write_table(entries, per_block: int = 16, restart: int = 16, bad_crc: int = -1) -> bytes:
    """A table of ``entries`` in the given order (unsorted or duplicate keys stay so); block number
    ``bad_crc`` gets a wrong checksum."""
    out = bytearray()
    count = [0]

    def put(contents: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(contents))
        crc = masked_crc(contents + b"\x00")
        if count[0] == bad_crc:
            crc ^= 0x5A5A
        count[0] += 1
        out.extend(contents + b"\x00" + crc.to_bytes(4, "little"))
        return handle

    index = []
    for i in range(0, len(entries), max(1, per_block)):
        chunk = entries[i:i + max(1, per_block)]
        index.append((chunk[-1][0], put(_block(chunk, restart))))
    meta = put(_block([], restart))
    idx = put(_block(index, 1))
    footer = (meta + idx).ljust(_FOOTER - 8, b"\x00") + _TABLE_MAGIC.to_bytes(8, "little")
    return bytes(out + footer)


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for name, path in build_all(root, BAD_INPUTS + DANGEROUS).items():
        print(name, path)
    from tests.hardening import attacks  # issue 13's attacks (their markers and secrets in attacks/outside)

    for name, (_, path) in attacks.build_cases(root / "attacks", root / "attacks" / "outside").items():
        print(name, path)
