"""The function library beside the graph: which functions a node calls, their closure, and turning
variable handles passed into functional control flow into plain values.

Functional control flow (``While``, ``If``, ``Case``, their ``Stateless`` forms, and function-call
ops inside their bodies) keeps its bodies as ``FunctionDef``s referenced from ``func`` and
``list(func)`` attrs (or, for a direct call, the op type itself). The IR keeps those functions in
``graph.functions``; :func:`closure` says which ones a set of nodes needs, transitively, and the
emitter writes exactly that set.

TensorFlow passes a variable into a loop body or a branch as a *resource handle* that the body
reads with ``ReadVariableOp``. graphslim's weights are values, not handles, so
:func:`specialize_resource_args` rewrites such a call: the handle argument becomes a value argument
of the variable's dtype and shape, and every read of it inside the body (and in bodies it passes the
handle on to, at any depth) becomes that value. A loop body that returns the handle unchanged
(a loop invariant) returns the value instead. Anything else done with a handle in a body (assigning
the variable, returning it from a branch) is refused with the function and node named.

Example::

    from graphslim.ir.functions import closure, node_refs

    used = closure(set().union(*(node_refs(nd, library) for nd in graph_def.node)), library)
"""

from __future__ import annotations

import hashlib

from graphslim.errors import LoadError

__all__ = ["CALL_INPUTS", "attr_refs", "node_refs", "closure", "graph_closure", "specialize_resource_args",
           "rename_library", "fingerprint", "attrs_fingerprint"]

DT_RESOURCE = 20

# Functional ops: the attr listing the input types, the func attrs whose functions take the inputs
# (``None`` for a ``list(func)`` attr), how many leading inputs are not function arguments, and
# whether the functions also *return* the arguments (loop carried values).
CALL_INPUTS = {
    "While": ("T", ("cond", "body"), 0, True),
    "StatelessWhile": ("T", ("cond", "body"), 0, True),
    "If": ("Tin", ("then_branch", "else_branch"), 1, False),
    "StatelessIf": ("Tin", ("then_branch", "else_branch"), 1, False),
    "Case": ("Tin", ("branches",), 1, False),
    "StatelessCase": ("Tin", ("branches",), 1, False),
    "PartitionedCall": ("Tin", ("f",), 0, False),
    "StatefulPartitionedCall": ("Tin", ("f",), 0, False),
}


def attr_refs(attr_map, library) -> set[str]:
    """Function names in ``func``/``list(func)`` attrs; with ``library=None`` every name, else only
    those in ``library``."""
    out, stack, seen = set(), list(attr_map.values()), 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > 100_000:
            break
        kind = v.WhichOneof("value")
        if kind == "func":
            if library is None or v.func.name in library:
                out.add(v.func.name)
            stack.extend(v.func.attr.values())
        elif kind == "list":
            for f in v.list.func:
                if library is None or f.name in library:
                    out.add(f.name)
                stack.extend(f.attr.values())
    return out


def node_refs(nd, library) -> set[str]:
    """Names of the library functions a NodeDef calls: its op type when that names a function, and
    the functions in its ``func`` / ``list(func)`` attrs (nested attrs of those included). For the
    functional ops of :data:`CALL_INPUTS` every function named counts, in the library or not (a
    missing body is a broken model, not an op name)."""
    out = attr_refs(nd.attr, None if nd.op in CALL_INPUTS else library)
    if nd.op in library:
        out.add(nd.op)
    return out


def closure(roots, library) -> set[str]:
    """``roots`` and every function they call, transitively. Names missing from ``library`` stay in
    the result: ``closure(...) - set(library)`` is what a model would need but lacks."""
    seen, stack = set(), list(roots)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        fdef = library.get(name)
        if fdef is not None:
            for nd in fdef.node_def:
                stack.extend(node_refs(nd, library) - seen)
    return seen


def graph_closure(graph) -> tuple[dict, list]:
    """``({name: FunctionDef}, missing names)`` of every function the IR graph's nodes need."""
    library = graph.functions or {}
    roots = set()
    for node in graph.nodes():
        roots |= node_refs(_AttrView(node), library)
    used = closure(roots, library)
    return {n: library[n] for n in sorted(used) if n in library}, sorted(used - set(library))


class _AttrView:
    """What node_refs reads of an IR node (op type and attr protos)."""

    def __init__(self, node):
        self.op = node.op
        self.attr = node.attrs


def specialize_resource_args(nd, values: dict, library: dict, where: str) -> None:
    """Rewrite the functional NodeDef ``nd`` so that argument positions ``values`` (input index →
    ``(dtype enum, shape tuple)``) carry a variable's value instead of its handle.

    New functions (named ``<name>_gs<hash>``) are added to ``library``; ``nd``'s type and shape attrs
    and its func attrs are updated in place. Raises LoadError naming the function and node when a
    body does something with the handle other than reading it or passing it on."""
    _Specializer(library, where).call_site(nd, values)


class _Specializer:
    def __init__(self, library: dict, where: str):
        self.library = library
        self.where = where

    # ------------------------------------------------------------------ call sites
    def call_site(self, nd, values: dict, fname: str | None = None) -> None:
        """``nd`` is a node (outer or inside function ``fname``) whose inputs at ``values`` become values."""
        if nd.op in CALL_INPUTS:
            type_attr, func_attrs, offset, loop = CALL_INPUTS[nd.op]
        elif nd.op in self.library:
            type_attr, func_attrs, offset, loop = None, (), 0, False
        else:
            raise self._refuse(nd, fname, "is not a function call")
        args = {i - offset: v for i, v in values.items() if i >= offset}
        if len(args) != len(values):
            raise self._refuse(nd, fname, "takes a variable handle as its condition or branch index")
        if type_attr is not None:
            types = nd.attr[type_attr].list.type
            for a, (dtype, _) in args.items():
                if a >= len(types) or types[a] != DT_RESOURCE:
                    raise self._refuse(nd, fname, f"declares input {a + offset} as another type than a resource")
                types[a] = dtype
        if loop and "output_shapes" in nd.attr:
            shapes = nd.attr["output_shapes"].list.shape
            for a, (_, shape) in args.items():
                if a < len(shapes):
                    _set_shape(shapes[a], shape)
        if nd.op in self.library:  # a direct call: the op type is the function
            nd.op = self.function(nd.op, args, returns=False, caller=(nd.name, fname))
        for attr in func_attrs:
            v = nd.attr[attr]
            funcs = [v.func] if v.WhichOneof("value") == "func" else list(v.list.func)
            for f in funcs:
                f.name = self.function(f.name, args, returns=loop, caller=(nd.name, fname))
        for key in ("_read_only_resource_inputs",):
            if key in nd.attr:
                del nd.attr[key]

    # ------------------------------------------------------------------ functions
    def function(self, name: str, args: dict, returns: bool, caller) -> str:
        """The name of ``name`` specialized so that argument positions ``args`` are values."""
        fdef = self.library.get(name)
        if fdef is None:
            raise LoadError(f"{self.where}: node {caller[0]!r} calls function {name!r}, which is not in the "
                            f"function library. The SavedModel is incomplete; re-export it.")
        key = repr(sorted((a, d, s) for a, (d, s) in args.items())) + repr(returns)
        new_name = f"{name}_gs{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        if new_name in self.library:
            return new_name
        new = type(fdef)()
        new.CopyFrom(fdef)
        new.signature.name = new_name
        self.library[new_name] = new  # first, so that a (malformed) recursive call terminates
        arg_defs = new.signature.input_arg
        value_names = {}
        for a, (dtype, shape) in args.items():
            if a >= len(arg_defs) or arg_defs[a].type != DT_RESOURCE:
                raise LoadError(f"{self.where}: node {caller[0]!r} passes a variable handle as argument {a} "
                                f"of function {name!r}, which does not take a resource there; the model "
                                f"is corrupt.")
            arg_defs[a].type = dtype
            arg_defs[a].ClearField("handle_data")
            arg_defs[a].ClearField("experimental_full_type")
            if a in new.arg_attr:
                keep = {k: v for k, v in new.arg_attr[a].attr.items() if k == "_user_specified_name"}
                new.arg_attr[a].attr.clear()
                for k, v in keep.items():
                    new.arg_attr[a].attr[k].CopyFrom(v)
            if a in new.resource_arg_unique_id:
                del new.resource_arg_unique_id[a]
            if "_input_shapes" in new.attr and a < len(new.attr["_input_shapes"].list.shape):
                _set_shape(new.attr["_input_shapes"].list.shape[a], shape)
            value_names[arg_defs[a].name] = (dtype, shape)
        self._rewrite_body(new, name, value_names, returns)
        # Cached shapes were the handles' (scalars) and what was inferred from them: stale now.
        for nd in new.node_def:
            if "_output_shapes" in nd.attr:
                del nd.attr["_output_shapes"]
        for a in new.arg_attr.values():
            if "_output_shapes" in a.attr:
                del a.attr["_output_shapes"]
        return new_name

    def _rewrite_body(self, fdef, orig: str, values: dict, returns: bool) -> None:
        """Inside ``fdef``: tensors named in ``values`` (arg names, or ``node:output:i`` refs) hold the
        variable's value now. Reads become Identity, handle Identities carry the value, calls are
        specialized in turn."""
        known = dict(values)  # ref -> (dtype, shape), growing as handles flow through the body
        renamed = {}  # old ref "read:value:0" -> new ref "read:output:0"
        pending = list(values)
        while pending:
            ref = pending.pop()
            dtype, shape = known[ref]
            for nd in list(fdef.node_def):
                ports = [i for i, t in enumerate(nd.input) if _ref(t) == ref]
                if not ports:
                    continue
                if nd.op == "ReadVariableOp":
                    nd.op = "Identity"
                    nd.attr.clear()
                    nd.attr["T"].type = dtype
                    renamed[f"{nd.name}:value:0"] = f"{nd.name}:output:0"
                elif nd.op == "ResourceGather":
                    self._gather(fdef, nd, dtype)
                elif nd.op == "Identity" and nd.attr["T"].type == DT_RESOURCE:
                    nd.attr["T"].type = dtype
                    known[f"{nd.name}:output:0"] = (dtype, shape)
                    pending.append(f"{nd.name}:output:0")
                elif nd.op in CALL_INPUTS or nd.op in self.library:
                    data = [i for i, t in enumerate(nd.input) if not t.startswith("^")]
                    self.call_site(nd, {data.index(p): (dtype, shape) for p in ports}, fdef.signature.name)
                    if nd.op in ("While", "StatelessWhile"):  # a loop invariant comes out unchanged
                        for p in ports:
                            out = f"{nd.name}:output:{data.index(p)}"
                            known[out] = (dtype, shape)
                            pending.append(out)
                else:
                    raise LoadError(
                        f"{self.where}: function {orig!r} node {nd.name!r} ({nd.op}) uses a variable "
                        f"passed in as a resource handle in a way graphslim cannot turn into a weight "
                        f"read (only reads, gathers and passing it on to While/If/Case bodies are "
                        f"supported; a model that assigns variables while serving cannot be rewritten).")
        for nd in fdef.node_def:
            for i, t in enumerate(nd.input):
                if t in renamed:
                    nd.input[i] = renamed[t]
        for out in fdef.signature.output_arg:
            ret = renamed.get(fdef.ret.get(out.name, ""), fdef.ret.get(out.name, ""))
            fdef.ret[out.name] = ret
            if _ref(ret) in known:
                if not returns:
                    raise LoadError(f"{self.where}: function {orig!r} returns a variable handle (output "
                                    f"{out.name!r}); graphslim cannot turn it into a weight read.")
                out.type = known[_ref(ret)][0]
                out.ClearField("handle_data")
                out.ClearField("experimental_full_type")

    def _gather(self, fdef, nd, dtype) -> None:
        batch_dims = nd.attr["batch_dims"].i if "batch_dims" in nd.attr else 0
        tind = nd.attr["Tindices"].type
        axis = f"{nd.name}/gs_axis"
        const = fdef.node_def.add()
        const.name = axis
        const.op = "Const"
        const.attr["dtype"].type = 3  # int32
        const.attr["value"].tensor.dtype = 3
        const.attr["value"].tensor.int_val.append(0)
        nd.op = "GatherV2"
        nd.attr.clear()
        nd.attr["Tparams"].type = dtype
        nd.attr["Tindices"].type = tind
        nd.attr["Taxis"].type = 3
        nd.attr["batch_dims"].i = batch_dims
        data = [t for t in nd.input if not t.startswith("^")]
        ctrl = [t for t in nd.input if t.startswith("^")]
        del nd.input[:]
        nd.input.extend(data[:2] + [f"{axis}:output:0"] + ctrl)

    def _refuse(self, nd, fname, why: str) -> LoadError:
        place = f" in function {fname!r}" if fname else ""
        return LoadError(f"{self.where}: node {nd.name!r} ({nd.op}){place} receives a variable handle but "
                         f"{why}; graphslim can only turn handles passed into While/If/Case bodies and "
                         f"function calls into weight reads.")


def _ref(text: str) -> str:
    """A FunctionDef input string without a trailing ``:0`` of a bare argument name."""
    if text.startswith("^"):
        return text
    parts = text.split(":")
    if len(parts) == 2 and parts[1] == "0":
        return parts[0]
    return text


def _set_shape(proto, shape) -> None:
    proto.Clear()
    if shape is None:
        proto.unknown_rank = True
        return
    for d in shape:
        proto.dim.add().size = -1 if d is None else int(d)


def rename_library(graph_def, suffix: str) -> None:
    """Give every function of ``graph_def``'s library a new name (``<name>_<suffix>``) and rewrite
    every reference (func attrs, nested; direct calls by op type) in the graph and in the functions.
    TensorFlow keeps one function per name for the whole process: a model traced in the same process
    (a user who saves a model and slims it in one script) may hold other functions of those names."""
    names = {f.signature.name for f in graph_def.library.function}
    if not names:
        return
    new = {n: f"{n}_{suffix}" for n in names}

    def fix_attrs(attr_map):
        stack = list(attr_map.values())
        while stack:
            v = stack.pop()
            kind = v.WhichOneof("value")
            if kind == "func":
                if v.func.name in new:
                    v.func.name = new[v.func.name]
                stack.extend(v.func.attr.values())
            elif kind == "list":
                for f in v.list.func:
                    if f.name in new:
                        f.name = new[f.name]
                    stack.extend(f.attr.values())

    def fix_node(nd):
        if nd.op in new:
            nd.op = new[nd.op]
        fix_attrs(nd.attr)

    for nd in graph_def.node:
        fix_node(nd)
    for f in graph_def.library.function:
        f.signature.name = new[f.signature.name]
        for nd in f.node_def:
            fix_node(nd)
    for g in graph_def.library.gradient:
        if g.function_name in new:
            g.function_name = new[g.function_name]


def _named_refs_to_fingerprints(attr_map, library, memo) -> None:
    """Replace, in place, every function name in ``func``/``list(func)`` attrs (nested) that
    ``library`` defines by ``fp:<its fingerprint>``."""
    stack = list(attr_map.values())
    while stack:
        v = stack.pop()
        kind = v.WhichOneof("value")
        if kind == "func":
            if v.func.name in library:
                v.func.name = "fp:" + fingerprint(v.func.name, library, memo)
            stack.extend(v.func.attr.values())
        elif kind == "list":
            for f in v.list.func:
                if f.name in library:
                    f.name = "fp:" + fingerprint(f.name, library, memo)
                stack.extend(f.attr.values())


def fingerprint(name: str, library: dict, memo: dict | None = None) -> str:
    """A hash of function ``name`` of ``library`` that ignores the names a trace gives (its own, its
    arguments', nodes' and outputs': by position instead) and the names of the functions it calls
    (replaced by their own fingerprints): two traces of the same code (a loop body per class of a
    post-processing unrolled in Python) have the same fingerprint. Example::

        fingerprint("while_body_12", graph.functions) == fingerprint("while_body_57", graph.functions)
    """
    memo = {} if memo is None else memo
    if name in memo:
        return memo[name] or f"recursive:{name}"
    memo[name] = None  # a cycle hashes by name
    fdef = type(library[name])()
    fdef.CopyFrom(library[name])
    sig = fdef.signature
    sig.name = ""
    # local names (arguments, nodes, outputs) by position: traces name them after their call site
    ren = {}
    for i, a in enumerate(sig.input_arg):
        ren[a.name], a.name = f"a{i}", f"a{i}"
    for i, nd in enumerate(fdef.node_def):
        ren[nd.name], nd.name = f"n{i}", f"n{i}"

    def local(ref: str) -> str:
        ctrl = ref.startswith("^")
        head, sep, tail = ref.lstrip("^").partition(":")
        return ("^" if ctrl else "") + ren.get(head, head) + sep + tail

    for arg in fdef.arg_attr.values():
        arg.attr.pop("_user_specified_name", None)
    for nd in fdef.node_def:
        nd.attr.pop("_user_specified_name", None)
        nd.input[:] = [local(r) for r in nd.input]
        if nd.op in library:
            nd.op = "fp:" + fingerprint(nd.op, library, memo)
        _named_refs_to_fingerprints(nd.attr, library, memo)
    outs = {a.name: f"o{i}" for i, a in enumerate(sig.output_arg)}
    for a in sig.output_arg:
        a.name = outs[a.name]
    ret = {outs.get(k, k): local(v) for k, v in fdef.ret.items()}
    fdef.ret.clear()
    fdef.ret.update(ret)
    ctl = {c: f"c{i}" for i, c in enumerate(sig.control_output)}
    sig.control_output[:] = [ctl[c] for c in sig.control_output]
    cret = {ctl.get(k, k): ren.get(v, v) for k, v in fdef.control_ret.items()}
    fdef.control_ret.clear()
    fdef.control_ret.update(cret)
    memo[name] = hashlib.sha256(fdef.SerializeToString(deterministic=True)).hexdigest()[:32]
    return memo[name]


def attrs_fingerprint(attrs: dict, library: dict, memo: dict | None = None, skip=("_class",)) -> str:
    """A hash of a node's attrs (``{name: AttrValue}``) with the functions they name replaced by
    their :func:`fingerprint`; attrs in ``skip`` (colocation names) are left out."""
    memo = {} if memo is None else memo
    h = hashlib.sha256()
    for key in sorted(attrs):
        if key in skip:
            continue
        v = type(attrs[key])()
        v.CopyFrom(attrs[key])
        _named_refs_to_fingerprints({key: v}, library or {}, memo)
        h.update(key.encode() + b"=" + v.SerializeToString(deterministic=True) + b";")
    return h.hexdigest()[:32]
