"""``positions``: dead-position elimination. Computes only the tokens (or rows) some output needs.

A ViT classifier reads its class token after the last block: with ``positions`` the last block's query
projection, attention output, MLP and final layer norm run on that one token (keys and values still on
all of them), so the model does the same arithmetic on the outputs at a fraction of the last block's
MACs. The same holds for a BERT classifier's pooled ``[CLS]`` token. Exact: the outputs are unchanged.
See :mod:`graphslim.analysis.positions`.

Example: ``graphslim optimize vit/ -o out/ --passes positions,prune{macs=0.7}``
"""

from __future__ import annotations

from graphslim.analysis.positions import slice_dead_positions
from graphslim.pipeline import PassResult, register_pass


@register_pass("positions")
def positions(graph, options) -> PassResult:
    """Compute only the positions (tokens, rows) that some output reads: the layers after the last
    attention of a class-token classifier run on the class token alone. Exact.

    Example: ``graphslim optimize vit/ -o out/ --passes positions``
    """
    stats = slice_dead_positions(graph)
    if stats["restricted"]:
        graph.remove_dead_nodes()
    return PassResult(changed=bool(stats["restricted"]), stats=stats)
