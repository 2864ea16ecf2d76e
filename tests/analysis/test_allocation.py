"""MacModel (graphslim/analysis/allocation.py) on attention: the scores and context (an Einsum of two
activations) scale with the heads and head sizes, so the modelled MACs after a removal are the graph's."""

import numpy as np

from graphslim.analysis.allocation import MacModel
from graphslim.analysis.channels import apply_keeps, channel_groups
from graphslim.testing import keras_attention_graph


def test_mac_model_counts_attention_scores_and_context():
    g = keras_attention_graph()
    groups = [grp for grp in channel_groups(g) if grp.prunable]
    assert sorted(grp.size for grp in groups) == [3, 4, 4]  # heads; q/k and v/o head sizes
    orders = {grp.id: np.arange(grp.size) for grp in groups}
    model = MacModel(g, groups, orders)
    assert model.total0 == g.cost().macs
    scores = {"scores", "context"}
    assert sum(g.cost().by_node()[n].macs for n in scores) > 0 and not model.fixed
    removed = {grp.id: {3: 1, 4: 2}[grp.size] - (grp.sources[0].name.startswith(("q/", "k/")) and grp.size == 4)
               for grp in groups}
    predicted = model.total(removed)
    apply_keeps(g, [(grp, list(range(removed[grp.id], grp.size))) for grp in groups])
    assert predicted == g.cost().macs
