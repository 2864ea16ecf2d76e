"""Function inlining for the loader: every ``PartitionedCall`` / ``StatefulPartitionedCall`` (and direct
function-call op) the signature makes, recursively, into one flat list of NodeDefs.

FunctionDef tensor names ``node:out_arg:i`` are flattened with each op's OpDef (our own converter:
TensorFlow's ``function_def_to_graph_def`` requires functions registered in the eager context). Before
anything is inlined the call graph is checked: no recursion, no nesting deeper than 64 levels, no call
pattern whose inlined size explodes. Used by :mod:`graphslim.io.loader`::

    inliner = FunctionInliner(path, meta.graph_def, library, nodes)
    inliner.check_size(needed)
    node_defs, aliases = inliner.flatten(needed)
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

from graphslim.errors import LoadError
from graphslim.ir.tfconv import parse_input
from graphslim.io.reader import check_node_def, const_limit

CALL_OPS = {"PartitionedCall", "StatefulPartitionedCall"}
_MAX_INLINE_DEPTH = 64
_MAX_INLINED_NODES = 200_000  # at least; scaled with the file's own node count (see FunctionInliner)
_MAX_OUTPUT_ARGS = 100_000


class FunctionInliner:
    """Inlines the function calls of the SavedModel at ``path`` (its ``graph_def``; ``library`` its
    FunctionDefs by name, ``nodes`` its outer NodeDefs by name). At most 200,000 nodes come out, or 20
    times the file's own node count when that is more.

    Example::

        inliner = FunctionInliner(path, meta.graph_def, library, nodes)
        inliner.check_size(needed)                 # LoadError on recursion or an exploding pattern
        node_defs, aliases = inliner.flatten(needed)
    """

    def __init__(self, path: Path, graph_def, library: dict, nodes: dict):
        self.path = path
        self.library = library
        self.nodes = nodes
        self._fn_cache: dict = {}
        self._const_limit = const_limit(path)
        self._node_budget = max(_MAX_INLINED_NODES, 20 * (len(graph_def.node) + sum(
            len(f.node_def) for f in graph_def.library.function)))

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

    def check_size(self, needed) -> None:
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

    def flatten(self, needed):
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
