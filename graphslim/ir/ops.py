"""Per-op facts: one table, one entry per op type graphslim knows more about than its inputs and outputs.

An entry (:class:`OpFacts`) states what an op *is*: which inputs carry data and which a kernel, how the
kernel's axes map to input and output channels and how it reads as a ``[fan_in, out]`` matrix, whether
the op is linear in its data (a per-channel affine after it folds into the kernel), whether a channel
group starts at its output, whether least-squares reconstruction can refit it. Analyses attach their
per-op *hooks* to the same entry: the channel rule (:mod:`graphslim.analysis.channel_rules`), the MAC rule
(:mod:`graphslim.analysis.cost`), the numpy evaluation rule (:mod:`graphslim.analysis.constants`). Every
list of "ops that are convolutions" in graphslim is a query over this table (:func:`kernel_ops`,
:func:`seed_ops`, :func:`ops_where`), so they cannot drift apart.

Teaching graphslim a new op is one call::

    from graphslim.ir.ops import define_op
    from graphslim.analysis.channels import elementwise_rule
    define_op("Atan", channel=elementwise_rule)         # channels pass through unchanged

and a kernel op states its kernel::

    define_op("MyConv", kernel_port=1, kernel_axes=lambda node, rank: (2, 3), kernel_layout="HWIO",
              seed=True, linear=True, channel=my_rule, macs=my_macs)

This module imports no TensorFlow and no analysis: analyses import it and register into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np

if TYPE_CHECKING:
    from graphslim.ir.node import Node

__all__ = ["OpFacts", "HOOKS", "define_op", "facts", "hook", "hooks", "register_hook", "kernel_ops",
           "seed_ops", "ops_where", "channel_axis", "kernel_axes", "kernel_matrix", "matrix_to_kernel",
           "all_facts", "snapshot", "restore", "einsum_labels"]

#: hook kinds an entry can carry, and the module that registers the built-in ones
HOOKS = {
    "channel": "graphslim.analysis.channel_rules",  # (ctx, node, at: Link) -> list[Link]; raises Blocked
    "macs": "graphslim.analysis.cost",           # (graph, node) -> MACs per example
    "evaluate": "graphslim.analysis.constants",  # (node, args: list[np.ndarray]) -> np.ndarray
    "positions": "graphslim.analysis.position_rules",  # (ctx, node, need: Span | None) -> list[Span | None]
}


@dataclass(frozen=True)
class OpFacts:
    """What graphslim knows about one op type.

    ``data_ports``: inputs that carry activations. ``kernel_port``: the input that holds the kernel
    (a weight, for the layers graphslim prunes and refits), or None. ``kernel_axes(node, rank)``: the
    kernel's (input-channel axis, output-channel axis), possibly negative. ``kernel_layout``: the
    kernel's axes in letters (``HWIO``: height, width, in, out; ``HWCM``: depthwise channel and
    multiplier; ``IO``/``OI``), documentation for readers of the table. ``seed``: a channel group starts
    at its output's channel axis (a conv's filters; not a depthwise conv, whose channels are its input's).
    ``linear``: for a fixed kernel, the output is linear in the data input and each output channel is
    one kernel column, so a per-channel scale and shift after it fold into kernel and bias.
    ``refit``: least-squares reconstruction can refit its kernel from calibration features.
    ``broadcasting``: element-wise with numpy broadcasting (the constant evaluator's memory budget
    charges the broadcast shape). ``hooks``: per-analysis rules, keyed by a kind in :data:`HOOKS`.
    """

    op: str
    data_ports: tuple = (0,)
    kernel_port: int | None = None
    kernel_axes: Callable | None = None
    kernel_layout: str | None = None
    seed: bool = False
    linear: bool = False
    refit: bool = False
    broadcasting: bool = False
    hooks: Mapping = field(default_factory=lambda: MappingProxyType({}))

    def hook(self, kind: str) -> Callable | None:
        return self.hooks.get(kind)


_TABLE: dict[str, OpFacts] = {}
_FACT_NAMES = {f.name for f in fields(OpFacts)} - {"op", "hooks"}


def define_op(op: str, **facts_and_hooks) -> OpFacts:
    """Create or amend the entry of ``op``. Keyword arguments are :class:`OpFacts` fields or hook kinds
    (``channel=``, ``macs=``, ``evaluate=``); what is not given keeps its current value. Returns the
    entry. Example: ``define_op("Atan", channel=elementwise_rule)``."""
    unknown = set(facts_and_hooks) - _FACT_NAMES - set(HOOKS)
    if unknown:
        raise TypeError(f"define_op({op!r}): unknown fact or hook {sorted(unknown)}; facts are "
                        f"{sorted(_FACT_NAMES)}, hooks {sorted(HOOKS)}")
    entry = _TABLE.get(op) or OpFacts(op)
    new_hooks = {k: v for k, v in facts_and_hooks.items() if k in HOOKS}
    updates = {k: v for k, v in facts_and_hooks.items() if k in _FACT_NAMES}
    if new_hooks:
        updates["hooks"] = MappingProxyType({**entry.hooks, **new_hooks})
    entry = replace(entry, **updates)
    _TABLE[op] = entry
    return entry


def register_hook(kind: str, *ops: str):
    """Decorator: attach ``fn`` as the ``kind`` hook of every op in ``ops`` (what ``@channel_rule``,
    ``@mac_rule`` and ``@eval_rule`` do)."""
    if kind not in HOOKS:
        raise ValueError(f"unknown hook kind {kind!r}; known: {sorted(HOOKS)}")

    def deco(fn):
        for op in ops:
            define_op(op, **{kind: fn})
        return fn

    return deco


def snapshot() -> dict:
    """The whole table as it is now (entries are immutable, so this is a shallow copy)."""
    return dict(_TABLE)


def restore(saved: dict) -> None:
    """Put back a table saved by :func:`snapshot` (a test or plugin undoing what it taught)."""
    _TABLE.clear()
    _TABLE.update(saved)


def facts(op: str) -> OpFacts | None:
    """The entry of op type ``op``, or None."""
    return _TABLE.get(op)


def all_facts() -> list[OpFacts]:
    """Every entry, sorted by op type."""
    return [_TABLE[k] for k in sorted(_TABLE)]


def hook(op: str, kind: str) -> Callable | None:
    """The ``kind`` hook of op type ``op``, or None."""
    entry = _TABLE.get(op)
    return None if entry is None else entry.hooks.get(kind)


class _HookView(Mapping):
    """A live, read-only ``{op: hook}`` view of one hook kind (``CHANNEL_RULES`` and its siblings)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __getitem__(self, op):
        fn = hook(op, self.kind)
        if fn is None:
            raise KeyError(op)
        return fn

    def __iter__(self) -> Iterator[str]:
        return (op for op, e in sorted(_TABLE.items()) if self.kind in e.hooks)

    def __len__(self) -> int:
        return sum(1 for e in _TABLE.values() if self.kind in e.hooks)

    def __repr__(self) -> str:
        return f"<{self.kind} hooks of {len(self)} ops>"


def hooks(kind: str) -> Mapping:
    """A live read-only mapping op type → its ``kind`` hook."""
    if kind not in HOOKS:
        raise ValueError(f"unknown hook kind {kind!r}; known: {sorted(HOOKS)}")
    return _HookView(kind)


def ops_where(**conditions) -> frozenset:
    """Op types whose facts equal all ``conditions`` (``ops_where(linear=True)``)."""
    return frozenset(op for op, e in _TABLE.items() if all(getattr(e, k) == v for k, v in conditions.items()))


def kernel_ops() -> frozenset:
    """Op types that read a kernel (a weight) at ``kernel_port``."""
    return frozenset(op for op, e in _TABLE.items() if e.kernel_port is not None)


def seed_ops() -> frozenset:
    """Op types at whose output channel axis a channel group starts."""
    return ops_where(seed=True)


# ------------------------------------------------------------------------------------- node queries
def channel_axis(node: "Node", rank: int) -> int:
    """The channel axis of ``node``'s activations: 1 for an ``NC…`` data format, else the last."""
    fmt = node.attr("data_format", "NHWC") or "NHWC"
    if isinstance(fmt, bytes):
        fmt = fmt.decode("ascii", "replace")
    return 1 if str(fmt).startswith("NC") and rank > 1 else rank - 1


def kernel_axes(node: "Node", rank: int) -> tuple[int, int] | None:
    """``(input-channel axis, output-channel axis)`` of ``node``'s kernel of rank ``rank``, normalized
    to be non-negative; None for ops without a kernel."""
    entry = _TABLE.get(node.op)
    if entry is None or entry.kernel_axes is None:
        return None
    a, b = entry.kernel_axes(node, rank)
    return a % rank, b % rank


def kernel_matrix(node: "Node", kernel: np.ndarray) -> np.ndarray:
    """A linear op's kernel as a ``[fan_in, out]`` matrix: column ``j`` is output channel ``j``'s
    weights (a view or a transpose, no copy of the data where numpy can avoid it)."""
    entry = _TABLE.get(node.op)
    if entry is None or not entry.linear:
        raise ValueError(f"{node.op} is not a linear op with a kernel matrix")
    _, out = kernel_axes(node, kernel.ndim)
    if node.op == "DepthwiseConv2dNative":  # output channel c·m + j is kernel[..., c, j]
        return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
    moved = np.moveaxis(kernel, out, -1)
    return moved.reshape(-1, moved.shape[-1])


def matrix_to_kernel(node: "Node", matrix: np.ndarray, shape: tuple) -> np.ndarray:
    """The inverse of :func:`kernel_matrix` for a kernel of ``shape``."""
    if node.op == "DepthwiseConv2dNative":
        return matrix.reshape(shape)
    _, out = kernel_axes(node, len(shape))
    moved_shape = tuple(np.delete(np.asarray(shape), out)) + (shape[out],)
    return np.moveaxis(matrix.reshape(moved_shape), -1, out)


def einsum_labels(node: "Node") -> tuple[list[str], str]:
    """An Einsum's equation as (one label string per operand, the output's labels): ``"abc,cde->abde"``
    → ``(["abc", "cde"], "abde")``. Raises ValueError naming what the channel analysis does not follow:
    an ellipsis (``...``), no explicit output (``->``), a label repeated in one operand (a diagonal) or
    in the output, an output label no operand has."""
    eq = node.attr("equation", "")
    if isinstance(eq, bytes):
        eq = eq.decode("utf-8", "replace")
    eq = str(eq).replace(" ", "")

    def refuse(why: str):
        return ValueError(f"Einsum equation {eq!r} ({why}) is not supported")

    if "." in eq:
        raise refuse("ellipsis")
    if eq.count("->") != 1:
        raise refuse("no explicit output")
    lhs, out = eq.split("->")
    operands = lhs.split(",")
    for labels in operands + [out]:
        if not labels.isalpha() and labels:
            raise refuse(f"label string {labels!r}")
        if len(set(labels)) != len(labels):
            raise refuse(f"label repeated in {labels!r}")
    if set(out) - set("".join(operands)):
        raise refuse("an output label no operand has")
    return operands, out


def _einsum_axes(node, rank):
    """A Keras EinsumDense kernel (operand 1): its first label contracted with the input, its first
    label only it and the output have (``abc,cde->abde``: 0 and 1, the heads)."""
    try:
        (x, k), out = einsum_labels(node)
    except ValueError:
        return (0, rank - 1)
    i = next((a for a, c in enumerate(k) if c in x and c not in out), 0)
    o = next((a for a, c in enumerate(k) if c in out and c not in x), rank - 1)
    return (i, o)


# ----------------------------------------------------------------------------------------- the table
def _matmul_axes(node, rank):
    return (1, 0) if node.attr("transpose_b", False) else (0, 1)


def _batch_matmul_axes(node, rank):
    return (-1, -2) if node.attr("adj_y", False) else (-2, -1)


define_op("Conv2D", kernel_port=1, kernel_axes=lambda node, rank: (2, 3), kernel_layout="HWIO",
          seed=True, linear=True, refit=True)
define_op("DepthwiseConv2dNative", kernel_port=1, kernel_axes=lambda node, rank: (2, 2), kernel_layout="HWCM",
          linear=True)
define_op("Conv2DBackpropInput", data_ports=(2,), kernel_port=1, kernel_axes=lambda node, rank: (3, 2),
          kernel_layout="HWOI", seed=True)
define_op("MatMul", kernel_port=1, kernel_axes=_matmul_axes, kernel_layout="IO (OI with transpose_b)",
          seed=True, linear=True, refit=True)
for _op in ("BatchMatMulV2", "BatchMatMulV3", "BatchMatMul"):
    define_op(_op, kernel_port=1, kernel_axes=_batch_matmul_axes, kernel_layout="...IO (...OI with adj_y)",
              seed=True)
define_op("Einsum", kernel_port=1, kernel_axes=_einsum_axes,
          kernel_layout="IO (Keras EinsumDense: the first contracted and the first produced label)", seed=True)
define_op("Conv3D", kernel_port=1, kernel_axes=lambda node, rank: (3, 4), kernel_layout="DHWIO")
