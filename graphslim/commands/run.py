"""The ``graphslim`` commands that execute models (in the contained child process, after the safety
scan): ``verify`` (compare two models' outputs) and ``bench`` (time models side by side). The work is
:mod:`graphslim.checks`'; these format its results.

Example::

    graphslim verify model/ model_small/ -n 16 --atol 1e-4
    graphslim bench model/ model_small/ --threads 2 --runtime tf,xla,litert
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from graphslim import report as _report
from graphslim.commands.options import allow_ops_option, apply_limits, limits_options, max_asset_option
from graphslim.commands.output import App, new_table, safe_text
from graphslim.terminal import clean


def _err_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


@click.command()
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
@limits_options
@allow_ops_option
@max_asset_option
@click.pass_obj
def verify(app: App, model_a: Path, model_b: Path, inputs_path: Path | None, batch: int, seed: int,
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

    limits = apply_limits(timeout, max_memory)
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
        table = new_table()
        for column, justify in (("output", "left"), ("shape A", "left"), ("shape B", "left"),
                                ("max abs err", "right"), ("max rel err", "right"),
                                ("top-1 agree", "right"), ("result", "left")):
            table.add_column(column, justify=justify, overflow="fold")
        for r in rows:
            top1 = "-" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
            style = {"ok": "green", "MISMATCH": "red"}.get(r["status"], "yellow")
            shape_a = "-" if r["shape_a"] is None else _report.shape_text(r["shape_a"])
            shape_b = "-" if r["shape_b"] is None else _report.shape_text(r["shape_b"])
            table.add_row(safe_text(r["name"]), shape_a, shape_b,
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


def _runtimes(ctx, param, value) -> list[str]:
    """--runtime values (repeatable, comma-separated) checked against graphslim.checks.RUNTIMES."""
    from graphslim.checks import runtime_list
    from graphslim.errors import GraphslimError

    if not value:
        return []
    try:
        return runtime_list(value)
    except GraphslimError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command()
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
@click.option("--runtime", "runtimes", multiple=True, metavar="tf|xla|litert", callback=_runtimes,
              help="Runtime(s) to time each model in (repeatable or comma-separated; default tf): tf "
                   "(TensorFlow's graph executor), xla (compiled by XLA, as `optimize --jit-compile` would "
                   "write it), litert (converted to TFLite with builtin ops, run by the LiteRT "
                   "interpreter on XNNPACK with --threads).")
@click.option("--xla", is_flag=True, help="Same as adding --runtime xla.")
@click.option("--signature", default="serving_default", show_default=True,
              help="Signature to call in every model.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@limits_options
@allow_ops_option
@max_asset_option
@click.pass_obj
def bench(app: App, models, inputs_path: Path | None, batch: int, threads: int | None, rounds: int,
          calls: int, runtimes: list, xla: bool, signature: str, as_json: bool, timeout, max_memory, allow_ops,
          max_asset_mb) -> None:
    """Time SavedModels side by side on the same inputs: median latency per call and speedup.

    This executes the models, as graphslim reads them (after the safety scan), in one contained
    child process (see `verify`; --timeout applies to each timing round). The models take turns
    within each round, so a noisy machine slows all of them alike; each figure is the median over
    the rounds of the mean time of one call, timed inside the child, and the speedup of a model is
    the first model's median over its own within a runtime. --runtime tf runs each model as saved in
    TensorFlow (runtime "graph"; a model written with `optimize --jit-compile` runs through XLA as
    saved: "xla (saved)"). --runtime xla compiles each model with XLA, which is faster for some models
    and much slower for others (depthwise convolutions on CPU): time before choosing `optimize
    --jit-compile`. --runtime litert converts graphslim's reading of each model to TFLite in the child
    (builtin ops; a model with ops TFLite lacks is refused, naming them) and runs it with LiteRT.
    """
    from graphslim.checks import bench as run_bench

    limits = apply_limits(timeout, max_memory)
    with app.steps() as steps:
        data = run_bench(models, inputs=inputs_path, batch=batch, threads=threads, rounds=rounds, calls=calls,
                         runtimes=runtimes or ("tf",), xla=xla, signature=signature, allow_ops=allow_ops, limits=limits,
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
    table = new_table()
    versus = "tf" in data["runtimes"] and len(data["runtimes"]) > 1
    columns = [("model", "left"), ("runtime", "left"), ("median", "right"), ("min..max", "right"),
               ("speedup", "right")] + ([("vs tf", "right")] if versus else [])
    for column, justify in columns:
        table.add_column(column, justify=justify, overflow="fold")
    for r in rows:
        cells = [safe_text(r["model"]), r["runtime"], f"{r['median_ms']:.2f} ms",
                 f"{r['min_ms']:.2f}..{r['max_ms']:.2f}", f"{r['speedup']:.2f}x"]
        if versus:
            cells.append("-" if r["vs_tf"] is None else f"{r['vs_tf']:.2f}x")
        table.add_row(*cells)
    console.print(table)
    console.print("speedup: the first model's median over this one's, within a runtime"
                  + ("; vs tf: this model's median in TensorFlow as saved over this runtime's" if versus else "")
                  + (f"; LiteRT: {clean(data['litert_interpreter'])}" if data["litert_interpreter"] else ""))
