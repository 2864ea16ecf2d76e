"""``graphslim optimize``: load a model, run a pipeline of passes over it, write the result (and a
JSON report), print a summary of what changed.

Example::

    graphslim optimize model/ -o model_small/ --passes "fold-batchnorm,dce" --report report.json
    graphslim optimize model/ -o model_small/ --passes "fold-batchnorm" --tflite model_small.tflite
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import click

import graphslim
from graphslim import report as _report
from graphslim.commands.options import (allow_ops_option, apply_limits, limits_options, load_model, load_plugins,
                                        max_asset_option, parse_tags)
from graphslim.commands.output import App, ProgressInstrument, count_text, new_table, safe_text
from graphslim.errors import EmitError, GraphslimError, XlaCheckWarning
from graphslim.fileio import write_bytes_atomic, write_text_atomic
from graphslim.pipeline.progress import listen

_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


def _model_dir(path: Path) -> Path:
    """The directory of a SavedModel given as its folder or its saved_model.pb; else ``path``."""
    return path.parent if path.is_file() and path.name in _SAVED_MODEL_FILES else path


def _check_output_paths(model: Path, out: Path, force: bool, report_path: Path | None,
                        inputs=(), tflite_path: Path | None = None) -> None:
    """Before anything is read or written: -o, --report and --tflite must not be the input model, lie
    inside it, or (for -o, which --force replaces whole) contain it; nor be one of the other files the
    run reads (``inputs``: --config, --plugin files). Paths are compared resolved (symlinks followed)."""
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
    files = [(flag, path, what, example) for flag, path, what, example in (
        ("--report", report_path, "report", "report.json"), ("--tflite", tflite_path, "TFLite model", "model.tflite"))
        if path is not None]
    for flag, path, what, example in files:
        _check_file_option(flag, path, what, example, model, src, out, dst, others)
    if len(files) == 2 and report_path.resolve() == tflite_path.resolve():
        raise EmitError(f"--tflite {tflite_path} is also the --report file; give each its own file name")


def _check_file_option(flag: str, path: Path, what: str, example: str, model: Path, src: Path, out: Path,
                       dst: Path, others) -> None:
    """A file option (--report, --tflite) must not be or lie inside the input, be -o itself or an input of
    the run, nor be a directory; its directory must exist (or be -o, written first)."""
    resolved = path.resolve()
    if resolved == src or src in resolved.parents:
        raise EmitError(f"{flag} {path} is the input model or a file inside it; writing it would change the "
                        f"input {model}. Write the {what} somewhere else")
    if resolved == dst:
        raise EmitError(f"{flag} {path} is the output directory -o {out}; give the {what} its own file name "
                        "(it may be inside -o)")
    for given, other in others:
        if resolved == other:
            raise EmitError(f"{flag} {path} is {given}, an input of this run; write the {what} somewhere "
                            "else")
    if path.is_dir():
        raise GraphslimError(f"{flag} {path} is a directory; give a file name like {example}")
    parent = path.parent
    if not parent.is_dir():
        raise GraphslimError(f"cannot write the {what} {path}: the directory {parent} does not exist")


def _write_tflite(graph, path: Path) -> tuple[dict, GraphslimError | None]:
    """Convert the graph just written and write ``path``: (the report's ``tflite`` entry, the failure)."""
    start = time.perf_counter()
    try:
        flatbuffer = graphslim.to_tflite(graph)
        write_bytes_atomic(path, flatbuffer)
    except GraphslimError as exc:
        return {"path": str(path), "size_bytes": None, "error": str(exc)}, exc
    except OSError as exc:
        failure = GraphslimError(f"cannot write the TFLite model {path}: {exc.strerror or exc}.")
        return {"path": str(path), "size_bytes": None, "error": str(failure)}, failure
    return {"path": str(path), "size_bytes": len(flatbuffer), "seconds": time.perf_counter() - start}, None


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise GraphslimError(f"cannot write the report {path}: {exc.strerror or exc} (the model itself "
                             "was written)") from exc


@click.command()
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
@click.option("--tflite", "tflite_path", type=click.Path(path_type=Path), metavar="OUT.tflite", default=None,
              help="Also write the optimized model as a TFLite flatbuffer for LiteRT (graphslim's graph "
                   "converted with TensorFlow's TFLite converter, builtin ops only, in the contained child "
                   "process). Refused, naming the ops, if TFLite lacks one; the SavedModel is still written.")
@allow_ops_option
@max_asset_option
@limits_options
@click.pass_obj
def optimize(app: App, model: Path, out: Path, passes: str | None, config: Path | None, plugins,
             report_path: Path | None, signature: str, tags: str, no_verify: bool,
             force: bool, jit_compile: bool, tflite_path: Path | None, allow_ops, max_asset_mb: float | None,
             timeout, max_memory) -> None:
    """Load MODEL, run the pipeline over it and write the result to -o OUT.

    MODEL is a SavedModel directory or a frozen GraphDef .pb. Without --passes or --config the
    model is written back unchanged (a round trip through graphslim's IR).
    """
    if passes is not None and config is not None:
        raise click.UsageError("--passes and --config cannot be used together: give the pipeline "
                               "either as text or as a TOML file")
    _check_output_paths(model, out, force, report_path,
                        inputs=[p for p in [config, *map(Path, plugins)] if p is not None and p.is_file()],
                        tflite_path=tflite_path)
    verify = not no_verify
    tag_set = parse_tags(tags)
    apply_limits(timeout, max_memory)  # for passes that run the model (calibration data)
    with app.steps() as steps:
        steps.start("loading passes")  # the built-in passes import TensorFlow: a few seconds
        loaded_plugins = load_plugins(plugins)
        from graphslim.pipeline import PassManager, load_pipeline_config, parse_pipeline

        pipeline = load_pipeline_config(config) if config is not None else parse_pipeline(passes or "")
        shown = ProgressInstrument(steps)
        manager = PassManager(pipeline, verify=verify, instruments=[shown])

        steps.start(f"loading {model}")
        start = time.perf_counter()
        graph = load_model(model, signature, tag_set, allow_ops, app, max_asset_mb)
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
        with listen(shown.on_progress):  # passes report progress inside their step
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
        failure = None
        if tflite_path is not None:
            steps.start(f"converting to TFLite {tflite_path}")
            tflite, failure = _write_tflite(graph, tflite_path)
        steps.finish()
    data = make_report(_report.dir_size(written or out), save_seconds)
    if tflite_path is not None:
        data["tflite"] = tflite
    if report_path is not None:
        _write_json(report_path, data)
    if failure is not None:
        wrote = f"The SavedModel {out} was written" + (f" (and the report {report_path})" if report_path else "")
        raise type(failure)(f"{failure} {wrote}; the TFLite model {tflite_path} was not. Deploy the SavedModel "
                            "with TensorFlow, or leave out --tflite.")
    if not app.quiet:
        _print_optimize_summary(app, data, report_path)


def _print_optimize_summary(app: App, data: dict, report_path: Path | None) -> None:
    console = app.out
    pipeline = data["pipeline"] or "(empty: round trip)"
    console.print(safe_text(f"{data['input']} -> {data['output']}   pipeline: {pipeline}"))

    table = new_table()
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")
    for label, key, fmt in (("params", "params", count_text), ("MACs", "macs", count_text),
                            ("size on disk", "size_bytes", _report.human_bytes)):
        row = data[key]
        table.add_row(label, fmt(row["before"]), fmt(row["after"]),
                      _report.ratio_text(row["after"], row["before"]))
    console.print(table)

    if data["passes"]:
        passes = new_table()
        passes.add_column("#", justify="right")
        passes.add_column("pass", overflow="fold")
        passes.add_column("time", justify="right")
        passes.add_column("changed")
        passes.add_column("stats", overflow="fold")
        for i, record in enumerate(data["passes"], start=1):
            passes.add_row(str(i), safe_text(record["text"]), f"{record['seconds']:.3f}s",
                           "yes" if record["changed"] else "no",
                           safe_text(_report.compact_stats(record["stats"])))
        console.print()
        console.print(passes)
    seconds = data["seconds"]
    console.print(f"time: load {seconds['load']:.2f}s, passes {seconds['passes']:.2f}s "
                  f"(+{seconds['input_verify'] or 0.0:.2f}s input check), write {seconds['save']:.2f}s")
    tflite = data.get("tflite")
    console.print(safe_text(f"wrote {data['output']}" + (f", report {report_path}" if report_path else "")
                            + (f", TFLite {tflite['path']} ({_report.human_bytes(tflite['size_bytes'])})"
                               if tflite else "")))
