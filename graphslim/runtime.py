"""Run an IR graph (for calibration and for checks). This *executes* the model: the loader, the
passes without calibration data, and the emitter never call it.

Every run happens in a contained child process (:mod:`graphslim.sandbox`: Landlock, resource limits,
a wall-clock timeout): the graph and its weights are sent there, TensorFlow runs them, the outputs
come back as arrays. The child is shared by the runs of this process, so TensorFlow's start-up is
paid once. The safety scan runs first: a graph holding ops outside the allow-list is not run.

Example::

    out = graphslim.runtime.run(g, {"input_1": x})                   # signature outputs by name
    acts = graphslim.runtime.run(g, {"input_1": x}, fetch=["conv1/Relu:0"])
    flatbuffer = graphslim.to_tflite(g)                                # a .tflite file's bytes
"""

from __future__ import annotations

import numpy as np

from graphslim.errors import GraphslimError
from graphslim.ir.graph import Graph, as_tensor


class Runner:
    """Loads the graph once into the execution child; call :meth:`run` many times (e.g. calibration
    batches); :meth:`close` releases it there."""

    def __init__(self, graph: Graph, allow_ops=None, label: str | None = None):
        from graphslim.io.scan import check_safe
        from graphslim.sandbox import shared_child

        # Running a model executes it: refuse dangerous ops here, whatever the caller (calibration,
        # data-driven passes, checks). Ops the user accepted at load time stay accepted.
        check_safe(graph, allow_ops=graph.meta.get("allowed_ops", ()) if allow_ops is None else allow_ops)
        self.graph = graph
        self.label = label or f"the model {graph.meta.get('source', '')}".rstrip()
        self._child = shared_child(self.label)
        self._handle = self._child.load_graph(graph)

    def run(self, inputs: dict, fetch=None) -> dict:
        g = self.graph
        by_name = {a.name: a for a in g.inputs}
        feed = {}
        for key, value in inputs.items():
            if key not in by_name:
                raise GraphslimError(f"input {key!r} is not a signature input; the inputs are "
                                     f"{', '.join(sorted(by_name))}")
            feed[key] = np.asarray(value)
        missing = set(by_name) - set(inputs)
        if missing:
            raise GraphslimError(f"missing values for signature inputs {sorted(missing)}")
        names = None if fetch is None else [str(as_tensor(f)) for f in fetch]
        self._child.label = self.label
        return self._child.run(self._handle, feed, names)

    def close(self):
        if self._handle is not None:
            try:
                self._child.drop(self._handle)
            except GraphslimError:
                pass
            self._handle = None

    def __del__(self):
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            self._child.release(handle)  # dropped with the child's next request

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run(graph: Graph, inputs: dict, fetch=None) -> dict:
    """Run ``graph`` once on ``inputs`` (signature input name → array)."""
    with Runner(graph) as r:
        return r.run(inputs, fetch)


def to_tflite(graph: Graph, allow_ops=None) -> bytes:
    """``graph`` as a TFLite flatbuffer (the bytes of a ``.tflite`` file): graphslim's IR converted with
    TensorFlow's TFLite converter (builtin ops only) in the contained child, after the safety scan (the
    converter evaluates constant subgraphs). ConversionError names the ops TFLite lacks or the
    converter's reason.

    Example::

        Path("model.tflite").write_bytes(graphslim.to_tflite(graphslim.load("model/")))
    """
    from graphslim.io.scan import check_safe
    from graphslim.sandbox import shared_child

    check_safe(graph, allow_ops=graph.meta.get("allowed_ops", ()) if allow_ops is None else allow_ops)
    return shared_child(f"the model {graph.meta.get('source', '')}".rstrip()).to_tflite(graph)

