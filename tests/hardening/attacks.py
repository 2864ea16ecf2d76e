"""Attack models of issue 13: one builder per attack class, each a :class:`~corpus.Case`.

A SavedModel is a program. Every model here is built to do harm when something runs it: write or read a
file outside the model, never end, crash or end the process, exhaust memory while graphslim parses it,
or forge lines on the user's terminal. The last ones reproduce crashes the fuzzers found
(``benchmarks/fuzz.py``). ``tests/hardening/test_attacks.py`` holds graphslim to its contract on each (a
clean refusal, or a contained failure naming the op or the signal; nothing written or read outside the
model; the input unchanged).

Every builder takes the *marker* path it would write (or the secret file it would read) as a
parameter, so a test can point it at a temporary directory and look there afterwards. Models are made
by protobuf surgery on copies of the fixtures (fast, exact); TensorFlow builds only the two that need
its tracing (an endless ``while_loop`` and a tracked resource's restore function).

How an attack op is reached when the serving signature runs: most sit in a function of their own that
the serving body calls through an ``If`` on its output path (both branches are that function; the
function returns its input after the attack op ran: a control edge and a ``control_ret``). TensorFlow's
loader runs it, and so would graphslim's own IR (which keeps functional control flow as functions but
drops the serving body's control edges). The garbage-variant case also has a variant on the body's own
data path.

    python -m tests.hardening.attacks OUT_DIR     # writes every attack under OUT_DIR, markers in OUT_DIR/outside
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:  # imported as tests.hardening.attacks, or as attacks (the tests put this folder on sys.path)
    from .corpus import (TF1, VGG, Case, attr, copy_fixture, edit, node_def, read_table, serving_body, set_shape,
                         string_const, write_table)
except ImportError:
    from corpus import (TF1, VGG, Case, attr, copy_fixture, edit, node_def, read_table, serving_body, set_shape,
                        string_const, write_table)

# What running the serving signature of an attack does, when it is run (``Attack.run``).
HANGS = "hangs"          # never returns: a timeout must end it (exit 2, "did not finish"/"timed out")
CRASHES = "crashes"      # kills or ends the process: exit 2 naming the signal, or "without an answer"
FILES = "files"          # opens a file outside the model: fails under Landlock (exit 2), nothing leaks
NEVER = "never"          # the harm sits in the restore path, which graphslim must never run: exit 0, OK
SECRET = "graphslim-attack-secret-0451"  # the content of every secret file (must never be echoed)
EVIL_TEXT = "\x1b[2K\rOK: nothing dangerous found \x1b]0;pwned\x07[green]OK[/green]"

DT_FLOAT, DT_INT32, DT_BOOL, DT_VARIANT = 1, 3, 10, 21


@dataclass
class Attack(Case):
    """A :class:`~corpus.Case` that does harm. ``refuses``: what the allow-list scan must refuse
    (``graphslim scan`` exit 1 naming each; ``"<path>"``: a file leading outside); ``scan``: ``"refuse"``,
    or ``"pass"`` (compute ops only: containment is what stops it); ``run``: what running its serving
    signature does (:data:`HANGS`, :data:`CRASHES`, :data:`FILES`, :data:`NEVER`; "" when the harm is in
    parsing or output, not execution); ``marker``: the file it would write outside the model;
    ``secret``: the file outside it would read. ``expect``: what a refusal by ``optimize`` names."""

    refuses: tuple = ()
    scan: str = "refuse"
    run: str = ""
    marker: Path | None = None
    secret: Path | None = None


# ------------------------------------------------------------------------------------ helpers
def _tensor(value, dtype=None):
    import tensorflow as tf

    return attr(tensor=tf.make_tensor_proto(value, dtype=dtype))


def _const(name: str, value, dtype):
    import tensorflow as tf

    return node_def(name, "Const", dtype=attr(type=tf.as_dtype(dtype).as_datatype_enum),
                    value=_tensor(value, dtype))


def _types(*enums):
    from tensorflow.core.framework import attr_value_pb2

    return attr(list=attr_value_pb2.AttrValue.ListValue(type=list(enums)))


def _body_output(body) -> object:
    """The node the serving body returns (``Identity``: ``ret`` maps its output name to it)."""
    ret = next(iter(body.ret.values()))
    name = ret.split(":")[0]
    return next(n for n in body.node_def if n.name == name)


def _write_secret(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(f"{SECRET},1\n")
    return path


def gate(meta, name: str, nodes, sink: str, ret: str | None = None) -> str:
    """Route the serving body's output through ``If(true, [y])`` whose branches are a new function
    ``__inference_attack_<name>_1(x) -> y`` holding ``nodes``: it returns ``ret`` (default: ``x``)
    after node ``sink`` ran (a control edge and a ``control_ret``). Returns the function's name."""
    from tensorflow.core.framework import function_pb2

    fname = f"__inference_attack_{name}_1"
    f = function_pb2.FunctionDef()
    f.signature.name = fname
    f.signature.is_stateful = True
    f.signature.input_arg.add(name="x", type=DT_FLOAT)
    f.signature.output_arg.add(name="y", type=DT_FLOAT)
    f.signature.control_output.append(sink)
    f.node_def.extend(nodes)
    f.node_def.append(node_def("passthrough", "Identity", [ret or "x", f"^{sink}"], T=attr(type=DT_FLOAT)))
    f.ret["y"] = "passthrough:output:0"
    f.control_ret[sink] = sink
    meta.graph_def.library.function.append(f)

    body = serving_body(meta)
    out = _body_output(body)
    body.node_def.append(_const("attack_cond", True, "bool"))
    branch = attr()
    branch.func.name = fname
    body.node_def.append(node_def("attack_gate", "If", ["attack_cond:output:0", out.input[0]],
                                  Tcond=attr(type=DT_BOOL), Tin=_types(DT_FLOAT), Tout=_types(DT_FLOAT),
                                  then_branch=branch, else_branch=branch))
    out.input[0] = "attack_gate:output:0"
    return fname


def gated(name: str, nodes: Callable[[], tuple], fixture: str = VGG) -> Callable[[Path], Path]:
    """A builder: ``fixture`` with ``gate(meta, name, *nodes())`` (``nodes()`` returns
    ``(node_defs, sink)`` or ``(node_defs, sink, ret)``)."""
    return edit(fixture, lambda meta: gate(meta, name, *nodes()))


def _variant_garbage(name: str):
    """A DT_VARIANT constant claiming to be a TensorList, with garbage metadata (TensorFlow decodes
    it without checking, then dereferences what it decoded)."""
    from tensorflow.core.framework import tensor_pb2

    t = tensor_pb2.TensorProto(dtype=DT_VARIANT)
    t.tensor_shape.SetInParent()
    v = t.variant_val.add(type_name="tensorflow::TensorList", metadata=b"\xff" * 16)
    v.tensors.add(dtype=DT_INT32).tensor_shape.dim.add(size=-7)
    return node_def(name, "Const", dtype=attr(type=DT_VARIANT), value=attr(tensor=t))


# ------------------------------------------------------------------------------------ the restore path
def tf1_restore_saves(marker: Path) -> Callable[[Path], Path]:
    """tf1_model with a ``SaveV2`` writing the checkpoint ``marker`` (``marker.index``, ``.data-*``)
    wired into ``save/restore_all``'s control inputs: TensorFlow's TF1 loader runs it while restoring
    the variables. graphslim must never run the input's restore path: ``verify``/``bench`` run its own
    IR (weights from the checkpoint reader) and succeed, and nothing appears at ``marker``."""
    def fn(meta):
        g = meta.graph_def
        g.node.extend([
            string_const("attack/prefix", str(marker).encode()),
            _const("attack/names", ["dense_1/bias"], "string"),
            _const("attack/slices", [""], "string"),
            node_def("attack/SaveV2", "SaveV2", ["attack/prefix", "attack/names", "attack/slices", "dense_1/bias"],
                     dtypes=_types(DT_FLOAT)),
        ])
        restore = next(n for n in g.node if n.name == "save/restore_all")
        restore.input.append("^attack/SaveV2")
    return edit(TF1, fn)


def tf2_restore_fn_saves(marker: Path) -> Callable[[Path], Path]:
    """A tf.Module (signature ``y = x * w``) tracking a resource whose *restore function* (a traced
    ``_restore_from_tensors``, stored as the object graph's saveable restore function) holds a
    ``SaveV2`` writing the checkpoint ``marker``: ``tf.saved_model.load`` runs it. Built with
    TensorFlow. graphslim must never run it (``verify`` exit 0, no marker)."""
    def build(dst: Path) -> Path:
        import tensorflow as tf
        from tensorflow.python.trackable import autotrackable

        class Sneaky(autotrackable.AutoTrackable):
            def _serialize_to_tensors(self):
                return {"value": tf.constant(1.0)}

            def _restore_from_tensors(self, restored_tensors):
                return tf.raw_ops.SaveV2(prefix=str(marker), tensor_names=["value"], shape_and_slices=[""],
                                         tensors=[restored_tensors["value"]])

        class Model(tf.Module):
            def __init__(self):
                super().__init__()
                self.sneaky = Sneaky()
                self.w = tf.Variable([[1.0, 2.0, 3.0]], name="w")

            @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
            def __call__(self, x):
                return {"y": x * self.w}

        m = Model()
        path = dst / "tf2_restore_fn"
        tf.saved_model.save(m, str(path), signatures={"serving_default": m.__call__})
        return path
    return build


def restore_reads_elsewhere(fixture: str, stolen: Path) -> Callable[[Path], Path]:
    """``fixture`` whose saver's restore op reads the checkpoint ``stolen`` (a copy of the model's own,
    written outside the model, so that restoring from it succeeds) instead of the file name TensorFlow's
    loader feeds it: in ``tf1_model`` ``save/RestoreV2``'s prefix is a constant of the outer graph; in
    ``vgg_digits`` the ``RestoreV2`` of ``__inference__traced_restore_N`` reads a constant of the function
    instead of its ``file_prefix`` argument. TensorFlow's loader would restore the weights from a file
    outside the model (any checkpoint the process can read). The scan refuses the restore op, naming node
    and function; accepted with ``--allow-ops``, graphslim never runs it (``verify`` exit 0, the model's
    own weights)."""
    def fn(meta):
        prefix = str(stolen).encode()
        if fixture == TF1:
            meta.graph_def.node.append(string_const("attack/prefix", prefix))
            restore = next(n for n in meta.graph_def.node if n.name == "save/RestoreV2")
            restore.input[0] = "attack/prefix"
            return
        body = next(f for f in meta.graph_def.library.function
                    if f.signature.name.startswith("__inference__traced_restore_"))
        body.node_def.append(string_const("attack_prefix", prefix))
        restore = next(n for n in body.node_def if n.op == "RestoreV2")
        restore.input[0] = "attack_prefix:output:0"

    def build(dst: Path) -> Path:
        model = edit(fixture, fn)(dst)
        stolen.parent.mkdir(parents=True, exist_ok=True)
        for src in (model / "variables").iterdir():  # variables.index -> <stolen>.index, .data-* alike
            shutil.copy(src, stolen.parent / src.name.replace("variables", stolen.name, 1))
        return model
    return build


# ------------------------------------------------------------------------------------ files
def dump_tensor(marker: Path) -> Callable[[Path], Path]:
    """``DumpTensor`` (the quantizer's calibration op) writing the signature's output to
    ``marker.parent/marker.name``. The allow-list refuses it by name; accepted with ``--allow-ops``, the
    run fails under Landlock and nothing appears outside."""
    def nodes():
        return [node_def("dump", "DumpTensor", ["x"], T=attr(type=DT_FLOAT),
                         log_dir_path=attr(s=str(marker.parent).encode()), file_name=attr(s=marker.name.encode()),
                         enabled=attr(b=True), func_name=attr(s=b"f"), node_name=attr(s=b"n"))], "dump"
    return gated("dump_tensor", nodes)


def unigram_vocab(secret: Path) -> Callable[[Path], Path]:
    """``FixedUnigramCandidateSampler`` whose ``vocab_file`` is ``secret``, outside the model (read when
    the kernel is built, its content could end up in an error message). Refused by name; accepted, the
    read fails under Landlock and the content is echoed nowhere."""
    def build(dst: Path) -> Path:
        _write_secret(secret)

        def nodes():
            return [
                _const("classes", [[0]], "int64"),
                node_def("sampler", "FixedUnigramCandidateSampler", ["classes:output:0"], num_true=attr(i=1),
                         num_sampled=attr(i=1), unique=attr(b=False), range_max=attr(i=1),
                         vocab_file=attr(s=str(secret).encode()), distortion=attr(f=1.0),
                         num_reserved_ids=attr(i=0), num_shards=attr(i=1), shard=attr(i=0), seed=attr(i=1),
                         seed2=attr(i=1)),
            ], "sampler"
        return gated("unigram_vocab", nodes)(dst)
    return build


def record_input(secret: Path) -> Callable[[Path], Path]:
    """``RecordInput`` whose ``file_pattern`` is ``secret`` (a background reader of TFRecord files).
    Refused by name; accepted, it cannot open the file under Landlock."""
    def build(dst: Path) -> Path:
        _write_secret(secret)

        def nodes():
            return [node_def("records", "RecordInput", file_pattern=attr(s=str(secret).encode()),
                             batch_size=attr(i=1), file_parallelism=attr(i=1), file_buffer_size=attr(i=1),
                             file_random_seed=attr(i=1))], "records"
        return gated("record_input", nodes)(dst)
    return build


def read_write_file(marker: Path, secret: Path) -> Callable[[Path], Path]:
    """``ReadFile`` of ``secret`` and ``WriteFile`` of its content to ``marker``, both outside the
    model, on the serving path: the Landlock test. With ``--allow-ops ReadFile,WriteFile`` the run must
    fail to open the files (exit 2), ``marker`` must not appear and the secret must not be echoed."""
    def build(dst: Path) -> Path:
        _write_secret(secret)

        def nodes():
            return [string_const("secret_path", str(secret).encode()),
                    string_const("marker_path", str(marker).encode()),
                    node_def("read", "ReadFile", ["secret_path:output:0"]),
                    node_def("write", "WriteFile", ["marker_path:output:0", "read:contents:0"])], "write"
        return gated("read_write_file", nodes)(dst)
    return build


# ------------------------------------------------------------------------------------ never ends
def mutex_deadlock() -> Callable[[Path], Path]:
    """Two ``MutexLock`` of one ``MutexV2``: the second waits for the first lock, which is released
    only by a ``ConsumeMutexLock`` that waits for the second: a deadlock. Refused by name; accepted,
    the run is killed at the timeout."""
    def nodes():
        return [node_def("mutex", "MutexV2", shared_name=attr(s=b"attack_mutex")),
                node_def("lock1", "MutexLock", ["mutex:resource:0"]),
                node_def("lock2", "MutexLock", ["mutex:resource:0", "^lock1"]),
                node_def("consume", "ConsumeMutexLock", ["lock1:mutex_lock:0", "^lock2"])], "consume"
    return gated("mutex_deadlock", nodes)


def queue_past_capacity() -> Callable[[Path], Path]:
    """A ``FIFOQueueV2`` of capacity 1 enqueued twice (``QueueEnqueueV2`` without a timeout): the
    second enqueue blocks forever. Refused by name; accepted, killed at the timeout."""
    def nodes():
        return [node_def("queue", "FIFOQueueV2", component_types=_types(DT_FLOAT), capacity=attr(i=1),
                         shared_name=attr(s=b"attack_queue")),
                node_def("enqueue1", "QueueEnqueueV2", ["queue:handle:0", "x"], Tcomponents=_types(DT_FLOAT),
                         timeout_ms=attr(i=-1)),
                node_def("enqueue2", "QueueEnqueueV2", ["queue:handle:0", "x", "^enqueue1"],
                         Tcomponents=_types(DT_FLOAT), timeout_ms=attr(i=-1))], "enqueue2"
    return gated("queue_past_capacity", nodes)


def stage_past_capacity() -> Callable[[Path], Path]:
    """Two ``Stage`` ops into one staging area of capacity 1: the second blocks forever. Refused by
    name; accepted, killed at the timeout."""
    def nodes():
        common = dict(dtypes=_types(DT_FLOAT), capacity=attr(i=1), memory_limit=attr(i=0),
                      shared_name=attr(s=b"attack_stage"))
        return [node_def("stage1", "Stage", ["x"], **common),
                node_def("stage2", "Stage", ["x", "^stage1"], **common)], "stage2"
    return gated("stage_past_capacity", nodes)


def long_sleep() -> Callable[[Path], Path]:
    """``SleepIdentityOp`` of 10^6 seconds on the output path. Refused by name; accepted, killed at
    the timeout."""
    def nodes():
        return [_const("seconds", 1_000_000, "int32"),
                node_def("sleep", "SleepIdentityOp", ["seconds:output:0", "x"], T=attr(type=DT_FLOAT))], \
            "sleep", "sleep:output:0"
    return gated("long_sleep", nodes)


def endless_while() -> Callable[[Path], Path]:
    """A tf.Module whose signature joins ``tf.while_loop(lambda i: True, ...)`` to its output (built
    with TensorFlow; only compute ops, so the scan passes it). ``verify``/``bench`` must end at the
    timeout (exit 2) and SIGTERM must end them within seconds."""
    def build(dst: Path) -> Path:
        import tensorflow as tf

        class Loop(tf.Module):
            @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
            def __call__(self, x):
                i = tf.while_loop(lambda i: tf.constant(True), lambda i: i + 1, [tf.constant(0)])
                return {"y": x + tf.cast(i, tf.float32) * 0.0}

        path = dst / "endless_while"
        m = Loop()
        tf.saved_model.save(m, str(path), signatures={"serving_default": m.__call__})
        return path
    return build


# ------------------------------------------------------------------------------------ ends the process
def abort(exit_without_error: bool) -> Callable[[Path], Path]:
    """``Abort`` on the serving path: with ``exit_without_error`` TensorFlow ends the process with
    exit status 0 (no verdict must never pass for success), else with SIGABRT. Refused by name;
    accepted, exit 2 naming the signal or the missing answer."""
    def nodes():
        return [node_def("abort", "Abort", error_msg=attr(s=b"attack"),
                         exit_without_error=attr(b=exit_without_error))], "abort"
    return gated(f"abort_{int(exit_without_error)}", nodes)


def variant_crash() -> Callable[[Path], Path]:
    """A garbage ``DT_VARIANT`` constant (claims to be a TensorList) read by ``TensorListLength``, in a
    function on the output path: TensorFlow segfaults running it. Compute ops only (the scan passes
    it); ``verify`` must end with exit 2 naming SIGSEGV."""
    def nodes():
        return [_variant_garbage("garbage"), *_zero_of_length("x")], "length", "joined:z:0"
    return gated("variant_crash", nodes)


def _zero_of_length(x: str) -> list:
    """``joined = x + float(min(TensorListLength(garbage), 0))``: the variant on ``x``'s data path (a
    control edge alone, or ``0 * length``, would let Grappler prune the stateless read)."""
    return [node_def("length", "TensorListLength", ["garbage:output:0"]),
            _const("zero", 0, "int32"),
            node_def("length_0", "Minimum", ["length:length:0", "zero:output:0"], T=attr(type=DT_INT32)),
            node_def("length_f", "Cast", ["length_0:z:0"], SrcT=attr(type=DT_INT32), DstT=attr(type=DT_FLOAT)),
            node_def("joined", "AddV2", [x, "length_f:y:0"], T=attr(type=DT_FLOAT))]


def variant_in_body(meta) -> None:
    """The same garbage variant on the serving body's own data path (graphslim's loader parses the
    constant): ``softmax + float(min(TensorListLength(garbage), 0))``."""
    body = serving_body(meta)
    out = _body_output(body)
    body.node_def.extend([_variant_garbage("garbage"), *_zero_of_length(out.input[0])])
    out.input[0] = "joined:z:0"


# ------------------------------------------------------------------------------------ parsing
def objgraph_cycles(n: int = 60_000) -> Callable[[Path], Path]:
    """vgg_digits whose object graph gains ``n`` objects in two cycles of ``n/2`` (each object's child
    is the next; the last's is the first), hung off the root, each cycle also reaching the other: a
    path-based walk is quadratic (5.6 GB after 120 s in issue 13). graphslim must load it in seconds."""
    def fn(meta):
        og = meta.object_graph_def
        base, half = len(og.nodes), n // 2
        heads = [base, base + half]
        for c, head in enumerate(heads):
            og.nodes[0].children.add(node_id=head, local_name=f"cycle_{c}")
        for i in range(n):
            c, k = divmod(i, half)
            obj = og.nodes.add()
            obj.user_object.identifier = "_generic_user_object"
            obj.user_object.version.producer = 1
            obj.user_object.version.min_consumer = 1
            obj.children.add(node_id=heads[c] + (k + 1) % half, local_name="next")
            if k == half // 2:
                obj.children.add(node_id=heads[1 - c], local_name="other")
    return edit(VGG, fn)


def broadcast_bomb() -> Callable[[Path], Path]:
    """vgg_digits with ``Mul(conv, Prod(a * b, [0, 1]))`` between its first Conv2D and BiasAdd:
    ``a`` is [2^17, 1, 16] (8 MiB declared, one value stored), ``b`` [1, 2^11, 16]; ``a * b`` broadcasts
    to [2^17, 2^11, 16]: 16 GiB in float32. fold-batchnorm folds a Mul by a constant into the conv and
    evaluates that constant: it must refuse with a clear error (memory budget) or succeed, never
    allocate it."""
    def fn(meta):
        import numpy as np
        import tensorflow as tf

        body = serving_body(meta)
        conv = next(n for n in body.node_def if n.op == "Conv2D")
        bias = next(n for n in body.node_def if n.op == "BiasAdd" and n.input[0].startswith(conv.name + ":"))

        def splat(name, shape):
            t = tf.make_tensor_proto(np.float32(1.0))
            set_shape(t.tensor_shape, shape)
            return node_def(name, "Const", dtype=attr(type=DT_FLOAT), value=attr(tensor=t))

        body.node_def.extend([
            splat("bcast_a", [2**17, 1, 16]),
            splat("bcast_b", [1, 2**11, 16]),
            node_def("bcast_ab", "Mul", ["bcast_a:output:0", "bcast_b:output:0"], T=attr(type=DT_FLOAT)),
            _const("bcast_axes", [0, 1], "int32"),
            node_def("bcast_scale", "Prod", ["bcast_ab:z:0", "bcast_axes:output:0"], T=attr(type=DT_FLOAT),
                     Tidx=attr(type=DT_INT32), keep_dims=attr(b=False)),
            node_def("bcast_mul", "Mul", [bias.input[0], "bcast_scale:output:0"], T=attr(type=DT_FLOAT)),
        ])
        bias.input[0] = "bcast_mul:z:0"
    return edit(VGG, fn)


# ------------------------------------------------------------------------------------ assets
def sparse_asset(size: int = 1 << 30) -> Callable[[Path], Path]:
    """vgg_digits whose labels asset is a sparse file of ``size`` bytes (no disk used): graphslim must
    refuse it by size (naming the file and ``--max-asset-mb``) rather than read and write it whole."""
    def build(dst: Path) -> Path:
        model = copy_fixture(VGG, dst)
        os.truncate(model / "assets" / "labels.txt", size)
        return model
    return build


def hardlink_asset(secret: Path) -> Callable[[Path], Path]:
    """vgg_digits whose labels asset is a hard link to ``secret``, a file outside the model (a hard
    link does not look like a link): graphslim must treat it like a symlink leaving the model and
    never copy the secret into its output."""
    def build(dst: Path) -> Path:
        model = copy_fixture(VGG, dst)
        _write_secret(secret)
        labels = model / "assets" / "labels.txt"
        labels.unlink()
        os.link(secret, labels)
        return model
    return build


# ------------------------------------------------------------------------------------ the terminal
def terminal_escapes(meta) -> None:
    """vgg_digits with model-chosen names holding ESC sequences, ``\\r``, an OSC title sequence with
    BEL, and rich markup ``[green]OK[/green]``: a refused ``ReadFile`` node and its function named so
    (they appear in ``scan``'s table and in the refusal), and the signature's output key (``inspect``
    prints it). Printed raw, they would erase the line and forge an "OK" verdict; graphslim must escape
    them."""
    from tensorflow.core.framework import function_pb2

    f = function_pb2.FunctionDef()
    f.signature.name = f"__inference_evil{EVIL_TEXT}_1"
    f.signature.is_stateful = True
    f.node_def.extend([string_const("path", b"/nonexistent"),
                       node_def(f"evil{EVIL_TEXT}", "ReadFile", ["path:output:0"])])
    meta.graph_def.library.function.append(f)
    sig = meta.signature_def["serving_default"]
    sig.outputs[f"out{EVIL_TEXT}"].CopyFrom(sig.outputs["output_0"])
    del sig.outputs["output_0"]


def terminal_escapes_op(meta) -> None:
    """vgg_digits with a node whose *op type* (which no TensorFlow registers, so the scan refuses and
    names it) holds a newline, ESC sequences, BEL and rich markup: the refusal of ``scan`` and
    ``optimize`` must show it escaped, on one line."""
    body = serving_body(meta)
    body.node_def.append(node_def("evil_op", f"Evil\n{EVIL_TEXT}Op"))


# ------------------------------------------------------------------------------------ found by fuzzing
CHECKPOINT_ENTRY_DEFECTS = {
    "not_a_proto": "a value that is not a BundleEntryProto (Check failed: entry.ParseFromString, "
                   "checkpoint_reader.cc:122)",
    "negative_dim": "a shape with a dim of -2^31 (Check failed: size >= 0, tensor_shape.cc:416)",
    "negative_slice": "a slice starting at 2^62 of a dim of 10, to its end: a negative length (the same "
                      "check, through TensorSlice::SliceTensorShape when the tensor is read)",
    "ref_dtype": "dtype 101, a reference type (Unexpected type: 101, tensor.cc:1014, when read)",
}


def checkpoint_entry(defect: str) -> Callable[[Path], Path]:
    """vgg_digits whose ``variables.index`` (re-encoded, checksums right) holds, for the checkpoint's
    object graph or a variable, an entry with one of :data:`CHECKPOINT_ENTRY_DEFECTS`. Found by
    ``benchmarks/fuzz.py --harness ckptindex``: TensorFlow's CheckpointReader, which graphslim's loader
    opens on the model's files, aborts the whole process on each, so ``graphslim optimize`` died with
    SIGABRT. graphslim must refuse them with a clear error (exit 2) naming the variables."""
    def build(dst: Path) -> Path:
        from tensorflow.core.framework import tensor_slice_pb2
        from tensorflow.core.protobuf import tensor_bundle_pb2

        model = copy_fixture(VGG, dst)
        index = model / "variables" / "variables.index"
        entries, _ = read_table(index.read_bytes())
        key = {"ref_dtype": b"_CHECKPOINTABLE_OBJECT_GRAPH", "negative_slice": b"variables/8/.ATTRIBUTES/VARIABLE_VALUE"
               }.get(defect, b"variables/0/.ATTRIBUTES/VARIABLE_VALUE")
        i = next(i for i, (k, _) in enumerate(entries) if k == key)
        e = tensor_bundle_pb2.BundleEntryProto()
        e.ParseFromString(entries[i][1])
        if defect == "negative_dim":
            e.shape.dim[0].size = -2**31
        elif defect == "negative_slice":  # [32, 10] read from [1:, 2^62:]
            e.slices.add().extent.extend([tensor_slice_pb2.TensorSliceProto.Extent(start=1),
                                          tensor_slice_pb2.TensorSliceProto.Extent(start=2**62)])
        elif defect == "ref_dtype":
            e.dtype = 101
        value = b"\x12\xff\xff\xff\xff\x0f" if defect == "not_a_proto" else e.SerializeToString()
        entries[i] = (key, value)  # not_a_proto: field 2, a length past the end
        index.write_bytes(write_table(entries))
        return model
    build.__doc__ = f"{checkpoint_entry.__doc__.splitlines()[0]} ({CHECKPOINT_ENTRY_DEFECTS[defect]})"
    return build


# ------------------------------------------------------------------------------------ the corpus
def cases(outside: Path) -> list[Attack]:
    """Every attack, with its markers and secrets under ``outside`` (a directory outside every model;
    the tests check that it holds only the secrets afterwards)."""
    def m(name):
        return outside / f"{name}.marker"

    secret = outside / "secret.txt"
    return [
        Attack("tf1_restore_all_saves", tf1_restore_saves(m("tf1_restore_all_saves")), ("SaveV2",),
               refuses=("SaveV2",), run=NEVER, marker=m("tf1_restore_all_saves")),
        Attack("tf2_restore_fn_saves", tf2_restore_fn_saves(m("tf2_restore_fn_saves")), ("SaveV2",),
               refuses=("SaveV2",), run=NEVER, marker=m("tf2_restore_fn_saves")),
        Attack("tf1_restore_reads_elsewhere", restore_reads_elsewhere(TF1, outside / "tf1_stolen_ckpt"),
               ("RestoreV2", "save/RestoreV2", "file prefix comes from 'attack/prefix'"), refuses=("RestoreV2",),
               run=NEVER, secret=outside / "tf1_stolen_ckpt.index"),
        Attack("tf2_restore_reads_elsewhere", restore_reads_elsewhere(VGG, outside / "tf2_stolen_ckpt"),
               ("RestoreV2", "__inference__traced_restore_", "'attack_prefix' (Const)"), refuses=("RestoreV2",),
               run=NEVER, secret=outside / "tf2_stolen_ckpt.index"),
        Attack("dump_tensor", dump_tensor(m("dump_tensor")), ("DumpTensor",), refuses=("DumpTensor",),
               run=FILES, marker=m("dump_tensor")),
        Attack("unigram_vocab_file", unigram_vocab(secret), ("FixedUnigramCandidateSampler",),
               refuses=("FixedUnigramCandidateSampler",), run=FILES, secret=secret),
        Attack("record_input", record_input(secret), ("RecordInput",), refuses=("RecordInput",), run=FILES,
               secret=secret),
        Attack("read_write_file", read_write_file(m("read_write_file"), secret), ("ReadFile",),
               refuses=("ReadFile", "WriteFile"), run=FILES, marker=m("read_write_file"), secret=secret),
        Attack("mutex_deadlock", mutex_deadlock(), ("MutexLock",), refuses=("MutexV2", "MutexLock", "ConsumeMutexLock"),
               run=HANGS),
        Attack("queue_past_capacity", queue_past_capacity(), ("QueueEnqueueV2",),
               refuses=("FIFOQueueV2", "QueueEnqueueV2"), run=HANGS),
        Attack("stage_past_capacity", stage_past_capacity(), ("Stage",), refuses=("Stage",), run=HANGS),
        Attack("long_sleep", long_sleep(), ("SleepIdentityOp",), refuses=("SleepIdentityOp",), run=HANGS),
        Attack("endless_while", endless_while(), (), scan="pass", run=HANGS, may_load=True),
        Attack("abort_exit_0", abort(True), ("Abort",), refuses=("Abort",), run=CRASHES),
        Attack("abort_sigabrt", abort(False), ("Abort",), refuses=("Abort",), run=CRASHES),
        Attack("variant_crash", variant_crash(), (), scan="pass", run=CRASHES, may_load=True),
        Attack("variant_in_body", edit(VGG, variant_in_body), (), scan="pass", run=CRASHES, may_load=True),
        Attack("objgraph_two_cycles", objgraph_cycles(), (), scan="pass", may_load=True),
        Attack("broadcast_16gib", broadcast_bomb(), ("bcast",), scan="pass", may_load=True),
        Attack("sparse_asset_1gib", sparse_asset(), ("labels.txt",), scan="pass", may_load=True),
        Attack("hardlink_asset", hardlink_asset(outside / "labels_secret.txt"), ("labels.txt",),
               refuses=("<path>",), secret=outside / "labels_secret.txt"),
        Attack("terminal_escapes", edit(VGG, terminal_escapes), ("ReadFile",), refuses=("ReadFile",)),
        Attack("terminal_escapes_op", edit(VGG, terminal_escapes_op), ("Evil",), refuses=("Evil",)),
        *(Attack(f"checkpoint_entry_{defect}", checkpoint_entry(defect), ("variables",), scan="pass",
                 in_process=False) for defect in CHECKPOINT_ENTRY_DEFECTS),
    ]


def build_cases(out: Path, outside: Path, only=None) -> dict:
    """Build the attacks (``only``: names) under ``out/<name>/``; returns name → (Attack, model path)."""
    outside.mkdir(parents=True, exist_ok=True)
    built = {}
    for case in cases(outside):
        if only is not None and case.name not in only:
            continue
        d = out / case.name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        built[case.name] = (case, case.build(d))
    return built


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for name, (case, path) in build_cases(root, root / "outside").items():
        print(name, path)
