"""Exact simplifications the loader applies so that passes see one shape of each pattern.

* ``Identity`` nodes (function-boundary leftovers) are bypassed, and so is ``IdentityN`` (Keras wraps
  swish and friends in one to attach a Python custom gradient, which cannot travel in a SavedModel; the
  forward math lives in ordinary ops, whose registered gradients are exact).
* ``Squeeze(Reshape(x))`` whose result has exactly ``x``'s static shape is bypassed (Keras 3 reshapes a
  conv bias to ``[1, 1, 1, C]`` and squeezes it back before ``BiasAdd``).

Both rewrites leave every computed value bit-identical.
"""

from __future__ import annotations

from graphslim.ir.graph import Graph


def canonicalize(graph: Graph) -> int:
    """Apply the simplifications in place; returns how many nodes were bypassed and removed."""
    removed = 0
    for node in graph.nodes():
        if not graph.has_node(node.name):
            continue
        src = None
        if node.op == "IdentityN" and not graph.control_inputs_of(node):
            for port, inp in enumerate(graph.inputs_of(node)):
                graph.replace_all_uses(node.output(port), inp)
            if all(graph.uses(node.output(p)) == 0 for p in range(node.num_outputs)) and \
                    not graph.control_consumers(node):
                graph.remove_node(node)
                removed += 1
            continue
        if node.op in ("Identity", "Snapshot", "StopGradient") and node.attrs.get("T") is not None and \
                graph.inputs_of(node) and not graph.control_inputs_of(node):
            src = graph.input(node, 0)
        elif node.op == "Squeeze" and node.shapes and node.shapes[0] is not None:
            r = graph.input_node(node, 0)
            if r.op == "Reshape":
                x = graph.input(r, 0)
                xs = graph.shape(x)
                if xs is not None and None not in xs and tuple(xs) == tuple(node.shapes[0]):
                    src = x
        if src is None or graph.dtype(src) != node.dtypes[0]:
            continue
        graph.replace_all_uses(node.output(0), src)
        if graph.uses(node.output(0)) == 0 and not graph.control_consumers(node):
            graph.remove_node(node)
            removed += 1
    # Reshapes left without users (their Squeeze was bypassed) go too.
    changed = True
    while changed:
        changed = False
        for node in graph.nodes():
            if node.op in ("Reshape", "Const", "Squeeze") and graph.uses(node.output(0)) == 0 and \
                    not graph.control_consumers(node) and not any(a.tensor.node == node.name for a in graph.inputs):
                graph.remove_node(node)
                removed += 1
                changed = True
    return removed
