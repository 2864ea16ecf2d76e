"""graphslim: shape-changing graph rewrites over TensorFlow SavedModels.

Example::

    import graphslim
    g = graphslim.load("model/")
    report = graphslim.run_pipeline(g, "fold-batchnorm,dce")
    graphslim.save(g, "model_small/")
    Path("model_small.tflite").write_bytes(graphslim.to_tflite(g))    # LiteRT's format

Importing graphslim is cheap; TensorFlow is imported on first use of the IR, loader or emitter.
"""

from graphslim.errors import (EmitError, GraphslimError, LoadError, PassError, PipelineError,
                              VerificationError)

from graphslim.version import __version__  # noqa: F401 - re-exported

_LAZY = {"Graph": "graphslim.ir.graph", "Node": "graphslim.ir.graph", "Tensor": "graphslim.ir.graph",
         "Weight": "graphslim.ir.graph", "SignatureArg": "graphslim.ir.graph", "WEIGHT_OP": "graphslim.ir.graph",
         "register_pass": "graphslim.pipeline", "PassResult": "graphslim.pipeline",
         "PassManager": "graphslim.pipeline", "parse_pipeline": "graphslim.pipeline",
         "compare": "graphslim.checks", "bench": "graphslim.checks", "to_tflite": "graphslim.runtime"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'graphslim' has no attribute {name!r}")


def load(path, signature: str = "serving_default", tags=("serve",), *, scan: bool = True, allow_ops=(),
         max_asset_mb: float | None = None):
    """Read a SavedModel directory or frozen GraphDef into a :class:`Graph` (see graphslim.io.loader).

    The safety scan refuses models with ops outside its allow-list unless named in ``allow_ops``
    (see graphslim.io.scan); ``max_asset_mb`` raises the per-file asset limit."""
    from graphslim.io.loader import load as _load

    extra = {} if max_asset_mb is None else {"max_asset_mb": max_asset_mb}
    return _load(path, signature=signature, tags=tags, scan=scan, allow_ops=allow_ops, **extra)


def save(graph, out_dir, *, force: bool = False, jit_compile: bool = False):
    """Write ``graph`` as a TF2 SavedModel (see graphslim.io.emitter); ``jit_compile=True`` marks its
    function for XLA compilation."""
    from graphslim.io.emitter import save as _save

    return _save(graph, out_dir, force=force, jit_compile=jit_compile)


def run_pipeline(graph, pipeline, *, verify: bool = True, instruments=()):
    """Run a pipeline (text like ``"fold-batchnorm,dce"`` or a Pipeline) on ``graph`` in place and
    return the PipelineReport."""
    from graphslim.pipeline import PassManager

    return PassManager(pipeline, verify=verify, instruments=instruments).run(graph)


__all__ = ["load", "save", "run_pipeline", "to_tflite", "Graph", "Node", "Tensor", "Weight", "SignatureArg",
           "WEIGHT_OP", "register_pass", "PassResult", "PassManager", "parse_pipeline",
           "GraphslimError", "LoadError", "EmitError", "PipelineError", "VerificationError", "PassError"]
