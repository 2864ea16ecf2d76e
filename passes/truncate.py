"""``truncate``: make intermediate tensors the signature's outputs and drop everything after them.

``truncate{at=conv4_block6_out}`` turns a classifier into a feature extractor. Each ``at`` entry is a
tensor (``node:port``), a node name as ``graphslim inspect`` prints it, or a Keras layer name
(``conv4_block6_out`` finds the last op inside that layer's scope, ``resnet50_1/conv4_block6_out_1/Relu``).
The new outputs are named after the entries (``/`` and ``:`` become ``_``), or as given by ``names=``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from graphslim.errors import PassError
from graphslim.ir.graph import WEIGHT_OP, Tensor
from graphslim.pipeline import PassResult, register_pass


@dataclass(frozen=True)
class TruncateOptions:
    at: tuple[str, ...] = field(default=(), metadata={
        "help": "tensors, node names or Keras layer names that become the outputs"})
    names: tuple[str, ...] = field(default=(), metadata={
        "help": "output names, one per 'at' entry (default: derived from the entries)"})
    keep_outputs: bool = field(default=False, metadata={
        "help": "keep the existing outputs too, adding the new ones"})


def _layer_scope_matches(name: str, layer: str) -> bool:
    pattern = re.compile(rf"^{re.escape(layer)}(_\d+)?$")
    return any(pattern.match(part) for part in name.split("/")[:-1])


def resolve_tensor(graph, text: str) -> Tensor:
    """A tensor, node name or Keras layer name → the tensor it denotes (PassError when unknown or
    ambiguous, listing candidates)."""
    t = Tensor.parse(text)
    if ":" in text and graph.has_node(t.node):
        node = graph.node(t.node)
        if t.port >= node.num_outputs:
            raise PassError(f"truncate: node {t.node!r} ({node.op}) has {node.num_outputs} outputs; "
                            f"{text!r} asks for output {t.port}.")
        return t
    if graph.has_node(text):
        return Tensor(text, 0)
    order = [n for n in graph.nodes() if n.op not in (WEIGHT_OP, "Const")]
    inside = [n for n in order if _layer_scope_matches(n.name, text)]
    if inside:
        # the layer's output: its last op (topologically) whose result leaves the layer's scope
        scope_names = {n.name for n in inside}
        leaving = [n for n in inside
                   if any(c.name not in scope_names for c, _ in graph.consumers(n)) or graph.is_output(n.output(0))]
        return (leaving or inside)[-1].output(0)
    import difflib

    scopes = sorted({re.sub(r"_\d+$", "", p) for n in order for p in n.name.split("/")[:-1]})
    close = difflib.get_close_matches(text, scopes, n=6, cutoff=0.6)
    hint = f" Similar layer scopes: {', '.join(close)}." if close else \
        " Run 'graphslim inspect MODEL' to see the layer names."
    raise PassError(f"truncate: no tensor, node or layer named {text!r}.{hint}")


def _output_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)


@register_pass("truncate", options=TruncateOptions)
def truncate(graph, opts: TruncateOptions) -> PassResult:
    """Make intermediate tensors (``at=``) the signature outputs; remove what only fed the old ones.

    Example: ``--passes "truncate{at=conv4_block6_out}"``
    """
    if not opts.at:
        raise PassError("truncate: give at least one tensor or layer with at=..., e.g. "
                        "truncate{at=conv4_block6_out}; 'graphslim inspect MODEL' lists the layers.")
    if opts.names and len(opts.names) != len(opts.at):
        raise PassError(f"truncate: names= has {len(opts.names)} entries but at= has {len(opts.at)}; "
                        f"give one name per tensor or none.")
    tensors = [resolve_tensor(graph, a) for a in opts.at]
    names = list(opts.names) or [_output_name(a) for a in opts.at]
    if len(set(names)) != len(names):
        raise PassError(f"truncate: output names {names} are not unique; pass names=... explicitly.")
    old = [(o.name, str(o.tensor)) for o in graph.outputs]
    if opts.keep_outputs:
        clash = set(names) & {o.name for o in graph.outputs}
        if clash:
            raise PassError(f"truncate: output names {sorted(clash)} already exist; pass names=...")
    else:
        graph.outputs = []
    for name, t in zip(names, tensors):
        graph.set_output(name, t)
    removed = graph.remove_dead_nodes()
    return PassResult(changed=True, stats={
        "outputs": {n: str(t) for n, t in zip(names, tensors)},
        "old_outputs": dict(old), "removed_nodes": len(removed)})
