"""``dce``: dead-code elimination. Removes every node that no signature output needs."""

from __future__ import annotations

from graphslim.pipeline import PassResult, register_pass


@register_pass("dce")
def dce(graph, options) -> PassResult:
    """Remove nodes (and weights) that no signature output needs.

    Example: ``graphslim optimize model/ -o out/ --passes dce``
    """
    before = len(graph.weights)
    dead = graph.remove_dead_nodes()
    return PassResult(changed=bool(dead), stats={"removed_nodes": len(dead),
                                                 "removed_weights": before - len(graph.weights)})
