"""Safety scan: refuse models holding any op that is not known to only compute, before anything could
run them.

TensorFlow's own security guidance says a SavedModel is a program. graphslim never executes a model
on load (it parses ``saved_model.pb`` and reads the checkpoint), but calibration, ``verify`` and
``bench`` do run graphs. The scan is an allow-list: every op type must be on the reviewed list of
compute-only ops in :mod:`graphslim.io.allowlist` (``graphslim scan --list-allowed`` prints it);
anything else (files, network, Python, debugging, queues, datasets, sleeping, aborting, custom ops
TensorFlow does not know, ...) is refused by name, with the node and the function it sits in, unless
``--allow-ops`` names it. The scan runs by default in :func:`graphslim.io.loader.load`; ``graphslim
scan MODEL`` runs it alone, and :func:`check_safe` is the hook code that is about to *run* a graph
(calibration, prune with data) calls first.

What is walked: the MetaGraphDef's ``graph_def`` **and every function of its library**, reachable from
the signature or not (a model that merely *contains* a refused op is refused: the conservative choice,
since other tools, e.g. ``tf.saved_model.load``, would revive and could run it). A node whose op type
names a library function is a call of it, and the function is scanned like the rest.

The checkpoint machinery is the one legitimate home of ``SaveV2``/``RestoreV2``/``MergeV2Checkpoints``
(and the TF1 ``Save``/``Restore`` family). Those ops are accepted only where they are provably
machinery: in the outer graph, a node that is an ancestor of ``saver_def``'s save tensor or restore op
and *not* an ancestor of any signature tensor or init op; in the library, a function reachable from
those saver nodes or from the object graph's saveable-object save/restore functions, and reachable
from nothing else (no signature, no other function). Anywhere else they are refused like the rest.
TensorFlow's loader runs everything the restore op depends on, and a tracked resource's restore
function: a write (``SaveV2``, ``Save``, ``SaveSlices``, ``MergeV2Checkpoints``) among the ancestors of
``saver_def``'s restore op or in a function reachable from the restore side is never machinery, and is
refused. (Restore ops, which read the checkpoint, stay accepted there.) A restore op of the machinery
reads the file TensorFlow's loader names only when its file prefix is exactly ``saver_def``'s
``filename_tensor_name`` (TF1 ``save/Const:0``, TF2 ``saver_filename:0``), the tensor the loader feeds
with the model's ``variables/variables``; inside a library function, an argument every call passes
that tensor. Any other prefix (a constant such as ``"/etc/passwd"``, the unfed default behind
``save/Const``, a computed string) would read another file whenever the model is restored: refused,
naming the node and its function (:mod:`graphslim.io.savers`).

A TF1 model restored with ``tf.compat.v1.train.Saver`` and then written with ``SavedModelBuilder``
carries a second saver (``save/...`` beside the declared ``save_1/...``). Such a name scope is
accepted as a second copy of the checkpoint machinery, and reported as a note (:class:`ScanNote`),
only when all of it is: no signature, init op or collection reaches any of its nodes and nothing
outside it uses them; it holds only saver ops; every file name its save/restore ops use comes from
constants and ``PlaceholderWithDefault``\ s of the scope itself, and its restore ops read the scope's
own file name input ``<scope>/Const:0`` (what ``Saver.restore`` feeds); its ``SaveV2`` ops write, under constant
names, exactly variables of the graph (or their reads) and its ``RestoreV2`` outputs only feed
``Assign``/``AssignVariableOp`` into variables; and it saves and restores the same checkpoint keys into
the same variables as the saver ``saver_def`` declares. Otherwise its ops are refused, and the
finding says which check failed.

Path checks (a model directory): ``variables/`` and ``assets/`` and every file below them must
resolve inside the model directory (no symlink leading out), be regular files (a FIFO would hang the
reader) with a single hard link (a hard link can lead outside the model as a symlink can), and the
asset file names the MetaGraphDef records must be plain relative names (no ``..``, no absolute paths).

Example::

    from graphslim.io.scan import check_safe, scan_path

    for f in scan_path("model/"):                 # list of Finding, empty when clean
        print(f.describe())
    check_safe("model/")                          # UnsafeModelError when something is found
    check_safe(graph, allow_ops=("PrintV2",))     # an IR graph about to be run (calibration)
    notes = []
    scan_path("model/", notes=notes)              # notes: what was accepted and why (second savers)
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from graphslim.errors import LoadError
from graphslim.io.allowlist import ALLOWED, CHECKPOINT_OPS, CONDITIONAL, REFUSED_DETAIL, condition, describe
from graphslim.io.reader import parse_graph_def, parse_saved_model, pick_meta_graph, saved_model_file
from graphslim.io.savers import PREFIX_READERS, restore_prefix_problems, second_savers
from graphslim.ir.functions import attr_refs

__all__ = ["Finding", "ScanNote", "UnsafeModelError", "allowed_ops", "check_safe", "scan_graph_def",
           "scan_ir", "scan_meta_graph", "scan_path", "scan_report", "check_paths", "parse_allow_ops"]


class UnsafeModelError(LoadError):
    """The model contains ops that are not on graphslim's allow-list (or checkpoint ops outside the
    checkpoint machinery, or files that lead outside the model directory). ``findings`` lists them."""

    def __init__(self, message: str, findings=()):
        super().__init__(message)
        self.findings = list(findings)


class ScanNote(UserWarning):
    """Something the scan accepted that the user should know about (a second saver left over from a
    restore, dropped). Issued as a warning by :func:`scan_meta_graph` (hence by
    :func:`graphslim.io.loader.load`) when the caller collects no ``notes`` list."""


# ------------------------------------------------------------------------------------ op categories
NOT_ALLOWED = "is not on graphslim's allow-list of compute-only ops"
CHECKPOINT = "reads or writes checkpoint files outside the checkpoint machinery"
ELSEWHERE = "would restore from a file other than the model's own checkpoint"
_UNREGISTERED = " (TensorFlow does not register an op of this name: a custom op of another library)"
# Checkpoint ops that write: never machinery on the restore path, which TensorFlow's loader runs.
_CHECKPOINT_WRITES = frozenset({"Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints"})

_CATEGORY_CACHE: dict = {}


def _category(op: str, attrs) -> tuple[str, str] | None:
    """(category, detail) if a node of type ``op`` with ``attrs`` (an AttrValue map) is refused; None
    when ``op`` is on the allow-list (for conditional ops: with these attrs). Checkpoint ops get
    :data:`CHECKPOINT` (the caller exempts the checkpoint machinery)."""
    if op in CONDITIONAL:
        why = condition(op, attrs)
        return None if why is None else (f"is allowed {CONDITIONAL[op]}", why)
    try:
        return _CATEGORY_CACHE[op]
    except KeyError:
        cat = _CATEGORY_CACHE[op] = _category_uncached(op)
        return cat


def _category_uncached(op: str) -> tuple[str, str] | None:
    if op in ALLOWED:
        return None
    if op in CHECKPOINT_OPS:
        return CHECKPOINT, ""
    if op in REFUSED_DETAIL:
        return NOT_ALLOWED, REFUSED_DETAIL[op]
    from tensorflow.python.framework import op_def_registry

    return NOT_ALLOWED, "" if op_def_registry.get(op) is not None else _UNREGISTERED


def allowed_ops() -> dict:
    """The allow-list as data (see :func:`graphslim.io.allowlist.describe`)."""
    return describe()


# ------------------------------------------------------------------------------------ findings
@dataclass(frozen=True)
class Finding:
    """One dangerous op (``node`` of type ``op``, in ``function`` or the outer graph when None) or one
    path leading outside the model (``op`` is ``"<path>"``)."""

    op: str
    node: str
    function: str | None
    category: str
    detail: str = ""
    where: str = ""  # meta graph tags, for models with several

    def describe(self) -> str:
        if self.op == "<path>":
            return f"{self.node}: {self.category}"
        place = f"in function {self.function!r}" if self.function else "in the graph"
        tags = f" of MetaGraphDef {self.where}" if self.where else ""
        return f"op {self.op!r} (node {self.node!r} {place}{tags}) {self.category}{self.detail}"

    def to_dict(self) -> dict:
        return {"op": self.op, "node": self.node, "function": self.function, "category": self.category,
                "detail": self.detail, "meta_graph": self.where}


def parse_allow_ops(values) -> frozenset[str]:
    """``("ReadFile", "PyFunc,EagerPyFunc")`` → the set of op names (comma- or space-separated)."""
    if isinstance(values, str):
        values = [values]
    out = set()
    for v in values or ():
        out.update(x for x in re.split(r"[,\s]+", str(v)) if x)
    return frozenset(out)


_FUNC_ATTRS: dict = {}


def _func_attr_names(op: str):
    """Names of the attrs of ``op`` whose type is ``func`` or ``list(func)`` per its OpDef; None for an
    op TensorFlow does not know (then every attr is walked)."""
    try:
        return _FUNC_ATTRS[op]
    except KeyError:
        pass
    from tensorflow.python.framework import op_def_registry

    op_def = op_def_registry.get(op)
    names = None if op_def is None else tuple(a.name for a in op_def.attr if a.type in ("func", "list(func)"))
    _FUNC_ATTRS[op] = names
    return names


def _node_refs(nd, library: set) -> set[str]:
    """Library functions a node calls: its op type, or its func attrs. Only attrs the op declares can
    be called by TensorFlow; for unknown op types every attr is walked."""
    if nd.op in library:
        out = attr_refs(nd.attr, library)
        out.add(nd.op)
        return out
    names = _func_attr_names(nd.op)
    if names is None:
        return attr_refs(nd.attr, library)
    if not names:
        return set()
    return attr_refs({k: nd.attr[k] for k in names if k in nd.attr}, library)


def _closure(roots, calls: dict) -> set[str]:
    seen, stack = set(), list(roots)
    while stack:
        f = stack.pop()
        if f in seen:
            continue
        seen.add(f)
        stack.extend(calls.get(f, ()))
    return seen


def _node_name(text: str) -> str:
    name = text[1:] if text.startswith("^") else text
    base, sep, port = name.rpartition(":")
    return base if sep and port.isdigit() else name


def _outer_ancestors(nodes: dict, roots) -> set[str]:
    seen, stack = set(), [r for r in roots if r in nodes]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for text in nodes[n].input:
            src = _node_name(text)
            if src in nodes and src not in seen:
                stack.append(src)
    return seen


def _saver_functions(meta, library: set) -> tuple[set[str], set[str]]:
    """Function names of the object graph's saveable-object (save and restore, restore) functions."""
    og = meta.object_graph_def
    out, restore = set(), set()
    n = len(og.nodes)
    for obj in og.nodes:
        for so in obj.saveable_objects.values():
            for nid, restoring in ((so.save_function, False), (so.restore_function, True)):
                if not 0 <= nid < n:
                    continue
                target = og.nodes[nid]
                kind = target.WhichOneof("kind")
                names = set()
                if kind == "function":
                    names = {f for f in target.function.concrete_functions if f in library}
                elif kind == "bare_concrete_function":
                    name = target.bare_concrete_function.concrete_function_name
                    names = {name} if name in library else set()
                out |= names
                if restoring:
                    restore |= names
    return out, restore


def _note(notes, text: str) -> None:
    if notes is None:
        warnings.warn(text, ScanNote, stacklevel=4)
    else:
        notes.append(text)


def scan_graph_def(graph_def, *, saver_roots=(), serving_roots=(), saver_functions=(), restore_roots=(),
                   restore_functions=(), filename_tensor: str = "", where: str = "",
                   notes: list | None = None) -> list[Finding]:
    """Findings in a GraphDef and every function of its library.

    ``saver_roots`` are outer node names of the checkpoint machinery (saver_def's save tensor and
    restore op), ``serving_roots`` those of the signatures and init ops, ``saver_functions`` extra
    library functions that are checkpoint machinery (object-graph saveable functions). Without saver
    roots nothing is exempt. ``restore_roots`` (saver_def's restore op) and ``restore_functions``
    (object-graph restore functions) are what TensorFlow's loader runs to restore the checkpoint:
    checkpoint *writes* there are refused although they belong to the machinery, and so is every
    restore op of the machinery whose file prefix is not ``filename_tensor`` (saver_def's
    ``filename_tensor_name``, what the loader feeds; see :mod:`graphslim.io.savers`). Second savers
    matching the declared one are exempt too, each with a note appended to ``notes`` (issued as a
    :class:`ScanNote` warning when ``notes`` is None).
    """
    library = {f.signature.name for f in graph_def.library.function}
    nodes, outer_hits, outer_refs = {}, [], {}
    for nd in graph_def.node:
        name, op = nd.name, nd.op
        nodes.setdefault(name, nd)
        cat = None if op in library else _category(op, nd.attr)  # a call: the function is scanned
        if cat is not None:
            outer_hits.append((nd, cat))
        refs = _node_refs(nd, library)
        if refs:
            outer_refs.setdefault(name, set()).update(refs)
    calls, fn_hits = {}, []
    for f in graph_def.library.function:
        fname = f.signature.name
        out = calls.setdefault(fname, set())
        for nd in f.node_def:
            cat = None if nd.op in library else _category(nd.op, nd.attr)
            if cat is not None:
                fn_hits.append((fname, nd, cat))
            out |= _node_refs(nd, library)

    needs_exemption = any(cat[0] == CHECKPOINT for _, cat in outer_hits) or any(
        cat[0] == CHECKPOINT for _, _, cat in fn_hits)
    ckpt_outer, machinery, serving = set(), set(), set()
    if needs_exemption and (saver_roots or saver_functions):
        serving = _outer_ancestors(nodes, serving_roots)
        ckpt_outer = _outer_ancestors(nodes, saver_roots) if saver_roots else set()
        ckpt_outer -= serving
        ckpt_fn_roots, other_fn_roots = set(saver_functions), set()
        for name, refs in outer_refs.items():
            (ckpt_fn_roots if name in ckpt_outer else other_fn_roots).update(refs)
        ckpt_funcs = _closure(ckpt_fn_roots, calls)
        # Every function that is not checkpoint machinery is a root of "other" code, reachable or not.
        other_fn_roots |= library - ckpt_funcs
        machinery = ckpt_funcs - _closure(other_fn_roots, calls)

    # What the loader runs to restore: every outer node the restore op depends on, every function
    # those nodes or the object graph's restore functions reach. Writes there are never machinery.
    restore_outer, restore_funcs = set(), set()
    if needs_exemption and (restore_roots or restore_functions):
        restore_outer = _outer_ancestors(nodes, restore_roots)
        fn_roots = set(restore_functions)
        for name in restore_outer:
            fn_roots |= outer_refs.get(name, set())
        restore_funcs = _closure(fn_roots, calls)
    restore_writes = {nd.name for nd, cat in outer_hits
                      if cat[0] == CHECKPOINT and nd.op in _CHECKPOINT_WRITES and nd.name in restore_outer}
    ckpt_outer -= restore_writes

    exempt, reasons = set(), {}
    others = [nd for nd, cat in outer_hits
              if cat[0] == CHECKPOINT and nd.name not in ckpt_outer and nd.name not in restore_writes]
    if others and saver_roots:
        exempt, reasons, saver_notes = second_savers(others, nodes, saver_roots, serving, ckpt_outer, where,
                                                     filename_tensor)
        for text in saver_notes:
            _note(notes, text)

    elsewhere = {}
    if any(nd.op in PREFIX_READERS for nd, _ in outer_hits) or any(nd.op in PREFIX_READERS for _, nd, _ in fn_hits):
        fdefs = {f.signature.name: f for f in graph_def.library.function if f.signature.name in machinery}
        elsewhere = restore_prefix_problems(nodes, ckpt_outer, fdefs, filename_tensor,
                                            lambda nd: _node_refs(nd, library), saver_functions)
    roots = ", ".join(repr(r) for r in restore_roots)
    on_restore = (f" (on the restore path: TensorFlow's loader runs everything the saver's restore op {roots} "
                  "depends on, so this write would run whenever the checkpoint is restored)")
    in_restore_fn = (" (on the restore path: TensorFlow's loader runs this function when it restores the "
                     "checkpoint, so this write would run then)")
    findings = []
    for nd, cat in outer_hits:
        if nd.name in restore_writes:
            findings.append(Finding(nd.op, nd.name, None, cat[0], on_restore, where))
            continue
        if (None, nd.name) in elsewhere:
            findings.append(Finding(nd.op, nd.name, None, ELSEWHERE, f" ({elsewhere[None, nd.name]})", where))
            continue
        if cat[0] == CHECKPOINT and (nd.name in ckpt_outer or nd.name in exempt):
            continue
        detail = f" ({reasons[nd.name]})" if nd.name in reasons else cat[1]
        findings.append(Finding(nd.op, nd.name, None, cat[0], detail, where))
    for fname, nd, cat in fn_hits:
        if cat[0] == CHECKPOINT and (fname, nd.name) in elsewhere:
            findings.append(Finding(nd.op, nd.name, fname, ELSEWHERE, f" ({elsewhere[fname, nd.name]})", where))
            continue
        if cat[0] == CHECKPOINT and fname in machinery:
            if nd.op not in _CHECKPOINT_WRITES or fname not in restore_funcs:
                continue
            findings.append(Finding(nd.op, nd.name, fname, cat[0], in_restore_fn, where))
            continue
        findings.append(Finding(nd.op, nd.name, fname, cat[0], cat[1], where))
    return findings


def scan_meta_graph(meta, where: str = "", notes: list | None = None) -> list[Finding]:
    """Findings in one MetaGraphDef (its graph, its whole function library), with the checkpoint
    machinery recognised from ``saver_def`` and the object graph. Notes (second savers accepted and
    dropped) go to ``notes``, or are issued as :class:`ScanNote` warnings when it is None."""
    saver = meta.saver_def
    saver_roots = [_node_name(t) for t in (saver.save_tensor_name, saver.restore_op_name) if t]
    serving_roots = []
    for sig in meta.signature_def.values():
        for table in (sig.inputs, sig.outputs):
            for info in table.values():
                for t in (info.name, info.coo_sparse.values_tensor_name,
                          info.coo_sparse.indices_tensor_name, info.coo_sparse.dense_shape_tensor_name):
                    if t:
                        serving_roots.append(_node_name(t))
    for key, col in meta.collection_def.items():
        if key in ("variables", "trainable_variables"):
            continue  # VariableDefs, serialized protos, not node names
        for text in col.node_list.value:
            serving_roots.append(_node_name(text))
    library = {f.signature.name for f in meta.graph_def.library.function}
    saver_functions, restore_functions = _saver_functions(meta, library)
    restore_roots = [_node_name(saver.restore_op_name)] if saver.restore_op_name else []
    return scan_graph_def(meta.graph_def, saver_roots=saver_roots, serving_roots=serving_roots,
                          saver_functions=saver_functions, restore_roots=restore_roots,
                          restore_functions=restore_functions, filename_tensor=saver.filename_tensor_name,
                          where=where, notes=notes)


def scan_ir(graph) -> list[Finding]:
    """Findings in an IR graph (what :mod:`graphslim.runtime` would run): its nodes and the
    FunctionDefs it keeps (``graph.functions``, nested ones included). Nothing is exempt. The IR's
    ``Weight`` pseudo-op (a Placeholder fed with the checkpoint's value when run) and calls of kept
    functions are accepted."""
    from graphslim.ir.graph import WEIGHT_OP

    functions = graph.functions or {}
    findings = []
    for node in graph.nodes():
        if node.op == WEIGHT_OP or node.op in functions:
            continue
        cat = _category(node.op, node.attrs)
        if cat is not None:
            findings.append(Finding(node.op, node.name, None, cat[0], cat[1]))
    for fname, fdef in functions.items():
        for nd in fdef.node_def:
            cat = None if nd.op in functions else _category(nd.op, nd.attr)
            if cat is not None:
                findings.append(Finding(nd.op, nd.name, fname, cat[0], cat[1]))
    return findings


# ------------------------------------------------------------------------------------ paths
def _inside(p: Path, root: Path) -> bool:
    try:
        return p.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def check_paths(model_dir, meta=None) -> list[Finding]:
    """Findings for files of a SavedModel directory that lead outside it or are not regular files:
    ``variables/``, ``assets/`` (walked without following links) and the asset file names recorded in
    ``meta`` (``asset_file_def``)."""
    model_dir = Path(model_dir)
    root = model_dir.resolve()
    findings = []

    def bad(path, why):
        findings.append(Finding("<path>", str(path), None, why))

    for sub in ("saved_model.pb", "saved_model.pbtxt"):
        top = model_dir / sub
        # saved_model.pb is what the user points graphslim at: it may be a link (e.g. into a download
        # cache), but it must be a regular file (a FIFO would hang the reader).
        if (top.exists() or top.is_symlink()) and not _regular(top):
            bad(top, "is not a regular file; refusing to read it")
    for sub in ("variables", "assets"):
        top = model_dir / sub
        if not (top.exists() or top.is_symlink()):
            continue
        if not _inside(top, root):
            bad(top, f"leads outside the model directory (to {_target(top)}); refusing to read it")
            continue
        if not top.is_dir():
            if not _regular(top):
                bad(top, "is not a regular file or directory; refusing to read it")
            continue  # a plain file: the loader reports the model as incomplete
        count = 0
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            for name in list(dirnames) + filenames:
                count += 1
                if count > 100_000:
                    bad(top, "holds more than 100,000 files; refusing to walk it")
                    return findings
                p = Path(dirpath) / name
                if p.is_symlink() and not _inside(p, root):
                    bad(p, f"leads outside the model directory (to {_target(p)}); refusing to read it")
                elif name in filenames and not _regular(p) and not p.is_symlink():
                    bad(p, "is not a regular file (a FIFO, socket or device); refusing to read it")
                elif name in filenames and p.is_symlink() and not _regular(p):
                    bad(p, "is a link to something that is not a regular file; refusing to read it")
                elif name in filenames and _links(p) > 1:
                    # The file (or, for a symlink inside the model, its target) has other names,
                    # possibly outside the model: reading it would read whatever they hold.
                    bad(p, f"has {_links(p)} hard links; a hard link can lead outside the model "
                           "directory; copy the file instead")
    if meta is not None:
        for a in meta.asset_file_def:
            name = a.filename
            parts = Path(name).parts
            if not name or os.path.isabs(name) or ".." in parts or "\x00" in name:
                bad(model_dir / "assets" / name,
                    f"the model records asset file name {name!r}, which is not a plain name inside "
                    "assets/; refusing to use it")
    return findings


def _regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:
        return False


def _links(p: Path) -> int:
    """The hard-link count of the file ``p`` names (following symlinks), 0 when it cannot be read."""
    try:
        return p.stat().st_nlink
    except OSError:
        return 0


def _target(p: Path) -> str:
    try:
        return str(p.resolve())
    except (OSError, RuntimeError):
        return "a symlink loop"


# ------------------------------------------------------------------------------------ entry points
def scan_path(path, tags=None, notes: list | None = None) -> list[Finding]:
    """Findings of a model on disk: a SavedModel directory (every MetaGraphDef, or only the one whose
    tag set is ``tags``) or a frozen GraphDef file. Raises LoadError when it cannot be read. Notes go
    to ``notes`` (see :func:`scan_meta_graph`)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise LoadError(f"{path}: no such file or directory. Pass a SavedModel directory or a frozen "
                        f"GraphDef .pb file.")
    if path.is_file() and path.name not in ("saved_model.pb", "saved_model.pbtxt"):
        gd = parse_graph_def(path)
        return scan_graph_def(gd, notes=notes)
    if path.is_file():
        path = path.parent
    sm = parse_saved_model(saved_model_file(path))
    metas = list(sm.meta_graphs)
    if tags is not None:
        metas = [pick_meta_graph(sm, tags, path)]
    findings = []
    for m in metas:
        where = ",".join(sorted(m.meta_info_def.tags)) if len(sm.meta_graphs) > 1 else ""
        findings.extend(check_paths(path, m))
        findings.extend(scan_meta_graph(m, where=where, notes=notes))
    return _dedupe(findings)


def scan_report(path, tags=None, allow_ops=()) -> dict:
    """What ``graphslim scan`` prints: ``{"path", "format", "meta_graphs", "nodes", "functions",
    "function_nodes", "findings": [dict], "allowed": [dict], "notes": [str], "safe": bool}``.
    ``findings`` are those not covered by ``allow_ops``; ``allowed`` those accepted by it; ``notes``
    what was accepted that the user should know about (second savers dropped)."""
    path = Path(path)
    notes: list = []
    findings = scan_path(path, tags=tags, notes=notes)
    if path.is_file() and path.name not in ("saved_model.pb", "saved_model.pbtxt"):
        gd = parse_graph_def(path)
        graphs, fmt, metas = [gd], "frozen_graphdef", 0
    else:
        model_dir = path.parent if path.is_file() else path
        sm = parse_saved_model(saved_model_file(model_dir))
        chosen = [pick_meta_graph(sm, tags, model_dir)] if tags is not None else list(sm.meta_graphs)
        graphs, fmt, metas = [m.graph_def for m in chosen], "saved_model", len(chosen)
    allowed_names = parse_allow_ops(allow_ops)
    refused = [f for f in findings if f.op == "<path>" or f.op not in allowed_names]
    accepted = [f for f in findings if f not in refused]
    return {"path": str(path), "format": fmt, "meta_graphs": metas,
            "nodes": sum(len(g.node) for g in graphs),
            "functions": sum(len(g.library.function) for g in graphs),
            "function_nodes": sum(len(f.node_def) for g in graphs for f in g.library.function),
            "findings": [f.to_dict() for f in refused], "allowed": [f.to_dict() for f in accepted],
            "notes": _dedupe(notes), "safe": not refused}


def _dedupe(findings):
    seen, out = set(), []
    for f in findings:
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


def refusal(findings, where, allow_ops=()) -> UnsafeModelError | None:
    """The UnsafeModelError for ``findings`` not covered by ``allow_ops`` (None when all are)."""
    allowed = parse_allow_ops(allow_ops)
    left = [f for f in findings if f.op == "<path>" or f.op not in allowed]
    if not left:
        return None
    paths = [f for f in left if f.op == "<path>"]
    ops = [f for f in left if f.op != "<path>"]
    shown = left[:3]
    text = "; ".join(f.describe() for f in shown)
    more = f"; and {len(left) - len(shown)} more" if len(left) > len(shown) else ""
    hint = ""
    if ops:
        names = ",".join(sorted({f.op if re.fullmatch(r"[A-Za-z0-9_>.-]+", f.op) else repr(f.op) for f in ops}))
        hint = (f" If you trust this model, accept these ops knowingly with --allow-ops {names} "
                f"(allow_ops= in Python); `graphslim scan MODEL` lists every finding and "
                f"`graphslim scan --list-allowed` the ops graphslim accepts.")
    elif paths:
        hint = " Copy the model's files into its directory instead of linking to them."
    return UnsafeModelError(f"{where}: refusing the model: {text}{more}. A SavedModel is a program; "
                            f"graphslim accepts only ops on its allow-list of compute-only ops, checkpoint "
                            f"ops only as the model's checkpoint machinery, and files inside the model "
                            f"directory.{hint}", left)


def check_safe(graph_or_path, allow_ops=(), tags=None) -> None:
    """Raise :class:`UnsafeModelError` unless the model has no dangerous op outside ``allow_ops``.

    ``graph_or_path`` is an IR :class:`~graphslim.ir.graph.Graph` (what would be run: every node and
    every FunctionDef it keeps is checked, nothing exempt) or a model path (see :func:`scan_path`).
    Call it before running a graph (calibration, data-driven passes)::

        check_safe(graph, allow_ops=options.allow_ops)
    """
    if isinstance(graph_or_path, (str, os.PathLike)):
        findings = scan_path(graph_or_path, tags=tags, notes=[])  # deciding only: notes unused
        where = str(graph_or_path)
    else:
        findings = scan_ir(graph_or_path)
        where = (getattr(graph_or_path, "meta", None) or {}).get("source") or "the graph"
    err = refusal(findings, where, allow_ops)
    if err is not None:
        raise err
