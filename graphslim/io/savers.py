"""The checkpoint machinery as :mod:`graphslim.io.scan` recognises it: second savers and restore prefixes.

**Restore prefixes.** A restore op (``RestoreV2``, and TF1's ``Restore``/``RestoreSlice``) reads the
checkpoint whose file prefix is its first input. TensorFlow's loader restores a SavedModel by feeding
``saver_def.filename_tensor_name`` (TF1: ``save/Const:0``; TF2: ``saver_filename:0``, passed to
``__inference__traced_restore_N`` as its ``file_prefix`` argument) with the path of the model's own
``variables/variables`` and running ``saver_def.restore_op_name``. A restore op of the machinery whose
prefix is anything else (a constant ``"/etc/passwd"`` or ``"../../other_model/variables"``, the unfed
default behind ``save/Const``, a string computed in the graph) would read another file whenever the
model is restored: :func:`restore_prefix_problems` names every such op. The prefix must be exactly
that tensor, through ``Identity`` nodes only; inside a library function it must be an argument that
*every* call of the function passes such a prefix (``PartitionedCall``/``StatefulPartitionedCall`` or a
direct call; a function referenced any other way, e.g. as a ``While`` body, or called by the loader
with tensors, as the object graph's saveable functions are, gets no prefix).

**Second savers** (see the :mod:`graphslim.io.scan` docstring): :func:`second_savers` decides which
checkpoint ops outside the declared saver are a second copy of it, left by restoring a checkpoint
before writing the model; their restore ops must read the scope's own filename input
(``<scope>/Const:0``, what ``Saver.restore`` feeds).

Neither imports TensorFlow: both read ``NodeDef``/``FunctionDef`` protos.
"""

from __future__ import annotations

__all__ = ["PREFIX_READERS", "restore_prefix_problems", "second_savers"]

# ------------------------------------------------------------------------------------ second savers
_VARIABLE_OPS = frozenset({"VariableV2", "Variable", "VarHandleOp"})
_READ_OPS = frozenset({"Identity", "ReadVariableOp"})
_ASSIGN_OPS = frozenset({"Assign", "AssignVariableOp"})
_SAVE_DATA_START = {"SaveV2": 3, "SaveSlices": 3}  # first saved tensor among the data inputs
_RESTORE_OPS = frozenset({"RestoreV2"})
_FILENAME_OPS = frozenset({"Const", "PlaceholderWithDefault", "Identity", "StaticRegexFullMatch",
                           "Select", "SelectV2", "StringJoin", "ShardedFilename", "ShardedFilespec",
                           "Pack"})
_HANDLE_USERS = _READ_OPS | {"DisableCopyOnRead"}  # may take a variable from outside the saver
_SAVER_OPS = (_FILENAME_OPS | _HANDLE_USERS | _ASSIGN_OPS | set(_SAVE_DATA_START) | _RESTORE_OPS
              | {"MergeV2Checkpoints", "NoOp"})
_DT_STRING = 7


def _split_input(text: str) -> tuple[str, int]:
    """``"node:2"`` → ("node", 2); ``"node"`` → ("node", 0); control inputs → (name, -1)."""
    if text.startswith("^"):
        return text[1:], -1
    base, sep, port = text.rpartition(":")
    return (base, int(port)) if sep and port.isdigit() else (text, 0)


def _data_inputs(nd) -> list[str]:
    return [t for t in nd.input if not t.startswith("^")]


def _consumers(nodes: dict) -> dict:
    """{node: [(consumer, output port or -1 for control, input index)]} of the outer graph."""
    out: dict = {}
    for name, nd in nodes.items():
        for i, text in enumerate(nd.input):
            src, port = _split_input(text)
            out.setdefault(src, []).append((name, port, i))
    return out


def _scope(name: str) -> str:
    return name.rpartition("/")[0]


def _variable_of(nodes: dict, text: str, hops: int = 4) -> str | None:
    """The variable node whose value tensor ``text`` is (the variable itself, or ``Identity`` /
    ``ReadVariableOp`` reads of it), or None."""
    for _ in range(hops + 1):
        name, port = _split_input(text)
        nd = nodes.get(name)
        if nd is None or port != 0:
            return None
        if nd.op in _VARIABLE_OPS:
            return name
        data = _data_inputs(nd)
        if nd.op not in _READ_OPS or len(data) != 1:
            return None
        text = data[0]
    return None


def _is_variable(nodes: dict, text: str) -> bool:
    name, port = _split_input(text)
    return port == 0 and name in nodes and nodes[name].op in _VARIABLE_OPS


def _string_const(nodes: dict, text: str, members) -> list[str] | None:
    name, port = _split_input(text)
    nd = nodes.get(name)
    if nd is None or port != 0 or name not in members or nd.op != "Const":
        return None
    value = nd.attr["value"].tensor if "value" in nd.attr else None
    if value is None or value.dtype != _DT_STRING:
        return None
    return [v.decode("utf-8", "replace") for v in value.string_val]


def _filename_problem(nodes: dict, text: str, members, user: str) -> str | None:
    """Why the file name ``user`` reads from ``text`` is not made inside its saver (None when it is)."""
    stack, seen = [_split_input(text)[0]], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        nd = nodes.get(name)
        if nd is None or name not in members:
            return f"the file name of {user!r} comes from {name!r}, outside the saver"
        if nd.op not in _FILENAME_OPS:
            return f"the file name of {user!r} comes from {name!r} ({nd.op})"
        stack.extend(_split_input(t)[0] for t in _data_inputs(nd))
    return None


def _restored_into(nodes: dict, consumers: dict, members, restore: str, port: int) -> set | str:
    """The variables output ``port`` of RestoreV2 ``restore`` is assigned to (through Identity), or
    why it is used otherwise."""
    targets, stack, seen = set(), [(restore, port)], set()
    while stack:
        src, src_port = stack.pop()
        for user, p, index in consumers.get(src, ()):
            if p != src_port or (user, index) in seen:
                continue
            seen.add((user, index))
            nd = nodes[user]
            if user not in members:
                return f"{user!r}, outside the saver, uses what {restore!r} restores"
            if nd.op == "Identity":
                stack.append((user, 0))
            elif nd.op in _ASSIGN_OPS and index == 1 and _is_variable(nodes, nd.input[0]):
                targets.add(_split_input(nd.input[0])[0])
            else:
                return f"{restore!r} feeds {user!r} ({nd.op}), not an assignment to a variable"
    return targets


def _read_saver(nodes: dict, consumers: dict, members, filename: str) -> tuple[dict, dict] | str:
    """({(checkpoint key, slice): variable} saved, the same restored) by the save/restore ops among
    ``members`` (restoring from the file name input ``filename``), or why they are not a saver of
    variables."""
    saved, restored = {}, {}
    for name in sorted(members):
        nd = nodes[name]
        data = _data_inputs(nd)
        if nd.op in _SAVE_DATA_START or nd.op in _RESTORE_OPS:
            start = _SAVE_DATA_START.get(nd.op, 3)
            if len(data) < 3:
                return f"{nd.op} {name!r} has {len(data)} inputs"
            problem = _filename_problem(nodes, data[0], members, name)
            if nd.op in _RESTORE_OPS and not problem and _outer_source(nodes, data[0]) != _split_input(filename):
                problem = f"{name!r} restores from {data[0]!r}, not from the saver's file name input {filename!r}"
            if problem:
                return problem
            keys = _string_const(nodes, data[1], members)
            slices = _string_const(nodes, data[2], members)
            if keys is None or slices is None:
                return f"the tensor names or slices of {nd.op} {name!r} are not string constants of the saver"
            if nd.op in _RESTORE_OPS:
                count = len(nd.attr["dtypes"].list.type) if "dtypes" in nd.attr else -1
                if len(data) != 3 or not (len(keys) == len(slices) == count):
                    return f"{nd.op} {name!r} restores {count} tensors under {len(keys)} names"
                for port, key in enumerate(zip(keys, slices)):
                    targets = _restored_into(nodes, consumers, members, name, port)
                    if isinstance(targets, str):
                        return targets
                    if len(targets) != 1:
                        return (f"{nd.op} {name!r} restores {key[0]!r} into {len(targets)} "
                                "variables, not one")
                    var = targets.pop()
                    if restored.setdefault(key, var) != var:
                        return f"{key[0]!r} is restored into two variables"
                continue
            tensors = data[start:]
            if not (len(keys) == len(slices) == len(tensors)):
                return f"{nd.op} {name!r} writes {len(tensors)} tensors under {len(keys)} names"
            for key, text in zip(zip(keys, slices), tensors):
                var = _variable_of(nodes, text)
                if var is None:
                    return f"{nd.op} {name!r} writes {_split_input(text)[0]!r}, which is not a variable"
                if saved.setdefault(key, var) != var:
                    return f"{key[0]!r} is saved from two variables"
        elif nd.op == "MergeV2Checkpoints":
            for text in data:
                problem = _filename_problem(nodes, text, members, name)
                if problem:
                    return problem
    return saved, restored


def _extra_saver_problem(scope: str, nodes: dict, consumers: dict, serving: set, declared) -> str | None:
    """Why name scope ``scope`` is not a second saver of the variables ``declared`` (what
    :func:`_declared_saver` returns) that nothing else uses; None when it is."""
    if not scope:
        return "it is not inside a saver's name scope"
    prefix = scope + "/"
    members = {n for n in nodes if n.startswith(prefix)}
    for name in sorted(members):
        nd = nodes[name]
        if name in serving:
            return f"a signature, init op or collection reaches {name!r}"
        if nd.op not in _SAVER_OPS:
            return f"{name!r} ({nd.op}) is not saver machinery"
        for user, _, _ in consumers.get(name, ()):
            if user not in members:
                return f"{user!r}, outside the saver, uses {name!r}"
        for index, text in enumerate(nd.input):
            src, port = _split_input(text)
            if src in members:
                continue
            if port < 0:
                return f"{name!r} waits on {src!r}, outside the saver"
            if not (nd.op in _SAVE_DATA_START and index >= _SAVE_DATA_START[nd.op]
                    or nd.op in _ASSIGN_OPS and index == 0
                    or nd.op in _HANDLE_USERS) or _variable_of(nodes, text) is None:
                return f"{name!r} reads {src!r}, outside the saver and not a variable"
    read = _read_saver(nodes, consumers, members, f"{scope}/Const:0")
    if isinstance(read, str):
        return read
    saved, restored = read
    if not saved or saved != restored:
        return "it does not save and restore the same variables"
    if isinstance(declared, str):
        return declared
    if saved != declared:
        diff = sorted({key for (key, _), _ in set(saved.items()) ^ set(declared.items())})
        shown = ", ".join(repr(k) for k in diff[:3]) + (", ..." if len(diff) > 3 else "")
        return (f"its {len(saved)} checkpoint entries differ from the {len(declared)} of the "
                f"MetaGraphDef's saver in {shown}")
    return None


def _declared_saver(nodes: dict, consumers: dict, machinery: set, filename: str) -> dict | str:
    """{(checkpoint key, slice): variable} of the declared saver (its nodes ``machinery``, its file name
    input ``filename``), or why it is not one to compare a second saver with."""
    read = _read_saver(nodes, consumers, machinery, filename)
    if isinstance(read, str):
        return f"the MetaGraphDef's own saver is not a plain saver of variables ({read})"
    saved, restored = read
    if not saved or saved != restored:
        return "the MetaGraphDef's own saver does not save and restore the same variables"
    return saved


def second_savers(hits, nodes: dict, saver_roots, serving: set, ckpt_outer: set, where: str, filename: str):
    """(exempt node names, {node: reason refused}, notes) for outer checkpoint ``hits`` outside the
    declared saver (its nodes ``ckpt_outer``, its file name input ``filename``)."""
    consumers = _consumers(nodes)
    declared = _declared_saver(nodes, consumers, ckpt_outer, filename)
    declared_scopes = {_scope(r) for r in saver_roots}
    exempt, reasons, notes = set(), {}, []
    by_scope: dict = {}
    for nd in hits:
        by_scope.setdefault(_scope(nd.name), []).append(nd)
    for scope, members in sorted(by_scope.items()):
        if scope in declared_scopes:
            problem = "it sits in the MetaGraphDef's saver scope but is not part of that saver"
        else:
            problem = _extra_saver_problem(scope, nodes, consumers, serving, declared)
        if problem:
            for nd in members:
                reasons[nd.name] = "a signature, init op or collection reaches it" if nd.name in serving \
                    else f"not a second copy of the MetaGraphDef's saver: {problem}"
            continue
        exempt.update(nd.name for nd in members)
        names = [f"{nd.op} {nd.name!r}" for nd in members]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        place = f"MetaGraphDef {where}: " if where else ""
        own = sorted(declared_scopes)[0] if declared_scopes else ""
        notes.append(f"{place}dropped a second saver {scope!r} ({shown}): no signature or init op "
                     f"reaches it and it saves and restores the same {len(set(declared.values()))} "
                     f"variable(s) as the MetaGraphDef's saver {own!r} (left by restoring a checkpoint "
                     "before writing the model)")
    return exempt, reasons, notes


# ------------------------------------------------------------------------------------ restore prefixes
PREFIX_READERS = frozenset({"RestoreV2", "Restore", "RestoreSlice"})  # data input 0: the file prefix
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
_HOPS = 64  # Identity chains longer than this are not followed (the prefix is then refused)


def _outer_source(nodes: dict, text: str) -> tuple[str, int]:
    """(node, port) of the outer tensor ``text``, through ``Identity`` nodes."""
    name, port = _split_input(text)
    for _ in range(_HOPS):
        nd = nodes.get(name)
        data = _data_inputs(nd) if nd is not None else ()
        if nd is None or nd.op != "Identity" or port != 0 or len(data) != 1:
            break
        name, port = _split_input(data[0])
    return name, port


def _body_source(body: dict, text: str) -> str:
    """The tensor ``text`` of a function body (``node:output:i``, or an argument's bare name), through
    ``Identity`` nodes."""
    for _ in range(_HOPS):
        name, _, out = text.partition(":")
        nd = body.get(name)
        data = _data_inputs(nd) if nd is not None else ()
        if out != "output:0" or nd is None or nd.op != "Identity" or len(data) != 1:
            break
        text = data[0]
    return text


def restore_prefix_problems(nodes: dict, outer, functions: dict, filename: str, refs, entry_functions=()) -> dict:
    """{(function name or None, node name): why} for the restore ops (:data:`PREFIX_READERS`) among the
    outer node names ``outer`` and in the FunctionDefs ``functions`` (by name) whose file prefix is not
    the loader's: ``filename`` (``saver_def.filename_tensor_name``) in the outer graph ``nodes``; in a
    function, an argument every call passes such a prefix. ``refs(node_def)`` names the functions a node
    calls; ``entry_functions`` are called by the loader with tensors (the object graph's saveable
    functions): their arguments are never a prefix."""
    want = _split_input(filename) if filename else None
    bodies = {f: ({nd.name: nd for nd in fd.node_def}, [a.name for a in fd.signature.input_arg])
              for f, fd in functions.items()}
    sites: dict = {f: [] for f in functions}
    for caller, members in [(None, nodes.values())] + [(f, fd.node_def) for f, fd in functions.items()]:
        for nd in members:
            for callee in refs(nd) & sites.keys():
                sites[callee].append((caller, nd))
    ok = {f: set() if f in entry_functions or not sites[f] else set(range(len(bodies[f][1]))) for f in functions}

    def is_prefix(caller, text: str) -> bool:
        if caller is None:
            return want is not None and _outer_source(nodes, text) == want
        body, args = bodies[caller]
        src = _body_source(body, text)
        return src in args and args.index(src) in ok[caller]

    def passes(caller, nd, f: str, i: int) -> bool:
        called = nd.op == f or (nd.op in _CALL_OPS and "f" in nd.attr and nd.attr["f"].func.name == f)
        data = _data_inputs(nd)
        return called and i < len(data) and is_prefix(caller, data[i])

    changed = True
    while changed:  # the largest set of arguments every call passes a prefix to
        changed = False
        for f, calls in sites.items():
            for i in sorted(ok[f]):
                if not all(passes(caller, nd, f, i) for caller, nd in calls):
                    ok[f].discard(i)
                    changed = True

    fed = (f"the saver's file name input {filename!r}, which TensorFlow's loader feeds with the path of the "
           "model's own variables" if filename else "the saver's file name input (the MetaGraphDef's saver "
           "names none)")
    problems = {}
    for name in sorted(outer):
        nd = nodes[name]
        data = _data_inputs(nd)
        if nd.op in PREFIX_READERS and not (data and is_prefix(None, data[0])):
            src = _outer_source(nodes, data[0])[0] if data else ""
            what = f"{src!r} ({nodes[src].op})" if src in nodes else repr(src)
            problems[None, name] = f"its file prefix comes from {what}, not from {fed}"
    for f, (body, args) in bodies.items():
        for nd in body.values():
            data = _data_inputs(nd)
            if nd.op not in PREFIX_READERS or (data and is_prefix(f, data[0])):
                continue
            src = _body_source(body, data[0]) if data else ""
            if src in args:
                what = (f"argument {src!r} of the function, which the loader calls with tensors, not a file name"
                        if f in entry_functions else
                        f"argument {src!r} of the function, and not every call of it passes {fed}")
            else:
                node = body.get(src.partition(":")[0])
                what = f"{node.name!r} ({node.op}) inside the function, not {fed}" if node else f"{src!r}, not {fed}"
            problems[f, nd.name] = f"its file prefix is {what}"
    return problems
