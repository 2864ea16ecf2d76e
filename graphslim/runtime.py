"""Run an IR graph in TensorFlow (for calibration and for checks). This *executes* the model: the
loader, the passes without calibration data, and the emitter never call it.

Example::

    out = graphslim.runtime.run(g, {"input_1": x})                   # signature outputs by name
    acts = graphslim.runtime.run(g, {"input_1": x}, fetch=["conv1/Relu:0"])
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from graphslim.errors import GraphslimError
from graphslim.ir.graph import Graph, as_tensor
from graphslim.ir.tfconv import graph_to_graph_def


class Runner:
    """Imports the graph once; call :meth:`run` many times (e.g. calibration batches)."""

    def __init__(self, graph: Graph, allow_ops=None):
        from graphslim.io.scan import check_safe

        # Running a model executes it: refuse dangerous ops here, whatever the caller (calibration,
        # data-driven passes, checks). Ops the user accepted at load time stay accepted.
        check_safe(graph, allow_ops=graph.meta.get("allowed_ops", ()) if allow_ops is None else allow_ops)
        self.graph = graph
        gd = graph_to_graph_def(graph)
        self._tfg = tf.Graph()
        with self._tfg.as_default():
            tf.graph_util.import_graph_def(gd, name="")
        self._sess = tf.compat.v1.Session(graph=self._tfg, config=tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=2, inter_op_parallelism_threads=1))
        self._weight_feed = {self._tfg.get_tensor_by_name(f"{n}:0"): w.value for n, w in graph.weights.items()}
        self._fetches: dict[str, tf.Tensor] = {}  # tensor name -> the Identity that fetches it

    def _fetchable(self, name: str) -> tf.Tensor:
        """The tensor ``name`` as read by an ``Identity`` the runner adds (once per tensor).

        Fetching a tensor by its own name is not enough: Grappler's remapper (with oneDNN, TensorFlow's
        default on x86 CPUs) fuses some patterns without honouring the fetched nodes, e.g.
        Conv2D + BiasAdd + Sigmoid + Mul into one ``_FusedConv2D`` (``FindConv2DSwish`` ignores the
        nodes to preserve), and the fetched ``BiasAdd`` is then "not found in the Graph". Every fusion
        still refuses to remove a node read outside its pattern, so a reader of our own keeps it.
        """
        tensor = self._fetches.get(name)
        if tensor is None:
            source = self._tfg.get_tensor_by_name(name)
            with self._tfg.as_default(), tf.control_dependencies(None):
                tensor = tf.identity(source, name="graphslim_fetch")  # made unique by TensorFlow
            self._fetches[name] = tensor
        return tensor

    def run(self, inputs: dict, fetch=None) -> dict:
        g = self.graph
        feed = dict(self._weight_feed)
        by_name = {a.name: a for a in g.inputs}
        for key, value in inputs.items():
            if key not in by_name:
                raise GraphslimError(f"input {key!r} is not a signature input; the inputs are "
                                     f"{', '.join(sorted(by_name))}")
            feed[self._tfg.get_tensor_by_name(str(by_name[key].tensor))] = np.asarray(value)
        missing = set(by_name) - set(inputs)
        if missing:
            raise GraphslimError(f"missing values for signature inputs {sorted(missing)}")
        if fetch is None:
            names = [a.name for a in g.outputs]
            tensors = [self._fetchable(str(a.tensor)) for a in g.outputs]
        else:
            names = [str(as_tensor(f)) for f in fetch]
            tensors = [self._fetchable(n) for n in names]
        values = self._sess.run(tensors, feed_dict=feed)
        return dict(zip(names, values))

    def close(self):
        self._sess.close()


def run(graph: Graph, inputs: dict, fetch=None) -> dict:
    """Run ``graph`` once on ``inputs`` (signature input name → array)."""
    r = Runner(graph)
    try:
        return r.run(inputs, fetch)
    finally:
        r.close()
