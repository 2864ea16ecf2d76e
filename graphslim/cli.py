"""The ``graphslim`` command line: ``optimize``, ``inspect``, ``scan``, ``passes``, ``verify`` and
``bench``.

All user-facing output of graphslim comes from here (and the data helpers in graphslim.report):
results on stdout, progress, warnings and errors on stderr. Errors graphslim raises for bad input
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

import collections
import contextlib
import importlib
import importlib.abc
import importlib.util
import json
import logging
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

import graphslim
from graphslim import report as _report
from graphslim.terminal import clean, markup
from graphslim.errors import EmitError, GraphslimError, LoadError, XlaCheckWarning
from graphslim.pipeline import PassInstrument  # pure Python: importing it loads no TensorFlow

__all__ = ["cli", "main"]

_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
_FORMATS_HINT = "a SavedModel directory (holding saved_model.pb and variables/) or a frozen GraphDef .pb"


# ---------------------------------------------------------------------------------- error handling
def _debug() -> bool:
    return os.environ.get("GRAPHSLIM_DEBUG", "").strip() not in ("", "0", "false", "no")


def _paragraph(exc: BaseException) -> str:
    text = re.sub(r"\s*\n\s*", " ", str(exc).strip())
    return text or type(exc).__name__


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
            click.echo(f"error: {clean(_paragraph(exc))}", err=True)
            ctx.exit(getattr(exc, "exit_code", 2))
        except KeyboardInterrupt as exc:
            click.echo(_interrupted_text(exc), err=True)
            ctx.exit(getattr(exc, "exit_code", 130))
        except Exception as exc:
            if _debug():
                raise
            click.echo(f"internal error: {type(exc).__name__}: {clean(_paragraph(exc))} (set "
                       "GRAPHSLIM_DEBUG=1 for the traceback; please report it)", err=True)
            ctx.exit(3)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt so that the same
    cleanup runs (the emitter removes its temporary directory); exit status 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


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
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _limits_options(f):
    f = click.option("--max-memory", "max_memory", type=click.FloatRange(min=0.5), default=None,
                     metavar="GIB",
                     help="Address-space limit of the process that runs the model, in GiB (default: "
                          "three quarters of this machine's memory, at least 8).")(f)
    f = click.option("--timeout", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
                     help="Wall-clock limit of each run of a model (one call, one calibration batch, "
                          "one timing round): the process running it is killed after that "
                          "(default 900).")(f)
    return f


def _apply_limits(timeout: float | None, max_memory: float | None):
    """The limits of the processes that run models (graphslim.sandbox), from the CLI options."""
    from graphslim.sandbox import default_limits, set_default_limits

    set_default_limits(timeout=timeout, memory=None if max_memory is None else int(max_memory * (1 << 30)))
    return default_limits()


def _allow_ops_option(f):
    return click.option(
        "--allow-ops", "allow_ops", multiple=True, metavar="OP[,OP...]",
        help="Accept these op types knowingly although the safety scan refuses them (e.g. "
             "PyFunc, ReadFile); repeatable or comma-separated. See `graphslim scan`.")(f)


def _max_asset_option(f):
    return click.option(
        "--max-asset-mb", "max_asset_mb", type=click.FloatRange(min=0, min_open=True), default=None,
        metavar="MIB",
        help="Largest asset file (assets/) read from the model, in MiB; all assets together may take "
             "4 times that (default 64).")(f)


def _load(model: Path, signature: str, tags, allow_ops, app: "_App", max_asset_mb: float | None = None):
    from graphslim.io.loader import MAX_ASSET_MB, load
    from graphslim.io.scan import ScanNote

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ScanNote)
        graph = load(model, signature=signature, tags=tags, scan=True, allow_ops=allow_ops,
                     max_asset_mb=MAX_ASSET_MB if max_asset_mb is None else max_asset_mb)
    for w in caught:  # the scan's notes (e.g. a second saver dropped) are warnings of the command
        if issubclass(w.category, ScanNote):
            app.warn(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return graph


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


# ---------------------------------------------------------------------------------- consoles
# Model-provided text (node, op, signature and file names, error messages) can hold ESC sequences
# that move the cursor or restyle the terminal: it reaches the terminal only through clean() (plain
# text) or _text() (rich), see graphslim.terminal.
def _text(value) -> Text:
    """``value`` for rich (a table cell, a printed line): control characters escaped, and never read
    as markup, whatever the console's markup setting (ours is off)."""
    return Text(clean(value))


def _console(stream) -> Console:
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    # Not a terminal (a pipe, a log file): wide lines instead of wrapped table cells.
    width = None if tty or "COLUMNS" in os.environ else 160
    return Console(file=stream, markup=False, highlight=False, emoji=False, width=width,
                   soft_wrap=False)


class _App:
    """Per-invocation state: the -q flag and the stdout / stderr consoles."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.out = _console(sys.stdout)
        self.err = _console(sys.stderr)

    def warn(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"warning: {clean(_paragraph(message))}", err=True)  # one line, escaped

    def steps(self) -> "_Steps":
        return _Steps(self.err, enabled=not self.quiet)


class _Steps:
    """Progress on stderr: on a terminal, a spinner with the current step and a line per finished
    step; elsewhere (a pipe, a log) one plain line as each step starts, no animation."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self._status = None
        self._text: str | None = None
        self._start = 0.0

    def __enter__(self) -> "_Steps":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.fail()
        if self._status is not None:
            self._status.stop()
            self._status = None

    def start(self, text: str) -> None:
        self.finish()
        self._text, self._start = clean(text), time.perf_counter()  # paths and pass texts
        if not self.enabled:
            return
        if not self.live:
            self.console.print(_text(f"{text} ..."))
        elif self._status is None:
            self._status = self.console.status(markup(text))  # rich's spinner reads markup
            self._status.start()
        else:
            self._status.update(markup(text))

    def finish(self, note: str = "") -> None:
        if self._text is not None and self.live:
            elapsed = time.perf_counter() - self._start
            self.console.print(Text(f"done  {self._text} ({elapsed:.2f}s{note})", style="green"))
        self._text = None

    def fail(self) -> None:
        if self._text is not None and self.live:
            self.console.print(Text(f"FAILED  {self._text}", style="red"))
        self._text = None


class _ProgressInstrument(PassInstrument):
    """Shows each pass by its text on the progress display as the pipeline runs."""

    def __init__(self, steps: _Steps) -> None:
        self.steps = steps
        self.index, self.total = 0, 0

    def run_before_pipeline(self, pipeline, graph) -> None:
        self.index, self.total = 0, len(pipeline)

    def run_before_pass(self, spec, graph) -> None:
        self.index += 1
        self.steps.start(f"pass {self.index}/{self.total}: {spec}")

    def run_after_pass(self, spec, graph, result, seconds) -> None:
        self.steps.finish(", changed" if result.changed else ", unchanged")

    def run_on_error(self, spec, graph, exc) -> None:
        self.steps.fail()


# ---------------------------------------------------------------------------------- helpers
def _tags(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _model_dir(path: Path) -> Path:
    """The directory of a SavedModel given as its folder or its saved_model.pb; else ``path``."""
    return path.parent if path.is_file() and path.name in _SAVED_MODEL_FILES else path


def _load_plugins(plugins) -> list[str]:
    from graphslim.pipeline import load_entry_point_plugins, load_plugin

    for plugin in plugins:
        load_plugin(plugin)
    return list(plugins) + load_entry_point_plugins()


def _check_output_paths(model: Path, out: Path, force: bool, report_path: Path | None,
                        inputs=()) -> None:
    """Before anything is read or written: -o and --report must not be the input model, lie inside
    it, or (for -o, which --force replaces whole) contain it; nor be one of the other files the run
    reads (``inputs``: --config, --plugin files). Paths are compared resolved (symlinks followed)."""
    src, dst = _model_dir(model).resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise EmitError(f"-o {out} is the input model or inside it; write the optimized model somewhere "
                        "else (the input is never modified)")
    if dst in src.parents:
        raise EmitError(f"the input model {model} is inside -o {out}; replacing {out} would delete the "
                        "input; write the optimized model somewhere else")
    others = [(Path(p), Path(p).resolve()) for p in inputs]
    for given, resolved in others:
        if dst == resolved or dst in resolved.parents:
            raise EmitError(f"-o {out} is or holds {given}, an input of this run; write the optimized "
                            "model somewhere else")
    if (out.exists() or out.is_symlink()) and not force:
        raise EmitError(f"the output {out} exists; pass --force to replace it, or choose another -o")
    if report_path is not None:
        rep = report_path.resolve()
        if rep == src or src in rep.parents:
            raise EmitError(f"--report {report_path} is the input model or a file inside it; writing it "
                            f"would change the input {model}. Write the report somewhere else")
        if rep == dst:
            raise EmitError(f"--report {report_path} is the output directory -o {out}; give the report "
                            "its own file name (it may be inside -o)")
        for given, resolved in others:
            if rep == resolved:
                raise EmitError(f"--report {report_path} is {given}, an input of this run; write the "
                                "report somewhere else")
        if report_path.is_dir():
            raise GraphslimError(f"--report {report_path} is a directory; give a file name like "
                                 "report.json")
        parent = report_path.parent
        if not parent.is_dir():
            raise GraphslimError(f"cannot write the report {report_path}: the directory {parent} does "
                                 "not exist")


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GraphslimError(f"cannot write the report {path}: {exc.strerror or exc} (the model itself "
                             "was written)") from exc


def _table(title: str | None = None) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False)


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


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
    ctx.obj = _App(quiet)


# ---------------------------------------------------------------------------------- optimize
@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Directory to write the optimized SavedModel to (must not exist, unless --force).")
@click.option("--passes", metavar="PIPELINE", default=None,
              help='Pipeline text, e.g. "fold-batchnorm,prune{ratio=0.5},dce". Empty: round trip.')
@click.option("--config", type=click.Path(path_type=Path), metavar="FILE.toml", default=None,
              help="Pipeline as a TOML file ([[pass]] tables or pipeline = \"...\").")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE_OR_FILE",
              help="Import a module or .py file that registers passes (repeatable).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), metavar="R.json",
              default=None, help="Write a JSON report (passes, timings, params/MACs, per layer).")
@click.option("--signature", default="serving_default", show_default=True,
              help="Signature to load and keep.")
@click.option("--tags", default="serve", show_default=True,
              help="Comma-separated tag set of the MetaGraphDef to load.")
@click.option("--no-verify", is_flag=True, help="Skip verifying the graph after every pass.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--jit-compile", is_flag=True,
              help="Mark the written model for XLA compilation (TensorFlow compiles it on first call, "
                   "per input shape). Often faster on CPU (pruned ResNet50), but several times slower "
                   "with depthwise convolutions: time it with `graphslim bench --xla` first. Refused, "
                   "naming the op, if XLA cannot compile the model.")
@_allow_ops_option
@_max_asset_option
@_limits_options
@click.pass_obj
def optimize(app: _App, model: Path, out: Path, passes: str | None, config: Path | None, plugins,
             report_path: Path | None, signature: str, tags: str, no_verify: bool,
             force: bool, jit_compile: bool, allow_ops, max_asset_mb: float | None, timeout,
             max_memory) -> None:
    """Load MODEL, run the pipeline over it and write the result to -o OUT.

    MODEL is a SavedModel directory or a frozen GraphDef .pb. Without --passes or --config the
    model is written back unchanged (a round trip through graphslim's IR).
    """
    if passes is not None and config is not None:
        raise click.UsageError("--passes and --config cannot be used together: give the pipeline "
                               "either as text or as a TOML file")
    _check_output_paths(model, out, force, report_path,
                        inputs=[p for p in [config, *map(Path, plugins)] if p is not None and p.is_file()])
    verify = not no_verify
    tag_set = _tags(tags)
    _apply_limits(timeout, max_memory)  # for passes that run the model (calibration data)
    with app.steps() as steps:
        steps.start("loading passes")  # the built-in passes import TensorFlow: a few seconds
        loaded_plugins = _load_plugins(plugins)
        from graphslim.pipeline import PassManager, load_pipeline_config, parse_pipeline

        pipeline = load_pipeline_config(config) if config is not None else parse_pipeline(passes or "")
        manager = PassManager(pipeline, verify=verify, instruments=[_ProgressInstrument(steps)])

        steps.start(f"loading {model}")
        start = time.perf_counter()
        graph = _load(model, signature, tag_set, allow_ops, app, max_asset_mb)
        load_seconds = time.perf_counter() - start
        others = graph.meta.get("other_signatures") or []
        if others:
            app.warn(f"{model} also has signature(s) {', '.join(repr(n) for n in others)}; graphslim "
                     f"rewrites one signature at a time and writes only {signature!r} to {out}. Run "
                     "again with --signature NAME (and another -o) for each one you need.")
        before = _report.layer_snapshot(graph)
        size_before = _report.dir_size(_model_dir(model))

        if verify:
            steps.start("verifying the input graph")
        else:
            steps.finish()
        pipeline_report = manager.run(graph)
        steps.finish()
        for text, message in pipeline_report.warnings:  # any pass may warn (PassResult.warnings)
            app.warn(f"{text}: {message}")
        if not verify:
            try:  # shapes for the cost table; verification would have re-inferred them
                graph.infer_shapes()
            except GraphslimError:
                pass
        after = _report.layer_snapshot(graph)

        def make_report(size_after: int | None, save_seconds: float) -> dict:
            return _report.optimize_report(
                version=graphslim.__version__, input_path=model, output_path=out,
                signature=signature, tags=tag_set, pipeline_report=pipeline_report, verify=verify,
                before=before, after=after, size_before=size_before, size_after=size_after,
                load_seconds=load_seconds, save_seconds=save_seconds, plugins=loaded_plugins,
                jit_compile=jit_compile, other_signatures=others)

        # Build (and serialize) the report once before writing: a report that cannot be made must
        # fail the run while nothing has been written yet.
        json.dumps(make_report(None, 0.0), allow_nan=False)

        if any(p["name"] == "prune" and p["changed"] for p in pipeline_report.passes):
            from graphslim.passes.fuse_batchnorm import elementwise_batchnorms

            bns = elementwise_batchnorms(graph)
            if bns:
                app.warn(f"prune: {len(bns)} batch norm(s) (e.g. {bns[0]!r}) are element-wise ops, as "
                         "Keras exports them; their time shrinks only linearly with the channels, so the "
                         "pruned model gains less speed than MACs. Put fuse-batchnorm (keeps them "
                         "trainable) or fold-batchnorm before prune in --passes to fuse them into the "
                         "convolutions (benchmarks/prune_resnet50.py measures the difference)")

        if jit_compile:
            from graphslim.io.emitter import xla_cpu_caveats

            for caveat in xla_cpu_caveats(graph):
                app.warn(f"--jit-compile: {caveat}")
        steps.start(f"writing {out}")
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", XlaCheckWarning)
            written = graphslim.save(graph, out, force=force, jit_compile=jit_compile)
        for w in caught:
            if issubclass(w.category, XlaCheckWarning):
                app.warn(str(w.message))
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        save_seconds = time.perf_counter() - start
        steps.finish()
    data = make_report(_report.dir_size(written or out), save_seconds)
    if report_path is not None:
        _write_json(report_path, data)
    if not app.quiet:
        _print_optimize_summary(app, data, report_path)


def _print_optimize_summary(app: _App, data: dict, report_path: Path | None) -> None:
    console = app.out
    pipeline = data["pipeline"] or "(empty: round trip)"
    console.print(_text(f"{data['input']} -> {data['output']}   pipeline: {pipeline}"))

    table = _table()
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")
    for label, key, fmt in (("params", "params", _count), ("MACs", "macs", _count),
                            ("size on disk", "size_bytes", _report.human_bytes)):
        row = data[key]
        table.add_row(label, fmt(row["before"]), fmt(row["after"]),
                      _report.ratio_text(row["after"], row["before"]))
    console.print(table)

    if data["passes"]:
        passes = _table()
        passes.add_column("#", justify="right")
        passes.add_column("pass", overflow="fold")
        passes.add_column("time", justify="right")
        passes.add_column("changed")
        passes.add_column("stats", overflow="fold")
        for i, record in enumerate(data["passes"], start=1):
            passes.add_row(str(i), _text(record["text"]), f"{record['seconds']:.3f}s",
                           "yes" if record["changed"] else "no",
                           _text(_report.compact_stats(record["stats"])))
        console.print()
        console.print(passes)
    seconds = data["seconds"]
    console.print(f"time: load {seconds['load']:.2f}s, passes {seconds['passes']:.2f}s "
                  f"(+{seconds['input_verify'] or 0.0:.2f}s input check), write {seconds['save']:.2f}s")
    console.print(_text(f"wrote {data['output']}" + (f", report {report_path}" if report_path else "")))


# ---------------------------------------------------------------------------------- inspect
def _channels_module():
    try:
        module = importlib.import_module("graphslim.analysis.channels")
    except ModuleNotFoundError as exc:
        if exc.name in ("graphslim.analysis.channels", "graphslim.analysis"):
            raise GraphslimError("--groups needs the channel-group analysis "
                                 "(graphslim.analysis.channels), which this graphslim installation "
                                 "does not have yet; run inspect without --groups") from None
        raise
    missing = [f for f in ("channel_groups", "format_groups") if not hasattr(module, f)]
    if missing:
        raise GraphslimError(f"--groups needs graphslim.analysis.channels.{' and '.join(missing)}, "
                             "which this graphslim installation does not provide yet; run inspect "
                             "without --groups")
    return module


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--signature", default="serving_default", show_default=True,
              help="Signature whose graph is analysed (all signatures are listed).")
@click.option("--tags", default="serve", show_default=True,
              help="Comma-separated tag set of the MetaGraphDef.")
@click.option("--groups", is_flag=True, help="Also print the channel-dependency groups.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@_allow_ops_option
@_max_asset_option
@click.pass_obj
def inspect(app: _App, model: Path, signature: str, tags: str, groups: bool, as_json: bool,
            allow_ops, max_asset_mb: float | None) -> None:
    """Show MODEL's signatures, op histogram, params, MACs and layers.

    MODEL is a SavedModel directory or a frozen GraphDef .pb. Nothing is executed.
    """
    channels = _channels_module() if groups else None
    tag_set = _tags(tags)
    from graphslim.io.loader import describe

    with app.steps() as steps:
        steps.start(f"loading {model}")
        graph = _load(model, signature, tag_set, allow_ops, app, max_asset_mb)
        info = describe(model, tags=tag_set)
        snapshot = _report.layer_snapshot(graph)
        groups_text = None
        if channels is not None:
            steps.start("analysing channel groups")
            groups_text = channels.format_groups(channels.channel_groups(graph))
    ops = collections.Counter(n.op for n in graph.nodes())
    histogram = dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    layers = [{"name": l.name, "op": l.op, "shape": l.shape, "params": l.params, "macs": l.macs}
              for l in snapshot.layers.values()]
    signatures = {
        name: {kind: {key: {"dtype": dtype, "shape": shape} for key, (dtype, shape) in args.items()}
               for kind, args in sig.items()}
        for name, sig in info["signatures"].items()}
    if as_json:
        data = {"path": str(model), "format": info.get("format"), "tags": info.get("tags"),
                "tf_version": info.get("tf_version"), "signatures": signatures,
                "signature": graph.signature_name, "nodes": len(graph), "weights": len(graph.weights),
                "ops": histogram, "params": snapshot.params, "macs": snapshot.macs, "layers": layers}
        if groups_text is not None:
            data["groups"] = groups_text
        click.echo(json.dumps(_report.jsonable(data), indent=2, allow_nan=False))
        return

    console = app.out
    header = f"{model}: {info.get('format')}"
    if info.get("tags"):
        header += f", tags {','.join(info['tags'])}"
    if info.get("tf_version"):
        header += f", written by TensorFlow {info['tf_version']}"
    console.print(_text(header))

    sigs = _table("signatures")
    for column in ("signature", "", "name", "dtype", "shape"):
        sigs.add_column(column, overflow="fold")
    for name, sig in signatures.items():
        label = f"{name} (inspected)" if name == graph.signature_name else name
        for kind in ("inputs", "outputs"):
            for key, arg in sig[kind].items():
                sigs.add_row(_text(label), kind[:-1], _text(key), _text(arg["dtype"]),
                             _text(_report.shape_text(arg["shape"])))
                label = ""
    console.print(sigs)

    console.print()
    console.print(f"{len(graph)} nodes, {len(graph.weights)} weights, params {_count(snapshot.params)}, "
                  f"MACs {_count(snapshot.macs)} per example")
    hist = _table("ops")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, n in histogram.items():
        hist.add_row(_text(op), str(n))
    console.print(hist)

    console.print()
    table = _table("layers (nodes with params or MACs)")
    table.add_column("name", overflow="fold")
    table.add_column("op")
    table.add_column("output shape")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    for layer in layers:
        table.add_row(_text(layer["name"]), _text(layer["op"]), _text(_report.shape_text(layer["shape"])),
                      _count(layer["params"]), _count(layer["macs"]))
    console.print(table)
    if groups_text is not None:
        console.print()
        console.print("channel groups:")
        console.print(Text("\n".join(clean(line) for line in str(groups_text).splitlines())))


# ---------------------------------------------------------------------------------- scan
@cli.command("scan")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--tags", default=None, metavar="TAGS",
              help="Only the MetaGraphDef with this comma-separated tag set (default: all of them).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--list-allowed", is_flag=True,
              help="Print the allow-list (the op types graphslim accepts, by category) and exit.")
@_allow_ops_option
@click.pass_obj
def scan_command(app: _App, model: Path | None, tags: str | None, as_json: bool, list_allowed: bool,
                 allow_ops) -> None:
    """Check MODEL for ops outside graphslim's allow-list of compute-only ops.

    Walks the graph and every function of its library (reachable or not), and checks that variables
    and assets stay inside the model directory. Every op type must be on the allow-list (see
    --list-allowed); checkpoint ops (SaveV2, RestoreV2, ...) are accepted only inside the checkpoint
    machinery (the saver's own functions and nodes, never a write on the restore path). Nothing is
    executed. Exit status 0 when nothing is found (or everything found is accepted with --allow-ops),
    1 when something is refused, 2 when the model cannot be read.
    """
    if list_allowed:
        if model is not None:
            raise click.UsageError("--list-allowed prints the allow-list; it takes no MODEL.")
        import textwrap

        from graphslim.io.allowlist import describe

        data = describe()  # graphslim's own data, not the model's: printed as plain text
        if as_json:
            click.echo(json.dumps(data, indent=2))
            return
        lines = [f"graphslim's allow-list: {data['count']:,} op types that only compute. Any other op in a "
                 "model is refused unless --allow-ops names it."]
        for cat in data["categories"]:
            lines += ["", f"{cat['title']} ({len(cat['ops'])}):"]
            lines += textwrap.wrap(" ".join(cat["ops"]), width=100, initial_indent="  ", subsequent_indent="  ",
                                   break_on_hyphens=False)
        lines += ["", f"allowed only with these attrs ({len(data['conditional'])}):"]
        lines += [f"  {op}: is allowed {why}" for op, why in data["conditional"].items()]
        lines += ["", "checkpoint ops, accepted only as the model's own checkpoint machinery (never a write on "
                      "the restore path):", "  " + " ".join(data["checkpoint_machinery"])]
        click.echo("\n".join(lines))
        return
    if model is None:
        raise click.UsageError("Missing argument 'MODEL' (or pass --list-allowed).")
    from graphslim.io.scan import scan_report

    report = scan_report(model, tags=_tags(tags) if tags is not None else None, allow_ops=allow_ops)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        # Every model-provided string (op and node names, function names, attr values in the details,
        # notes) goes through _text (control characters escaped, never read as markup): an ESC
        # sequence in a node name must not be able to forge an "OK" line.
        console = app.out
        where = f"{report['meta_graphs']} MetaGraphDef(s), " if report["format"] == "saved_model" else ""
        console.print(_text(f"{model}: scanned {where}{report['nodes']:,} graph nodes, "
                            f"{report['functions']:,} functions ({report['function_nodes']:,} function nodes)"))
        rows = [(f, "REFUSED") for f in report["findings"]] + [(f, "allowed") for f in report["allowed"]]
        if rows:
            table = _table()
            for column in ("op", "node", "function", "why", "result"):
                table.add_column(column, overflow="fold")
            for f, verdict in rows:
                if f["op"] == "<path>":
                    table.add_row("(file)", _text(f["node"]), "-", _text(f["category"]), verdict)
                else:
                    table.add_row(_text(f["op"]), _text(f["node"]), _text(f["function"] or "(graph)"),
                                  _text(f["category"] + f["detail"]), verdict,
                                  style="red" if verdict == "REFUSED" else "yellow")
            console.print(table)
        for note in report["notes"]:
            console.print(_text(f"note: {note}"), soft_wrap=True)
        if report["safe"]:
            console.print("OK: nothing outside the allow-list found" + (
                f" ({len(report['allowed'])} finding(s) accepted with --allow-ops)" if report["allowed"] else ""))
        else:
            ops = sorted({f["op"] for f in report["findings"] if f["op"] != "<path>"})
            hint = f"; accept knowingly with --allow-ops {','.join(ops)}" if ops else ""
            console.print(_text(f"REFUSED: {len(report['findings'])} finding(s){hint}"), soft_wrap=True)
    if not report["safe"]:
        raise click.exceptions.Exit(1)


# ---------------------------------------------------------------------------------- passes
@cli.command("passes")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE_OR_FILE",
              help="Import a module or .py file that registers passes (repeatable).")
def passes_command(plugins) -> None:
    """List every registered pass with its help and options."""
    from graphslim.pipeline import BUILTIN_PASS_PACKAGE, registered_passes

    _load_plugins(plugins)
    lines = []
    for name, info in registered_passes().items():
        module = getattr(info.fn, "__module__", "") or ""
        origin = "" if module.startswith(BUILTIN_PASS_PACKAGE + ".") else f"  [from {module}]"
        lines.append(f"{name}{origin}")
        lines.append(f"    {info.help or '(no description)'}")
        if info.options:
            lines.append("    options:")
            lines.extend(f"      {opt.describe()}" for opt in info.options)
        else:
            lines.append("    options: none")
        lines.append("")
    if not lines:
        lines = ["no passes are registered"]
    click.echo("\n".join(lines).rstrip("\n"))


# ---------------------------------------------------------------------------------- verify
def _err_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


@cli.command()
@click.argument("model_a", metavar="A", type=click.Path(path_type=Path))
@click.argument("model_b", metavar="B", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), metavar="DATA.npz",
              default=None, help="Inputs as a .npz keyed by signature input name (default: random).")
@click.option("-n", "batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Batch size of the random inputs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--signature", default="serving_default", show_default=True,
              help="Signature to call in both models.")
@click.option("--rtol", type=float, default=1e-5, show_default=True, help="Relative tolerance.")
@click.option("--atol", type=float, default=1e-5, show_default=True, help="Absolute tolerance.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--trusted", is_flag=True,
              help="Run both models with TensorFlow's own SavedModel loader (still in the contained "
                   "child process) instead of graphslim's reading of them: an independent check of "
                   "graphslim's loader, for models you trust (the loader runs their restore functions).")
@_limits_options
@_allow_ops_option
@_max_asset_option
@click.pass_obj
def verify(app: _App, model_a: Path, model_b: Path, inputs_path: Path | None, batch: int, seed: int,
           signature: str, rtol: float, atol: float, as_json: bool, trusted: bool, timeout, max_memory,
           allow_ops, max_asset_mb) -> None:
    """Run SavedModels A and B on the same inputs and compare their outputs.

    This executes both models, in a contained child process (a fresh empty directory, Landlock
    file-system rules on Linux, memory and CPU limits, --timeout): each model as graphslim reads it
    (after the safety scan; weights from the checkpoint), never the input's own restore code. With
    --trusted, TensorFlow's own loader runs them instead. For every output: shapes, max abs and rel
    error, top-1 agreement. Outputs only one model has, or whose shapes differ, are listed but not
    compared. Exit status 1 when a compared output is not within tolerance
    (|B - A| <= atol + rtol * |A|) or nothing could be compared, 2 when a model cannot be read or
    its run fails (crash, limit, timeout), else 0.
    """
    from graphslim.checks import compare

    limits = _apply_limits(timeout, max_memory)
    with app.steps() as steps:
        data = compare(model_a, model_b, inputs=inputs_path, batch=batch, seed=seed, signature=signature,
                       rtol=rtol, atol=atol, trusted=trusted, allow_ops=allow_ops, limits=limits,
                       max_asset_mb=max_asset_mb, progress=steps.start, warn=app.warn)
    rows, ok = data["outputs"], data["ok"]
    compared = [r for r in rows if r["compared"]]
    if as_json:
        click.echo(json.dumps(_report.jsonable(data), indent=2, allow_nan=False))
    else:
        console = app.out
        shapes = ", ".join(f"{k} {v}" for k, v in data["input_shapes"].items())
        console.print(f"A: {clean(model_a)}\nB: {clean(model_b)}\nsignature {clean(signature)}, inputs "
                      f"{clean(data['inputs'])}: {clean(shapes)}")
        table = _table()
        for column, justify in (("output", "left"), ("shape A", "left"), ("shape B", "left"),
                                ("max abs err", "right"), ("max rel err", "right"),
                                ("top-1 agree", "right"), ("result", "left")):
            table.add_column(column, justify=justify, overflow="fold")
        for r in rows:
            top1 = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
            style = {"ok": "green", "MISMATCH": "red"}.get(r["status"], "yellow")
            shape_a = "-" if r["shape_a"] is None else _report.shape_text(r["shape_a"])
            shape_b = "-" if r["shape_b"] is None else _report.shape_text(r["shape_b"])
            table.add_row(_text(r["name"]), shape_a, shape_b,
                          _err_text(r["max_abs_error"]), _err_text(r["max_rel_error"]), top1,
                          r["status"], style=style)
        console.print(table)
        if not compared:
            verdict = "FAIL: no output could be compared (no output has the same name and shape in both)"
        elif ok:
            verdict = f"OK: {len(compared)} output(s) within rtol={rtol:g} atol={atol:g}"
        else:
            bad = [r["name"] for r in compared if not r["ok"]]
            verdict = f"FAIL: {', '.join(clean(b) for b in bad)} not within rtol={rtol:g} atol={atol:g}"
        console.print(verdict)
    if not ok:
        raise click.exceptions.Exit(1)


# ---------------------------------------------------------------------------------- bench
@cli.command()
@click.argument("models", metavar="MODEL...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), metavar="DATA.npz",
              default=None, help="Inputs as a .npz keyed by signature input name (default: random).")
@click.option("-n", "batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size of the random inputs.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="TensorFlow intra-op threads (default: one per core); inter-op threads are 1.")
@click.option("--rounds", type=click.IntRange(min=1), default=15, show_default=True,
              help="Rounds; each runs every model --calls times, the models taking turns.")
@click.option("--calls", type=click.IntRange(min=1), default=3, show_default=True,
              help="Calls per model per round.")
@click.option("--xla", is_flag=True,
              help="Also time each model compiled with XLA (wrapped in tf.function(jit_compile=True), "
                   "as `optimize --jit-compile` would write it).")
@click.option("--signature", default="serving_default", show_default=True,
              help="Signature to call in every model.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_limits_options
@_allow_ops_option
@_max_asset_option
@click.pass_obj
def bench(app: _App, models, inputs_path: Path | None, batch: int, threads: int | None, rounds: int,
          calls: int, xla: bool, signature: str, as_json: bool, timeout, max_memory, allow_ops,
          max_asset_mb) -> None:
    """Time SavedModels side by side on the same inputs: median latency per call and speedup.

    This executes the models, as graphslim reads them (after the safety scan), in one contained
    child process (see `verify`; --timeout applies to each timing round). The models take turns
    within each round, so a noisy machine slows all of them alike; each figure is the median over
    the rounds of the mean time of one call, timed inside the child, and the speedup of a model is
    the first model's median over its own (as saved against as saved, --xla against --xla). A model
    written with `optimize --jit-compile` runs through XLA as saved (runtime "xla (saved)").
    With --xla each model is also timed compiled by XLA, which is faster for some models and much
    slower for others (depthwise convolutions on CPU): time before choosing `optimize --jit-compile`.
    """
    from graphslim.checks import bench as run_bench

    limits = _apply_limits(timeout, max_memory)
    with app.steps() as steps:
        data = run_bench(models, inputs=inputs_path, batch=batch, threads=threads, rounds=rounds, calls=calls,
                         xla=xla, signature=signature, allow_ops=allow_ops, limits=limits,
                         max_asset_mb=max_asset_mb, progress=steps.start, warn=app.warn)
    rows = data["models"]
    if as_json:
        click.echo(json.dumps(_report.jsonable(data), indent=2, allow_nan=False))
        return
    console = app.out
    shapes = ", ".join(f"{k} {v}" for k, v in data["input_shapes"].items())
    console.print(f"signature {clean(signature)}, inputs {clean(data['inputs'])}: {clean(shapes)}; "
                  f"{threads or os.cpu_count()} intra-op thread(s); "
                  f"median of {rounds} rounds x {calls} calls")
    table = _table()
    columns = [("model", "left"), ("runtime", "left"), ("median", "right"), ("min..max", "right"),
               ("speedup", "right")] + ([("XLA vs graph", "right")] if xla else [])
    for column, justify in columns:
        table.add_column(column, justify=justify, overflow="fold")
    for r in rows:
        cells = [_text(r["model"]), r["runtime"], f"{r['median_ms']:.2f} ms",
                 f"{r['min_ms']:.2f}..{r['max_ms']:.2f}", f"{r['speedup']:.2f}x"]
        if xla:
            cells.append("-" if r["xla_gain"] is None else f"{r['xla_gain']:.2f}x")
        table.add_row(*cells)
    console.print(table)
    console.print("speedup: the first model's median over this one's (as saved against as saved, xla "
                  "against xla)" + ("; XLA vs graph: this model's median as saved over its XLA one" if xla else ""))


# ---------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``graphslim = graphslim.cli:main``)."""
    _install_signal_handlers()
    pattern = _startup_log_pattern(os.environ.get("TF_CPP_MIN_LOG_LEVEL"))
    if pattern is not None:
        _QuietTensorFlowImport(pattern).install()
    try:
        cli.main(args=argv, prog_name="graphslim")
    except KeyboardInterrupt as exc:
        click.echo(_interrupted_text(exc), err=True)
        sys.exit(getattr(exc, "exit_code", 130))


if __name__ == "__main__":
    main()
