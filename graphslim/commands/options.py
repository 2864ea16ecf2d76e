"""Command-line options shared by the ``graphslim`` commands, and what they feed: the tag set, the
limits of the process running a model, plugins, and loading a model with the safety scan.

Example::

    @click.command()
    @allow_ops_option
    @max_asset_option
    @click.pass_obj
    def inspect(app, allow_ops, max_asset_mb): ...
"""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from graphslim.commands.output import App


def limits_options(f):
    """Add ``--max-memory GIB`` and ``--timeout SECONDS`` (the limits of the process running the
    model; see :func:`apply_limits`) to a click command."""
    f = click.option("--max-memory", "max_memory", type=click.FloatRange(min=0.5), default=None,
                     metavar="GIB",
                     help="Address-space limit of the process that runs the model, in GiB (default: "
                          "three quarters of this machine's memory, at least 8).")(f)
    f = click.option("--timeout", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
                     help="Wall-clock limit of each run of a model (one call, one calibration batch, "
                          "one timing round): the process running it is killed after that "
                          "(default 900).")(f)
    return f


def apply_limits(timeout: float | None, max_memory: float | None):
    """The limits of the processes that run models (graphslim.sandbox), from the CLI options."""
    from graphslim.sandbox import default_limits, set_default_limits

    set_default_limits(timeout=timeout, memory=None if max_memory is None else int(max_memory * (1 << 30)))
    return default_limits()


def allow_ops_option(f):
    """Add ``--allow-ops OP[,OP...]`` (op types the safety scan should accept) to a click command."""
    return click.option(
        "--allow-ops", "allow_ops", multiple=True, metavar="OP[,OP...]",
        help="Accept these op types knowingly although the safety scan refuses them (e.g. "
             "PyFunc, ReadFile); repeatable or comma-separated. See `graphslim scan`.")(f)


def max_asset_option(f):
    """Add ``--max-asset-mb MIB`` (the loader's per-file asset limit) to a click command."""
    return click.option(
        "--max-asset-mb", "max_asset_mb", type=click.FloatRange(min=0, min_open=True), default=None,
        metavar="MIB",
        help="Largest asset file (assets/) read from the model, in MiB; all assets together may take "
             "4 times that (default 64).")(f)


def load_model(model: Path, signature: str, tags, allow_ops, app: App, max_asset_mb: float | None = None):
    """``graphslim.io.loader.load`` with the safety scan on; the scan's notes (:class:`ScanNote`)
    become warnings of the command (``app.warn``).

    Example::

        graph = load_model(Path("model/"), "serving_default", ("serve",), (), app)
    """
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


def parse_tags(text: str) -> tuple[str, ...]:
    """``--tags`` text as a tag set: ``"serve, gpu"`` → ``("serve", "gpu")``."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def load_plugins(plugins) -> list[str]:
    """Import the ``--plugin`` modules or files, then the entry-point plugins; returns what was
    loaded (the given plugins, then the entry points'), for the report."""
    from graphslim.pipeline import load_entry_point_plugins, load_plugin

    for plugin in plugins:
        load_plugin(plugin)
    return list(plugins) + load_entry_point_plugins()
