"""Reading model files: the one place that parses ``saved_model.pb`` / ``.pbtxt`` and frozen GraphDefs.

Used by the loader (:mod:`graphslim.io.loader`) and the safety scan (:mod:`graphslim.io.scan`), and
importing neither. Every failure is a :class:`LoadError` naming the file:

* :func:`saved_model_file`, :func:`parse_saved_model`, :func:`pick_meta_graph`, :func:`parse_graph_def`:
  find, parse (bounded: regular files under 2 GiB only) and choose;
* :func:`check_node_def` and friends: refuse attribute values that would make shape inference or
  constant evaluation allocate without bound, or that TensorFlow would reject with a crash.

Example::

    sm = parse_saved_model(saved_model_file(Path("model/")))
    meta = pick_meta_graph(sm, ("serve",), Path("model/"))
    print(signature_names(meta))
"""

from __future__ import annotations

import stat
from pathlib import Path

from google.protobuf import message as _pb_message
from google.protobuf import text_format

from graphslim.errors import GraphslimError, LoadError

MAX_PROTO_BYTES = 2**31
MAX_RANK = 254  # TensorShape's limit
MIN_CONST_BYTES_LIMIT = 256 * 2**20  # a constant may declare this many bytes, or 2x the model file


def _tf():
    import tensorflow as tf  # deferred: importing TF costs ~2 s, error paths should not pay it twice

    return tf


def saved_model_file(path: Path) -> Path:
    """The saved_model.pb (or .pbtxt) of a SavedModel directory; LoadError when there is none."""
    pb, pbtxt = path / "saved_model.pb", path / "saved_model.pbtxt"
    if not pb.exists() and not pbtxt.exists():
        try:
            found = sorted(p.name for p in path.iterdir())[:10]
        except OSError:
            found = []
        raise LoadError(f"{path}: not a SavedModel directory: it has no saved_model.pb (it holds: "
                        f"{', '.join(found) or 'nothing'}). Point graphslim at the folder that contains "
                        f"saved_model.pb and variables/, or at a frozen GraphDef .pb file.")
    return pb if pb.exists() else pbtxt


def read_model_file(file: Path) -> bytes:
    """The bytes of a model file; refuses FIFOs and devices (reading one would hang or never end)."""
    try:
        st = file.stat()
    except OSError as exc:
        raise LoadError(f"{file}: cannot be read ({exc.strerror or exc}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise LoadError(f"{file}: not a regular file (a FIFO, socket or device); refusing to read it.")
    if st.st_size >= MAX_PROTO_BYTES:
        raise LoadError(f"{file}: {st.st_size:,} bytes; a protocol buffer cannot exceed 2 GiB, so this is "
                        f"not a valid model file.")
    try:
        return file.read_bytes()
    except OSError as exc:
        raise LoadError(f"{file}: cannot be read ({exc.strerror or exc}).") from None


def parse_proto(file: Path, message, error: str):
    """Fill ``message`` from ``file`` (binary, or text for ``.pbtxt``); a parse failure raises
    LoadError with ``error`` formatted with ``file`` and ``why``."""
    data = read_model_file(file)
    try:
        if file.suffix == ".pbtxt":
            text_format.Parse(data.decode("utf-8"), message)
        else:
            message.ParseFromString(data)
    except (_pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError, RuntimeError,
            ValueError, TypeError) as exc:
        raise LoadError(error.format(file=file, why=first_line(exc)[:200])) from None
    return message


def parse_saved_model(file: Path):
    from tensorflow.core.protobuf import saved_model_pb2

    sm = parse_proto(file, saved_model_pb2.SavedModel(),
                      "{file}: corrupt SavedModel: the file cannot be parsed as a SavedModel protocol buffer "
                      "({why}). Re-export the model, or check that the copy is complete.")
    if not sm.meta_graphs:
        raise LoadError(f"{file}: corrupt SavedModel: it contains no MetaGraphDef. Re-export the model, "
                        f"or check that the copy is complete.")
    return sm


def pick_meta_graph(sm, tags, path: Path):
    want = set(tags)
    available = [sorted(m.meta_info_def.tags) for m in sm.meta_graphs]
    for m in sm.meta_graphs:
        if set(m.meta_info_def.tags) == want:
            return m
    if len(sm.meta_graphs) == 1 and not sm.meta_graphs[0].meta_info_def.tags:
        return sm.meta_graphs[0]
    raise LoadError(f"{path}: no MetaGraphDef with tags {sorted(want)}; it has {available}. "
                    f"Pass tags= (--tags) with one of those.")


def signature_names(meta) -> list[str]:
    return sorted(k for k in meta.signature_def if not k.startswith("__"))


def const_limit(file: Path) -> int:
    """How many bytes one constant may declare: 256 MiB, or twice the model file (a frozen graph's
    constants are in the file; a splat constant declaring far more than that would be materialized by
    shape inference and constant evaluation)."""
    try:
        size = file.stat().st_size if file.is_file() else (saved_model_file(file)).stat().st_size
    except (OSError, GraphslimError):
        size = 0
    return max(MIN_CONST_BYTES_LIMIT, 2 * size)


def dtype_size(enum: int, where: str) -> int:
    tf = _tf()
    try:
        dt = tf.as_dtype(enum)
    except TypeError:
        raise LoadError(f"{where} has an invalid dtype (enum {enum}); the model is corrupt.") from None
    try:
        return max(1, dt.size)
    except (TypeError, ValueError, AttributeError):  # string, resource, variant
        return 1


def _attrs_dt_string() -> int:
    return 7  # DT_STRING: variable-length elements, no fixed content size


def check_shape_proto(shape, where: str) -> None:
    if shape.unknown_rank:
        return
    if len(shape.dim) > MAX_RANK:
        raise LoadError(f"{where} has rank {len(shape.dim)}; TensorFlow allows at most {MAX_RANK}. "
                        f"The model is corrupt.")
    for d in shape.dim:
        if d.size < -1:
            raise LoadError(f"{where} has a dimension of size {d.size}; sizes must be >= 0 (or -1 for "
                            f"unknown). The model is corrupt.")


def _dtype_label(enum: int) -> str:
    try:
        return _tf().as_dtype(enum).name
    except TypeError:
        return f"invalid dtype (enum {enum})"


_DT_VARIANT = 21


def refuse_variant_constants(nd, file, function: str | None = None) -> None:
    """Refuse a node holding a variant-typed tensor value (see :func:`check_tensor_proto`), checked on
    every function of the library before any of it reaches TensorFlow."""
    for key, v in nd.attr.items():
        kind = v.WhichOneof("value")
        tensors = [v.tensor] if kind == "tensor" else list(v.list.tensor) if kind == "list" else []
        for t in tensors:
            if t.dtype == _DT_VARIANT or len(t.variant_val):
                place = f" in function {function!r}" if function else ""
                raise LoadError(f"{file}: node {nd.name!r} ({nd.op}){place} attribute {key!r} is a constant "
                                "of type variant; graphslim does not read variant constants (TensorFlow "
                                "decodes them in native code, and a malformed one crashes it): the model "
                                "is malformed or hostile.")


def check_tensor_proto(t, where: str, limit: int) -> None:
    if t.dtype == _DT_VARIANT or len(t.variant_val):
        # TensorFlow decodes variant values (TensorLists, datasets...) in native code, from
        # model-chosen bytes: a malformed one crashes it or leaves its graph locked. No exporter
        # writes them as constants.
        raise LoadError(f"{where} is a constant of type variant; graphslim does not read variant "
                        "constants (TensorFlow decodes them in native code, and a malformed one crashes "
                        "it): the model is malformed or hostile.")
    check_shape_proto(t.tensor_shape, where)
    if t.tensor_shape.unknown_rank:
        raise LoadError(f"{where} is a constant of unknown rank; the model is corrupt.")
    n = 1
    for d in t.tensor_shape.dim:
        if d.size < 0:
            raise LoadError(f"{where} is a constant with a dimension of size {d.size}; the model is "
                            f"corrupt.")
        n *= d.size
    values = max(len(t.float_val), len(t.double_val), len(t.int_val), len(t.int64_val), len(t.string_val),
                 len(t.bool_val), len(t.half_val), len(t.uint32_val), len(t.uint64_val),
                 len(t.scomplex_val) // 2, len(t.dcomplex_val) // 2, len(getattr(t, "float8_val", b"")))
    if values > n:  # TensorFlow refuses these; numpy would fail decoding them
        raise LoadError(f"{where} is a constant of shape {[d.size for d in t.tensor_shape.dim]} with "
                        f"{values:,} values, more than its {n:,} elements; the model is corrupt.")
    itemsize = dtype_size(t.dtype, where)
    nbytes = n * itemsize
    if t.tensor_content and t.dtype not in (_attrs_dt_string(),) and len(t.tensor_content) != nbytes:
        raise LoadError(f"{where} is a constant of shape {[d.size for d in t.tensor_shape.dim]} whose "
                        f"content has {len(t.tensor_content):,} bytes instead of {nbytes:,}; the model is "
                        f"corrupt.")
    if nbytes > limit:
        raise LoadError(f"{where} declares a constant of shape {[d.size for d in t.tensor_shape.dim]} "
                        f"({nbytes:,} bytes), more than the {limit:,} bytes graphslim accepts for one "
                        f"constant of this model (the file is far smaller): the model is corrupt or "
                        f"hostile.")


def check_node_def(nd, file, limit: int, function: str | None = None) -> None:
    """Refuse attribute values that would make shape inference or constant evaluation allocate
    without bound, or that TensorFlow would reject with a crash rather than an error: constants
    declaring huge shapes, negative or overlong shapes, invalid dtypes."""
    place = f" in function {function!r}" if function else ""
    where = f"{file}: node {nd.name!r} ({nd.op}){place}"
    if nd.op in ("Const", "HostConst") and "value" in nd.attr and "dtype" in nd.attr:
        # TensorFlow's shape functions trust a constant's dtype attr and read its value as that type:
        # a mismatch aborts the process (a CHECK failure in tensor.cc), so it is refused here.
        declared, actual = nd.attr["dtype"].type, nd.attr["value"].tensor.dtype
        if declared != actual:
            raise LoadError(f"{where} declares dtype {_dtype_label(declared)} but its value is "
                            f"{_dtype_label(actual)}; the model is corrupt.")
    for key, v in nd.attr.items():
        kind = v.WhichOneof("value")
        if kind == "tensor":
            check_tensor_proto(v.tensor, f"{where} attribute {key!r}", limit)
        elif kind == "shape":
            check_shape_proto(v.shape, f"{where} attribute {key!r}")
        elif kind == "type":
            dtype_size(v.type, f"{where} attribute {key!r}")
        elif kind == "list":
            for t in v.list.tensor:
                check_tensor_proto(t, f"{where} attribute {key!r}", limit)
            for sh in v.list.shape:
                check_shape_proto(sh, f"{where} attribute {key!r}")
            for ty in v.list.type:
                dtype_size(ty, f"{where} attribute {key!r}")


def first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse_graph_def(file: Path):
    from tensorflow.core.framework import graph_pb2

    return parse_proto(file, graph_pb2.GraphDef(),
                        "{file}: cannot be parsed as a frozen GraphDef ({why}). Pass a SavedModel directory "
                        "or a binary GraphDef .pb file.")
