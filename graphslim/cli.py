"""The ``graphslim`` command line: ``optimize``, ``inspect``, ``scan``, ``passes``, ``verify`` and
``bench``.

All user-facing output of graphslim comes from here (and the data helpers in graphslim.report):
results on stdout, progress, warnings and errors on stderr. This module is the process around the
commands (the click group, errors and exit codes, signals, TensorFlow's start-up logs); the commands
are in :mod:`graphslim.commands` (``optimize``; ``inspect``, ``scan`` and ``passes``; ``verify`` and
``bench``), their shared options and terminal output in ``graphslim.commands.options`` and
``graphslim.commands.output``. Errors graphslim raises for bad input
(:class:`~graphslim.errors.GraphslimError`) print as ``error: <message>`` without a traceback and
exit 2; an unexpected exception is an internal error (exit 3; ``GRAPHSLIM_DEBUG=1`` shows the
traceback); Ctrl-C exits 130, SIGTERM 143 (SIGHUP 129), after the same cleanup as any failure: a
model being written is removed, never left half written. Models are scanned for dangerous ops before
anything else (``graphslim scan``; ``--allow-ops`` accepts named ops knowingly).

Example::

    graphslim optimize model/ -o model_small/ --passes "fold-batchnorm,dce" --report report.json
    graphslim verify model/ model_small/ -n 16 --atol 1e-4
    graphslim bench model/ model_small/ --threads 2 --xla
    graphslim inspect model_small/
    graphslim passes
"""

from __future__ import annotations

import os

# Before anything imports TensorFlow: its C++ INFO and WARNING logs stay out of the output unless the
# user sets another level (the start-up logs too: see _QuietTensorFlowImport).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib
import importlib
import importlib.abc
import importlib.util
import logging
import re
import signal
import sys
import tempfile
import traceback
import warnings
from typing import Any

import click

import graphslim
from graphslim.commands.inspect import inspect, passes_command, scan_command
from graphslim.commands.optimize import optimize
from graphslim.commands.output import App, paragraph
from graphslim.commands.run import bench, verify
from graphslim import signals
from graphslim.errors import GraphslimError
from graphslim.signals import Terminated
from graphslim.terminal import clean

__all__ = ["cli", "main"]


# ---------------------------------------------------------------------------------- error handling
def _debug() -> bool:
    return os.environ.get("GRAPHSLIM_DEBUG", "").strip() not in ("", "0", "false", "no")


class _Group(click.Group):
    """A click group that turns exceptions into clean messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except GraphslimError as exc:
            if _debug():
                traceback.print_exc()
            click.echo(f"error: {clean(paragraph(exc))}", err=True)
            ctx.exit(getattr(exc, "exit_code", 2))
        except KeyboardInterrupt as exc:
            click.echo(_interrupted_text(exc), err=True)
            ctx.exit(getattr(exc, "exit_code", 130))
        except Exception as exc:
            if _debug():
                raise
            click.echo(f"internal error: {type(exc).__name__}: {clean(paragraph(exc))} (set "
                       "GRAPHSLIM_DEBUG=1 for the traceback; please report it)", err=True)
            ctx.exit(3)


def _interrupted_text(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return f"terminated ({signal.Signals(exc.signum).name}); nothing was left half written"
    return "interrupted"


def _install_signal_handlers() -> None:
    """SIGTERM/SIGHUP become :class:`Terminated` (a clean abort instead of dying mid-write); SIGXFSZ
    is ignored so that a file size limit makes writes fail with EFBIG (a clean EmitError) instead of
    killing the process."""
    def terminate(signum, frame):
        raise Terminated(signum)

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, terminate)
    signals.watch()  # their arrival is recorded even where the exception they raise is lost
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _quiet_libraries() -> None:
    """Keep TensorFlow's and absl's Python logging and warnings out of the output."""
    for name in ("tensorflow", "absl", "keras", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"^(tensorflow|tf_keras|keras|absl|google|h5py)(\.|$)")


# TensorFlow's start-up logs: written while `import tensorflow` loads its libraries, before they read
# TF_CPP_MIN_LOG_LEVEL (absl's "WARNING: All log messages before absl::InitializeLog() ..." and, with
# oneDNN on, "I... port.cc:...] oneDNN custom operations are on ...", once per library that carries a
# copy). No environment variable silences them (absl reads none; TF_ENABLE_ONEDNN_OPTS=0 would change
# the numbers), so the CLI drops the lines below TF_CPP_MIN_LOG_LEVEL itself; anything else written
# meanwhile is passed on.
def _startup_log_pattern(min_level: str | None):
    """The start-up log lines that TF_CPP_MIN_LOG_LEVEL ``min_level`` hides (None: none)."""
    try:
        level = int((min_level or "0").strip())
    except ValueError:  # TensorFlow reads a non-number as 0
        level = 0
    if level <= 0:
        return None
    severities = "IWE"[:min(level, 3)]  # FATAL is always shown
    return re.compile(
        rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\n"
        rb"|[%b]\d{4} [\d:.]+ +\d+ [^\s\]]+:\d+\] [^\n]*\n"  # absl: I0000 00:00:1.2  12 port.cc:153] ...
        rb"|\d{4}-\d\d-\d\d [\d:.]+: [%b] [^\s\]]+:\d+\] [^\n]*\n"  # older TensorFlow
        % (severities.encode(), severities.encode()))


@contextlib.contextmanager
def _startup_logs_dropped(pattern: re.Pattern):
    """File descriptor 2 goes to a temporary file meanwhile; then all but what ``pattern`` matches is
    written to the real stderr."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no usable stderr: nothing to keep clean
        yield
        return
    try:
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os.dup2(saved, 2)
                capture.seek(0)
                rest = memoryview(pattern.sub(b"", capture.read()))
                while rest:
                    rest = rest[os.write(2, rest):]
    finally:
        os.close(saved)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """On ``sys.meta_path`` (see :func:`main`): the first ``import tensorflow``, wherever it happens
    (loader, runtime, verify, a plugin), runs under :func:`_startup_logs_dropped`; TensorFlow stays
    imported lazily. Then it takes itself off ``sys.meta_path`` and the module keeps its own loader."""

    def __init__(self, pattern: re.Pattern) -> None:
        self._pattern = pattern
        self._loader = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        self.remove()
        spec = importlib.util.find_spec(fullname)  # the finders after this one
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader
        with _startup_logs_dropped(self._pattern):
            self._loader.exec_module(module)

    def install(self) -> None:
        if "tensorflow" not in sys.modules and self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


# ---------------------------------------------------------------------------------- the group
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(graphslim.__version__, "--version", prog_name="graphslim",
                      message="%(prog)s %(version)s")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress, warnings or summary tables; only results and errors.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """graphslim: shape-changing rewrites of TensorFlow SavedModels.

    Load a model, run a pipeline of passes (subset, prune, fold-batchnorm, dce, ...) and write a
    smaller SavedModel; inspect models; compare two models numerically.
    """
    _quiet_libraries()
    ctx.obj = App(quiet)


for _command in (optimize, inspect, scan_command, passes_command, verify, bench):
    cli.add_command(_command)


# ---------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``graphslim = graphslim.cli:main``)."""
    _install_signal_handlers()
    pattern = _startup_log_pattern(os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
    if pattern is not None:
        _QuietTensorFlowImport(pattern).install()
    try:
        try:
            cli.main(args=argv, prog_name="graphslim")
        except SystemExit as exc:
            if exc.code in (0, None):
                signals.raise_if_received()  # a signal whose KeyboardInterrupt was lost is no success
            raise
    except KeyboardInterrupt as exc:
        click.echo(_interrupted_text(exc), err=True)
        sys.exit(getattr(exc, "exit_code", 130))


if __name__ == "__main__":
    main()
