"""The values of the graphslim IR, below :mod:`graphslim.ir.graph`: :class:`Tensor` (one output of a node),
:class:`Node` (one op: type, attributes as ``AttrValue`` protos, output dtypes and static shapes),
:class:`Weight` (a trained parameter) and :class:`SignatureArg` (a named signature tensor).

Modules that convert or analyse graphs (``tfconv``, ``analysis.cost``) import these from here, so that
:mod:`graphslim.ir.graph` can delegate to them without an import cycle. ``graphslim.ir.graph``
re-exports every name, which is where users import them from.

Example::

    t = Tensor.parse("conv1/Conv2D:1")      # Tensor(node="conv1/Conv2D", port=1)
    print(t, as_tensor("x"))                # conv1/Conv2D:1 x:0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from graphslim.ir import attrs as _attrs

__all__ = ["WEIGHT_OP", "Node", "SignatureArg", "Tensor", "Weight", "as_tensor"]

WEIGHT_OP = "Weight"


class Tensor(NamedTuple):
    """One output of a node: ``(node name, output port)``. Prints as ``name:port``."""

    node: str
    port: int = 0

    def __str__(self) -> str:
        return f"{self.node}:{self.port}"

    @staticmethod
    def parse(text: str) -> "Tensor":
        """``"conv:1"`` → Tensor("conv", 1); ``"conv"`` → Tensor("conv", 0)."""
        name, sep, port = text.rpartition(":")
        if sep and port.isdigit():
            return Tensor(name, int(port))
        return Tensor(text, 0)


def as_tensor(t) -> Tensor:
    if isinstance(t, Tensor):
        return t
    if isinstance(t, Node):
        return Tensor(t.name, 0)
    if isinstance(t, tuple) and len(t) == 2:
        return Tensor(str(t[0]), int(t[1]))
    if isinstance(t, str):
        return Tensor.parse(t)
    raise TypeError(f"not a tensor reference: {t!r}")


@dataclass(eq=False)
class Node:
    """One op of the graph. Attributes are stored as ``AttrValue`` protos (exact round trip)."""

    name: str
    op: str
    attrs: dict = field(default_factory=dict)
    device: str = ""
    dtypes: list = field(default_factory=list)  # tf.DType per output
    shapes: list = field(default_factory=list)  # tuple (None = unknown dim) or None per output

    def attr(self, key: str, default=None):
        """The attribute ``key`` as a Python value (``"SAME"``, ``[1, 2, 2, 1]``, ``tf.float32``...)."""
        if key not in self.attrs:
            return default
        return _attrs.from_attr(self.attrs[key])

    def set_attr(self, key: str, value) -> None:
        """Set attribute ``key`` from a Python value or an ``AttrValue`` proto."""
        self.attrs[key] = _attrs.to_attr(value)

    def output(self, port: int = 0) -> Tensor:
        return Tensor(self.name, port)

    @property
    def num_outputs(self) -> int:
        return len(self.dtypes)

    def __repr__(self) -> str:
        shapes = ", ".join(str(s) for s in self.shapes)
        return f"<Node {self.name} {self.op} -> [{shapes}]>"


@dataclass
class Weight:
    """A trained parameter: its value, checkpoint name and trainable flag."""

    name: str
    value: np.ndarray
    trainable: bool = True

    @property
    def shape(self) -> tuple:
        return tuple(self.value.shape)


@dataclass
class SignatureArg:
    """A named signature input or output and the tensor it is bound to."""

    name: str
    tensor: Tensor
