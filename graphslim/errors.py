"""User-facing errors.

Every error graphslim raises for bad input derives from :class:`GraphslimError`. Its message is one
paragraph that names the file, node, pass or option at fault and says what to do; the CLI prints it
without a traceback and exits non-zero.
"""


class GraphslimError(Exception):
    """Base class of all user-facing errors (clean message, no traceback in the CLI)."""

    exit_code = 2


class LoadError(GraphslimError):
    """The input model cannot be read (missing, corrupt, unsupported)."""


class EmitError(GraphslimError):
    """The output model cannot be written."""


class EmitCheckError(EmitError):
    """What graphslim wrote does not load in TensorFlow (a graphslim bug, never the user's): nothing is
    left behind, exit 3."""

    exit_code = 3


class VerificationError(GraphslimError):
    """The IR violates an invariant (after loading or after a pass)."""


class PipelineError(GraphslimError):
    """A pipeline text, pass name or pass option is wrong, or a pass failed."""


class OptionError(PipelineError):
    """A pass option is unknown or has a bad value."""


class PassError(GraphslimError):
    """A pass refuses the graph it was given (e.g. an op without a channel rule)."""


class ConversionError(GraphslimError):
    """The model cannot be converted for another runtime (TFLite/LiteRT): the message names the ops the
    runtime lacks, or the converter's reason. ``ops``: those op types (may be empty)."""

    def __init__(self, message: str, ops=()):
        super().__init__(message)
        self.ops = list(ops)


class XlaCheckWarning(UserWarning):
    """``save(..., jit_compile=True)`` could not lower the model to XLA at the shapes it assumed for
    unknown input dimensions; the model was written anyway (the CLI prints this as a warning)."""


class RuntimeUnavailable(GraphslimError):
    """A runtime the user asked for (``--runtime``, ``runtime=``) is not installed where models run:
    the message names it and the package to install. Exit status 2."""
