"""The graphslim IR: a dataflow graph of TensorFlow ops over a ``networkx.MultiDiGraph``.

* A :class:`Node` is one op: its TF type (``Conv2D``), attributes (``AttrValue`` protos, read and written
  as Python values), and per output a dtype and a static shape.
* A :class:`Tensor` names one output of a node: ``Tensor("conv1/Conv2D", 0)``.
* Edges are tensors (``src_port`` → ``dst_port``) or control dependencies.
* Trained parameters live in one table, ``graph.weights``. Each weight is read through exactly one
  node of the pseudo-op ``Weight`` (named like the weight, e.g. ``conv1/kernel``), so that its uses
  are ordinary edges and ``graph.consumers(...)`` finds every op that reads it.
* The graph carries one signature: ``graph.inputs`` (Placeholder outputs) and ``graph.outputs``,
  each a :class:`SignatureArg` with the name a caller of the SavedModel uses.

Only this module touches networkx. Passes use :meth:`Graph.add_node`, :meth:`Graph.remove_node`,
:meth:`Graph.producer`, :meth:`Graph.consumers`, :meth:`Graph.replace_all_uses`,
:meth:`Graph.set_weight`, :meth:`Graph.add_const`, :meth:`Graph.add_input`, :meth:`Graph.rename_node`,
:meth:`Graph.weight_readers`, :meth:`Graph.sole_consumer` and friends, so use-def information cannot go
stale; :meth:`Graph.format` prints the graph one node a line.

The values (``Node``, ``Tensor``, ``Weight``, ``SignatureArg``) live in :mod:`graphslim.ir.node` and are
re-exported here. :meth:`Graph.infer_shapes` and :meth:`Graph.cost` delegate to
:mod:`graphslim.ir.tfconv` and :mod:`graphslim.analysis.cost`, imported when called; neither imports this
module, so there is no import cycle.

Example::

    g = graphslim.load("model/")
    for node in g.nodes(op="Conv2D"):
        kernel = g.weight_of(node, 1)          # the Weight feeding input 1, or None
        print(node.name, kernel.name, kernel.value.shape)
"""

from __future__ import annotations

import copy as _copy
import itertools
from typing import Iterable, Iterator

import networkx as nx
import numpy as np
import tensorflow as tf

from graphslim.errors import VerificationError
from graphslim.ir import attrs as _attrs
from graphslim.ir.node import WEIGHT_OP, Node, SignatureArg, Tensor, Weight, as_tensor

__all__ = ["WEIGHT_OP", "Graph", "Node", "SignatureArg", "Tensor", "Weight", "as_tensor"]

class Graph:
    """A TensorFlow dataflow graph with a weight table and one signature. See the module docstring."""

    def __init__(self) -> None:
        self._g = nx.MultiDiGraph()
        self.weights: dict[str, Weight] = {}
        self.inputs: list[SignatureArg] = []
        self.outputs: list[SignatureArg] = []
        self.signature_name = "serving_default"
        self.functions: dict = {}  # name -> FunctionDef, for functional ops left in the graph
        self.assets: dict[str, bytes] = {}  # file name -> content
        self.meta: dict = {}  # provenance: source path, format, producer versions
        self._uid = itertools.count()

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def __contains__(self, name) -> bool:
        return self._g.has_node(name)

    def node(self, name: str) -> Node:
        """The node called ``name`` (KeyError with the name if there is none)."""
        try:
            return self._g.nodes[name]["node"]
        except KeyError:
            raise KeyError(f"no node named {name!r} in the graph") from None

    def has_node(self, name: str) -> bool:
        return self._g.has_node(name)

    def nodes(self, op: str | Iterable[str] | None = None) -> list[Node]:
        """All nodes in topological order, optionally only those of type ``op`` (a name or a set)."""
        order = self.topo_order()
        if op is None:
            return order
        ops = {op} if isinstance(op, str) else set(op)
        return [n for n in order if n.op in ops]

    def topo_order(self) -> list[Node]:
        try:
            return [self._g.nodes[n]["node"] for n in nx.topological_sort(self._g)]
        except nx.NetworkXUnfeasible:
            cycle = nx.find_cycle(self._g)
            names = " -> ".join(str(e[0]) for e in cycle)
            raise VerificationError(f"the graph has a cycle: {names}; a dataflow graph must be acyclic") from None

    def producer(self, tensor) -> Node:
        """The node that produces ``tensor`` (a Tensor, ``"name:port"`` or a Node)."""
        return self.node(as_tensor(tensor).node)

    def inputs_of(self, node) -> list[Tensor]:
        """The data inputs of ``node`` in port order."""
        name = node.name if isinstance(node, Node) else node
        ins = {}
        for src, _, data in self._g.in_edges(name, data=True):
            if not data.get("control"):
                ins[data["dst_port"]] = Tensor(src, data["src_port"])
        return [ins[i] for i in sorted(ins)]

    def input(self, node, port: int) -> Tensor:
        """The tensor feeding input ``port`` of ``node``."""
        name = node.name if isinstance(node, Node) else node
        for src, _, data in self._g.in_edges(name, data=True):
            if not data.get("control") and data["dst_port"] == port:
                return Tensor(src, data["src_port"])
        raise KeyError(f"node {name!r} has no input {port}")

    def input_node(self, node, port: int) -> Node:
        return self.producer(self.input(node, port))

    def control_inputs_of(self, node) -> list[str]:
        name = node.name if isinstance(node, Node) else node
        return sorted({src for src, _, d in self._g.in_edges(name, data=True) if d.get("control")})

    def consumers(self, what) -> list[tuple[Node, int]]:
        """Data uses of a tensor (or of every output of a node): list of ``(consumer, input port)``."""
        if isinstance(what, Node) or (isinstance(what, str) and ":" not in what and self.has_node(what)):
            name, port = (what.name if isinstance(what, Node) else what), None
        else:
            t = as_tensor(what)
            name, port = t.node, t.port
        out = []
        for _, dst, data in self._g.out_edges(name, data=True):
            if data.get("control"):
                continue
            if port is None or data["src_port"] == port:
                out.append((self._g.nodes[dst]["node"], data["dst_port"]))
        out.sort(key=lambda x: (x[0].name, x[1]))
        return out

    def control_consumers(self, node) -> list[Node]:
        name = node.name if isinstance(node, Node) else node
        return [self._g.nodes[d]["node"] for _, d, dd in self._g.out_edges(name, data=True) if dd.get("control")]

    def is_output(self, tensor) -> bool:
        t = as_tensor(tensor)
        return any(o.tensor == t for o in self.outputs)

    def uses(self, tensor) -> int:
        """Number of data uses of ``tensor``, counting signature outputs."""
        t = as_tensor(tensor)
        return len(self.consumers(t)) + sum(o.tensor == t for o in self.outputs)

    def names(self) -> list[str]:
        """Every node's name, in insertion order (cheaper than :meth:`nodes`, which sorts)."""
        return list(self._g.nodes)

    def data_edges(self) -> Iterator[tuple[Tensor, str, int]]:
        """Every data edge as ``(source tensor, consumer name, consumer input port)``, in insertion order."""
        for src, dst, data in self._g.edges(data=True):
            if not data.get("control"):
                yield Tensor(src, data["src_port"]), dst, data["dst_port"]

    def sole_consumer(self, tensor) -> tuple[Node, int] | None:
        """``(node, input port)`` of the only use of ``tensor``, or None when it has several uses, none,
        or is a signature output (rewriting its producer would then change what others see)."""
        uses = self.consumers(as_tensor(tensor))
        if len(uses) != 1 or self.is_output(tensor):
            return None
        return uses[0]

    def sole_weight(self, node, port: int) -> tuple[Weight | None, str | None]:
        """``(weight, None)`` when input ``port`` of ``node`` is a Weight (through Identity) that nothing
        else reads; else ``(None, why not)``."""
        t = self.input(node, port)
        src = self.producer(t)
        chain = [t]
        while src.op == "Identity":
            t = self.input(src, 0)
            chain.append(t)
            src = self.producer(t)
        if src.op != WEIGHT_OP:
            return None, f"input {port} is computed ({src.op}), not a trained weight"
        if any(self.uses(x) != 1 for x in chain):
            return None, f"kernel {src.name} is shared with other ops"
        return self.weights[src.name], None

    def bias_after(self, node) -> tuple[Node | None, Weight | None]:
        """``(BiasAdd node, its bias Weight)`` when ``node``'s only use is a BiasAdd (at its data input)
        of a weight nothing else reads, and ``node``'s output is no signature output; else
        ``(None, None)``."""
        use = self.sole_consumer(self.node(node).output(0) if isinstance(node, str) else node.output(0))
        if use is None or use[0].op != "BiasAdd" or use[1] != 0:
            return None, None
        w, _ = self.sole_weight(use[0], 1)
        return (use[0], w) if w is not None else (None, None)

    def weight_readers(self, name: str) -> list[tuple[Node, int]]:
        """``(node, input port)`` of every op reading weight ``name``, looking through Identity."""
        out, todo = [], [name]
        while todo:
            for node, port in self.consumers(todo.pop()):
                if node.op == "Identity":
                    todo.append(node.name)
                else:
                    out.append((node, port))
        return out

    def weight_of(self, node, port: int) -> Weight | None:
        """The Weight read by input ``port`` of ``node`` (looking through Identity), or None."""
        try:
            src = self.input_node(node, port)
        except KeyError:
            return None
        while src.op == "Identity":
            src = self.input_node(src, 0)
        if src.op == WEIGHT_OP:
            return self.weights[src.name]
        return None

    def constant_value(self, tensor) -> np.ndarray | None:
        """The value of ``tensor`` if it is a Const or Weight (through Identity), else None."""
        src = self.producer(tensor)
        while src.op == "Identity":
            src = self.input_node(src, 0)
        if src.op == WEIGHT_OP:
            return self.weights[src.name].value
        if src.op == "Const":
            return src.attr("value")
        return None

    def shape(self, tensor) -> tuple | None:
        t = as_tensor(tensor)
        return self.node(t.node).shapes[t.port]

    def dtype(self, tensor):
        t = as_tensor(tensor)
        return self.node(t.node).dtypes[t.port]

    # ------------------------------------------------------------------ mutation
    def unique_name(self, base: str) -> str:
        """``base`` if unused, else ``base_1``, ``base_2``..."""
        if not self._g.has_node(base):
            return base
        for i in itertools.count(1):
            cand = f"{base}_{i}"
            if not self._g.has_node(cand):
                return cand
        raise AssertionError

    def add_node(self, name: str, op: str, inputs: Iterable = (), attrs: dict | None = None,
                 control_inputs: Iterable[str] = (), device: str = "", dtypes=None, shapes=None,
                 unique: bool = False) -> Node:
        """Add an op. ``inputs`` are tensors (``Tensor``, ``"name:port"`` or Node for port 0).

        Attribute values may be Python values or AttrValue protos. Output dtypes and shapes are filled
        by the next :meth:`infer_shapes` unless given. With ``unique=True`` a taken name gets a suffix.
        """
        if unique:
            name = self.unique_name(name)
        elif self._g.has_node(name):
            raise ValueError(f"a node named {name!r} already exists")
        node = Node(name=name, op=op, attrs={k: _attrs.to_attr(v) for k, v in (attrs or {}).items()},
                    device=device, dtypes=list(dtypes or []), shapes=list(shapes or []))
        self._g.add_node(name, node=node)
        for port, t in enumerate(inputs):
            t = as_tensor(t)
            if not self._g.has_node(t.node):
                self._g.remove_node(name)
                raise KeyError(f"input {t} of new node {name!r} does not exist")
            self._g.add_edge(t.node, name, src_port=t.port, dst_port=port)
        for c in control_inputs:
            self.add_control_input(name, c)
        return node

    def remove_node(self, node, safe: bool = True) -> None:
        """Remove a node. With ``safe`` (default) refuse if any of its outputs is still used."""
        name = node.name if isinstance(node, Node) else node
        n = self.node(name)
        if safe:
            users = [c.name for c, _ in self.consumers(n)] + [d.name for d in self.control_consumers(n)]
            outs = [o.name for o in self.outputs if o.tensor.node == name]
            if users or outs:
                raise ValueError(f"cannot remove {name!r}: still used by {', '.join(users + outs)}")
        self._g.remove_node(name)
        if n.op == WEIGHT_OP:
            self.weights.pop(name, None)
        self.inputs = [a for a in self.inputs if a.tensor.node != name]

    def remove_unused(self, names, keep_weights: bool = True) -> list[str]:
        """Remove each node of ``names`` that nothing reads (no data or control consumer, no signature
        output), then, in turn, its inputs that became unread; the one local dead-code remover (the
        whole-graph one is :meth:`remove_dead_nodes`). Placeholders stay; Weights stay unless
        ``keep_weights`` is false (then they leave the weight table too). Returns the removed names."""
        removed, todo = [], [n.name if isinstance(n, Node) else as_tensor(n).node for n in names]
        keep = {"Placeholder"} | ({WEIGHT_OP} if keep_weights else set())
        while todo:
            name = todo.pop()
            if not self.has_node(name):
                continue
            node = self.node(name)
            if node.op in keep or self.consumers(node) or self.control_consumers(node) \
                    or any(o.tensor.node == name for o in self.outputs):
                continue
            todo += [t.node for t in self.inputs_of(node)] + self.control_inputs_of(node)
            self.remove_node(name)
            removed.append(name)
        return removed

    def set_input(self, node, port: int, tensor) -> None:
        """Rewire input ``port`` of ``node`` to ``tensor``."""
        name = node.name if isinstance(node, Node) else node
        t = as_tensor(tensor)
        for src, dst, key, data in list(self._g.in_edges(name, keys=True, data=True)):
            if not data.get("control") and data["dst_port"] == port:
                self._g.remove_edge(src, dst, key)
        self._g.add_edge(t.node, name, src_port=t.port, dst_port=port)

    def set_inputs(self, node, tensors: Iterable) -> None:
        """Replace all data inputs of ``node`` by ``tensors`` (ports 0..n-1)."""
        name = node.name if isinstance(node, Node) else node
        for src, dst, key, data in list(self._g.in_edges(name, keys=True, data=True)):
            if not data.get("control"):
                self._g.remove_edge(src, dst, key)
        for port, t in enumerate(tensors):
            t = as_tensor(t)
            self._g.add_edge(t.node, name, src_port=t.port, dst_port=port)

    def add_control_input(self, node, control: str) -> None:
        name = node.name if isinstance(node, Node) else node
        ctl = control.name if isinstance(control, Node) else control.lstrip("^")
        if ctl not in self.control_inputs_of(name):
            self._g.add_edge(ctl, name, control=True)

    def remove_control_inputs(self, node) -> None:
        name = node.name if isinstance(node, Node) else node
        for src, dst, key, data in list(self._g.in_edges(name, keys=True, data=True)):
            if data.get("control"):
                self._g.remove_edge(src, dst, key)

    def replace_all_uses(self, old, new, *, include_outputs: bool = True) -> int:
        """Make every consumer of tensor ``old`` read ``new`` instead (and signature outputs bound to
        ``old``, unless ``include_outputs=False``). Returns the number of uses rewired."""
        old, new = as_tensor(old), as_tensor(new)
        count = 0
        for src, dst, key, data in list(self._g.out_edges(old.node, keys=True, data=True)):
            if data.get("control") or data["src_port"] != old.port or dst == new.node:
                continue
            self._g.remove_edge(src, dst, key)
            self._g.add_edge(new.node, dst, src_port=new.port, dst_port=data["dst_port"])
            count += 1
        if include_outputs:
            for o in self.outputs:
                if o.tensor == old:
                    o.tensor = new
                    count += 1
        return count

    def set_output(self, name: str, tensor) -> None:
        """Bind signature output ``name`` to ``tensor`` (adding the output if it is new)."""
        t = as_tensor(tensor)
        if not self.has_node(t.node):
            raise KeyError(f"no node {t.node!r} to bind output {name!r} to")
        for o in self.outputs:
            if o.name == name:
                o.tensor = t
                return
        self.outputs.append(SignatureArg(name, t))

    def add_const(self, name: str, value, *, dtype=None, unique: bool = False) -> Node:
        """Add a ``Const`` node holding ``value`` (a numpy array or scalar; ``dtype`` overrides its
        dtype) and return it. With ``unique=True`` a taken name gets a suffix.

        Example: ``axis = graph.add_const("concat/axis", np.int32(3), unique=True)``."""
        value = np.asarray(value)
        if dtype is not None:
            dtype = tf.as_dtype(dtype)
            value = value.astype(dtype.as_numpy_dtype)
        return self.add_node(name, "Const", attrs={"dtype": dtype or tf.as_dtype(value.dtype), "value": value},
                             unique=unique)

    def add_input(self, name: str, dtype, shape, *, node_name: str | None = None) -> Node:
        """Add a signature input ``name``: a ``Placeholder`` (called ``node_name``, default ``name``) of
        ``dtype`` and static ``shape`` (``None`` for an unknown dim), bound in ``graph.inputs``."""
        dtype = tf.as_dtype(dtype)
        shape = tuple(shape)
        node = self.add_node(node_name or name, "Placeholder", attrs={"dtype": dtype, "shape": shape},
                             dtypes=[dtype], shapes=[shape])
        self.inputs.append(SignatureArg(name, node.output(0)))
        return node

    def rename_node(self, old: str, new: str) -> None:
        """Rename node ``old`` to ``new`` keeping its edges (a Weight node's weight is renamed too)."""
        self.rename_nodes({old: new})

    def rename_nodes(self, mapping: dict) -> None:
        """Rename several nodes at once (``{old: new}``), keeping edges and signature bindings. The new
        names must be free (or freed by the same renaming)."""
        mapping = {o: n for o, n in mapping.items() if o != n}
        if not mapping:
            return
        for old in mapping:
            self.node(old)  # KeyError naming it
        kept = set(self._g.nodes) - set(mapping)
        clash = sorted(n for n in mapping.values() if n in kept)
        if clash or len(set(mapping.values())) != len(mapping):
            raise ValueError(f"cannot rename: name(s) {clash or sorted(mapping.values())} already taken")
        nx.relabel_nodes(self._g, mapping, copy=False)
        for old, new in mapping.items():
            node = self._g.nodes[new]["node"]
            node.name = new
            if node.op == WEIGHT_OP and old in self.weights:
                w = self.weights.pop(old)
                w.name = new
                self.weights[new] = w
        for arg in self.inputs + self.outputs:
            if arg.tensor.node in mapping:
                arg.tensor = Tensor(mapping[arg.tensor.node], arg.tensor.port)

    # ------------------------------------------------------------------ weights
    def add_weight(self, name: str, value: np.ndarray, trainable: bool = True, unique: bool = False) -> Node:
        """Add a weight and the ``Weight`` node that reads it; returns the node."""
        value = np.asarray(value)
        if unique:
            name = self.unique_name(name)
        node = self.add_node(name, WEIGHT_OP, dtypes=[tf.as_dtype(value.dtype)], shapes=[tuple(value.shape)])
        self.weights[name] = Weight(name, value, trainable)
        return node

    def weight(self, name: str) -> Weight:
        try:
            return self.weights[name]
        except KeyError:
            raise KeyError(f"no weight named {name!r}") from None

    def set_weight(self, name: str, value: np.ndarray, trainable: bool | None = None) -> None:
        """Replace a weight's value (its shape may change; shapes downstream re-infer)."""
        w = self.weight(name)
        value = np.asarray(value)
        w.value = value
        if trainable is not None:
            w.trainable = trainable
        n = self.node(name)
        n.dtypes = [tf.as_dtype(value.dtype)]
        n.shapes = [tuple(value.shape)]

    # ------------------------------------------------------------------ whole-graph
    def copy(self) -> "Graph":
        """A deep copy of the structure. Weight arrays are shared: passes replace them, never mutate."""
        g = Graph.__new__(Graph)
        g._g = nx.MultiDiGraph()
        for name, data in self._g.nodes(data=True):
            n = data["node"]
            g._g.add_node(name, node=Node(n.name, n.op, dict(n.attrs), n.device, list(n.dtypes), list(n.shapes)))
        g._g.add_edges_from((u, v, dict(d)) for u, v, d in self._g.edges(data=True))
        g.weights = {k: Weight(w.name, w.value, w.trainable) for k, w in self.weights.items()}
        g.inputs = [SignatureArg(a.name, a.tensor) for a in self.inputs]
        g.outputs = [SignatureArg(a.name, a.tensor) for a in self.outputs]
        g.signature_name = self.signature_name
        g.functions = dict(self.functions)
        g.assets = dict(self.assets)
        g.meta = _copy.deepcopy(self.meta)
        g._uid = itertools.count()
        return g

    def restore(self, snapshot: "Graph") -> None:
        """Make this graph, in place, equal to ``snapshot`` (an earlier :meth:`copy`), which stays
        usable. The pass manager's rollback of a failed pass: ``saved = g.copy()`` ... ``g.restore(saved)``."""
        self.__dict__.update(snapshot.copy().__dict__)

    def ancestors(self, names: Iterable[str]) -> set[str]:
        """Every node that ``names`` depend on (data or control), including themselves."""
        return self._reach(names, nx.ancestors)

    def descendants(self, names: Iterable[str]) -> set[str]:
        """Every node that depends on ``names`` (data or control), including themselves."""
        return self._reach(names, nx.descendants)

    def post_dominators(self, source: str) -> list[str]:
        """The nodes that every data path from node ``source`` to the signature outputs passes through,
        nearest first (``source`` itself excluded): the points where all of the model's information
        flows through one tensor (a chain's layers, the residual stream between blocks)."""
        sink = "\0outputs"
        rev = nx.DiGraph()
        for src, dst, data in self._g.edges(data=True):
            if not data.get("control"):
                rev.add_edge(dst, src)
        for a in self.outputs:
            rev.add_edge(sink, as_tensor(a.tensor).node)
        if source not in rev or sink not in rev:
            return []
        ipdom = nx.immediate_dominators(rev, sink)
        chain, node = [], source
        while node in ipdom and ipdom[node] != node:
            node = ipdom[node]
            if node == sink:
                break
            chain.append(node)
        return chain

    def _reach(self, names: Iterable[str], step) -> set[str]:
        out = set()
        for n in names:
            if n not in out:
                out |= step(self._g, n)
                out.add(n)
        return out

    def live_nodes(self) -> set[str]:
        """Names of the nodes the signature outputs need (plus the signature's input Placeholders)."""
        live = self.ancestors(a.tensor.node for a in self.outputs)
        live.update(a.tensor.node for a in self.inputs)
        return live

    def remove_dead_nodes(self) -> list[str]:
        """Remove every node no signature output needs (keeping input Placeholders); returns their
        names. Weights read only by dead nodes leave the weight table."""
        live = self.live_nodes()
        dead = [n for n in self._g.nodes if n not in live]
        for name in dead:
            if self.node(name).op == WEIGHT_OP:
                self.weights.pop(name, None)
        self._g.remove_nodes_from(dead)
        return dead

    def infer_shapes(self) -> None:
        """Re-infer every output dtype and static shape (TensorFlow's own shape functions; runs no
        computation). Raises VerificationError naming the node whose shapes conflict."""
        from graphslim.ir.tfconv import infer_shapes

        infer_shapes(self)

    def verify(self) -> None:
        """Check the invariants; raise VerificationError saying which one broke and where.

        Acyclic; every input edge comes from an existing node and an output port in range; data input
        ports are contiguous; each weight has one Weight node whose shape matches; signature tensors
        exist; shapes re-infer without conflict (which also checks weights against the ops using them).
        """
        self.topo_order()  # raises on cycles
        for name, data in self._g.nodes(data=True):
            node = data.get("node")
            if node is None or node.name != name:
                raise VerificationError(f"node {name!r} has no op (an input refers to a node that does not exist)")
            ports = sorted(d["dst_port"] for _, _, d in self._g.in_edges(name, data=True) if not d.get("control"))
            if ports != list(range(len(ports))):
                raise VerificationError(f"node {name!r} ({node.op}) has input ports {ports}; they must be 0..n-1")
            if node.op == WEIGHT_OP and name not in self.weights:
                raise VerificationError(f"Weight node {name!r} has no entry in the weight table")
        for wname, w in self.weights.items():
            if not self.has_node(wname) or self.node(wname).op != WEIGHT_OP:
                raise VerificationError(f"weight {wname!r} has no Weight node reading it")
        for arg in self.inputs + self.outputs:
            if not self.has_node(arg.tensor.node):
                raise VerificationError(f"signature tensor {arg.name!r} refers to missing node {arg.tensor.node!r}")
        from graphslim.ir.functions import graph_closure

        _, missing = graph_closure(self)
        if missing:
            raise VerificationError(f"the graph calls function(s) {', '.join(map(repr, missing[:5]))} (While/If/"
                                    "Case bodies or calls), which are not in graph.functions")
        self.infer_shapes()
        for name, data in self._g.nodes(data=True):
            node = data["node"]
            for _, dst, d in self._g.out_edges(name, data=True):
                if not d.get("control") and d["src_port"] >= node.num_outputs:
                    raise VerificationError(
                        f"node {dst!r} reads output {d['src_port']} of {name!r} ({node.op}), "
                        f"which has only {node.num_outputs} outputs")
            if node.op == WEIGHT_OP and tuple(self.weights[name].value.shape) != tuple(node.shapes[0]):
                raise VerificationError(f"weight {name!r} has shape {self.weights[name].value.shape} "
                                        f"but its node says {node.shapes[0]}")
        for arg in self.inputs + self.outputs:
            n = self.node(arg.tensor.node)
            if arg.tensor.port >= n.num_outputs:
                raise VerificationError(f"signature tensor {arg.name!r} is {arg.tensor}, but {n.name!r} ({n.op}) "
                                        f"has only {n.num_outputs} outputs")
        names = [a.name for a in self.outputs]
        if len(set(names)) != len(names):
            raise VerificationError(f"signature output names are not unique: {names}")

    def cost(self):
        """Params and MACs (per example) per node and in total."""
        from graphslim.analysis.cost import graph_cost

        return graph_cost(self)

    def format(self) -> str:
        """The graph as readable text, one node a line, in topological order: ``name = Op(inputs)
        {attrs} -> dtype[shape]``. An input is ``node`` (port 0), ``node:1`` or ``^node`` (control);
        attributes starting with ``_`` are left out and long values elided; weights say whether they
        are trainable; the signature's outputs close the graph.

        Example::

            print(graph.format())
            # graph serving_default (3 nodes, 1 weights) {
            #   x = Placeholder() {dtype=float32, shape=[?,4]} -> float32[?,4]
            #   w = Weight() -> float32[4,2]  // trainable
            #   y = MatMul(x, w) {T=float32, transpose_a=false, transpose_b=false} -> float32[?,2]
            #   return {logits: y}
            # }
        """
        lines = [f"graph {self.signature_name} ({len(self)} nodes, {len(self.weights)} weights) {{"]
        for node in self.topo_order():
            args = [_tensor_text(t) for t in self.inputs_of(node)]
            args += [f"^{name}" for name in self.control_inputs_of(node)]
            attrs = ", ".join(f"{key}={_value_text(node.attr(key))}" for key in sorted(node.attrs)
                              if not key.startswith("_"))
            outputs = [_type_text(d, s) for d, s in zip(node.dtypes, node.shapes)]
            line = f"  {node.name} = {node.op}({', '.join(args)})"
            line += f" {{{attrs}}}" if attrs else ""
            if len(outputs) == 1:
                line += f" -> {outputs[0]}"
            elif outputs:
                line += f" -> ({', '.join(outputs)})"
            if node.name in self.weights:
                line += "  // trainable" if self.weights[node.name].trainable else "  // not trainable"
            lines.append(line)
        results = ", ".join(f"{arg.name}: {_tensor_text(arg.tensor)}" for arg in self.outputs)
        lines.append(f"  return {{{results}}}")
        if self.functions:
            lines.append(f"  // functions: {', '.join(sorted(self.functions))}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        ops: dict[str, int] = {}
        for n in self._g.nodes.values():
            ops[n["node"].op] = ops.get(n["node"].op, 0) + 1
        return f"Graph({len(self)} nodes, {len(self.weights)} weights, ops={dict(sorted(ops.items()))})"

    def __repr__(self) -> str:
        return self.summary()


_MAX_VALUE = 60  # characters of one attribute value in format() before it is elided


def _tensor_text(tensor: Tensor) -> str:
    return tensor.node if tensor.port == 0 else f"{tensor.node}:{tensor.port}"


def _type_text(dtype, shape) -> str:
    name = getattr(dtype, "name", str(dtype))
    if shape is None:
        return f"{name}[*]"
    return f"{name}[{','.join('?' if d is None else str(d) for d in shape)}]"


def _value_text(value) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, bytes)):
        text = repr(value) if isinstance(value, bytes) else f'"{value}"'
    elif isinstance(value, tuple):  # a shape
        text = "[" + ",".join("?" if d is None else str(d) for d in value) + "]"
    elif isinstance(value, list):
        text = "[" + ",".join(_value_text(v) for v in value) + "]"
    elif isinstance(value, np.ndarray):
        if value.size <= 8:
            text = f"{value.dtype}{list(value.shape)}:{value.tolist()}"
        else:
            text = f"tensor<{value.dtype}[{','.join(map(str, value.shape))}]>"
    elif isinstance(value, tf.DType):
        text = value.name
    else:
        text = str(value)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 3] + "..."
