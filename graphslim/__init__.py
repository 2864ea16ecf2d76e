"""graphslim: shape-changing graph rewrites over TensorFlow SavedModels.

Example::

    import graphslim
    g = graphslim.load("model/")
    report = graphslim.run_pipeline(g, "subset{keep=3,7},dce")
    graphslim.save(g, "model_small/")
"""

from graphslim.errors import GraphslimError, LoadError, EmitError, PipelineError, VerificationError, PassError
from graphslim.ir.graph import Graph, Node, Tensor, Weight, SignatureArg, WEIGHT_OP

__version__ = "0.1.0"


def load(path, signature: str = "serving_default", tags=("serve",)) -> Graph:
    """Read a SavedModel directory or frozen GraphDef into a :class:`Graph` (see graphslim.io.loader)."""
    from graphslim.io.loader import load as _load

    return _load(path, signature=signature, tags=tags)


def save(graph: Graph, out_dir, *, force: bool = False):
    """Write ``graph`` as a TF2 SavedModel (see graphslim.io.emitter)."""
    from graphslim.io.emitter import save as _save

    return _save(graph, out_dir, force=force)


__all__ = ["load", "save", "Graph", "Node", "Tensor", "Weight", "SignatureArg", "WEIGHT_OP",
           "GraphslimError", "LoadError", "EmitError", "PipelineError", "VerificationError", "PassError"]
