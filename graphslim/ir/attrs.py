"""Conversion between TensorFlow ``AttrValue`` protos and plain Python values.

Nodes keep their attributes as ``AttrValue`` protos so that a load/emit round trip is exact; passes
read and write them as Python values through :meth:`Node.attr` and :meth:`Node.set_attr`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, tensor_shape_pb2, types_pb2


def shape_from_proto(proto: tensor_shape_pb2.TensorShapeProto) -> tuple | None:
    """``TensorShapeProto`` → tuple of ints/None, or None for unknown rank."""
    if proto.unknown_rank:
        return None
    return tuple(d.size if d.size >= 0 else None for d in proto.dim)


def shape_to_proto(shape) -> tensor_shape_pb2.TensorShapeProto:
    """Tuple of ints/None (or None for unknown rank) → ``TensorShapeProto``."""
    if shape is None:
        return tensor_shape_pb2.TensorShapeProto(unknown_rank=True)
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=-1 if d is None else int(d)) for d in shape]
    )


def _decode(b: bytes):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def from_attr(value: attr_value_pb2.AttrValue):
    """AttrValue → Python value (str, int, float, bool, tf.DType, shape tuple, ndarray, list, func name)."""
    kind = value.WhichOneof("value")
    if kind == "s":
        return _decode(value.s)
    if kind == "i":
        return int(value.i)
    if kind == "f":
        return float(value.f)
    if kind == "b":
        return bool(value.b)
    if kind == "type":
        return tf.as_dtype(value.type)
    if kind == "shape":
        return shape_from_proto(value.shape)
    if kind == "tensor":
        return tf.make_ndarray(value.tensor)
    if kind == "func":
        return value.func.name
    if kind == "placeholder":
        return value.placeholder
    if kind == "list":
        lst = value.list
        if lst.s:
            return [_decode(x) for x in lst.s]
        if lst.i:
            return [int(x) for x in lst.i]
        if lst.f:
            return [float(x) for x in lst.f]
        if lst.b:
            return [bool(x) for x in lst.b]
        if lst.type:
            return [tf.as_dtype(x) for x in lst.type]
        if lst.shape:
            return [shape_from_proto(x) for x in lst.shape]
        if lst.tensor:
            return [tf.make_ndarray(x) for x in lst.tensor]
        if lst.func:
            return [f.name for f in lst.func]
        return []
    return None


def to_attr(value) -> attr_value_pb2.AttrValue:
    """Python value → AttrValue. AttrValue protos pass through unchanged.

    Tuples are shapes (``(None, 8, 8, 3)``), lists are list attributes (``[1, 2, 2, 1]`` → ``list.i``),
    ndarrays become tensors, ``tf.DType`` becomes ``type``; this mirrors what :func:`from_attr` returns.
    """
    if isinstance(value, attr_value_pb2.AttrValue):
        return value
    out = attr_value_pb2.AttrValue()
    if isinstance(value, bool):
        out.b = value
    elif isinstance(value, (int, np.integer)):
        out.i = int(value)
    elif isinstance(value, (float, np.floating)):
        out.f = float(value)
    elif isinstance(value, str):
        out.s = value.encode("utf-8")
    elif isinstance(value, bytes):
        out.s = value
    elif isinstance(value, tf.DType):
        out.type = value.as_datatype_enum
    elif isinstance(value, np.ndarray):
        out.tensor.CopyFrom(tf.make_tensor_proto(value))
    elif isinstance(value, tuple):
        # tuples are shapes (from_attr returns shapes as tuples); lists are list attributes
        out.shape.CopyFrom(shape_to_proto(value))
    elif isinstance(value, list):
        if all(isinstance(v, bool) for v in value) and value:
            out.list.b.extend(value)
        elif all(isinstance(v, (int, np.integer)) for v in value):
            out.list.i.extend(int(v) for v in value)
            if not value:
                out.list.SetInParent()
        elif all(isinstance(v, (float, np.floating, int)) for v in value):
            out.list.f.extend(float(v) for v in value)
        elif all(isinstance(v, str) for v in value):
            out.list.s.extend(v.encode("utf-8") for v in value)
        elif all(isinstance(v, tf.DType) for v in value):
            out.list.type.extend(v.as_datatype_enum for v in value)
        else:
            raise TypeError(f"cannot store list {value!r} as a TensorFlow attribute")
    else:
        raise TypeError(f"cannot store {type(value).__name__} {value!r} as a TensorFlow attribute")
    return out


def dtype_enum(dtype) -> int:
    """tf.DType / numpy dtype / enum → DataType enum int."""
    if isinstance(dtype, int):
        return dtype
    return tf.as_dtype(dtype).as_datatype_enum


DT_RESOURCE = types_pb2.DT_RESOURCE
