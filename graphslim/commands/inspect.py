"""The ``graphslim`` commands that read and print, executing nothing: ``inspect`` (a model's signatures,
op histogram, params, MACs and layers), ``scan`` (ops outside the allow-list) and ``passes`` (the
registered passes and their options).

Example::

    graphslim inspect model/ --groups
    graphslim scan model/ --json
    graphslim passes --plugin my_passes.py
"""

from __future__ import annotations

import collections
import importlib
import json
from pathlib import Path

import click
from rich.text import Text

from graphslim import report as _report
from graphslim.commands.options import allow_ops_option, load_model, load_plugins, max_asset_option, parse_tags
from graphslim.commands.output import App, count_text, new_table, safe_text
from graphslim.errors import GraphslimError
from graphslim.terminal import clean


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


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--signature", default="serving_default", show_default=True,
              help="Signature whose graph is analysed (all signatures are listed).")
@click.option("--tags", default="serve", show_default=True,
              help="Comma-separated tag set of the MetaGraphDef.")
@click.option("--groups", is_flag=True, help="Also print the channel-dependency groups.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@allow_ops_option
@max_asset_option
@click.pass_obj
def inspect(app: App, model: Path, signature: str, tags: str, groups: bool, as_json: bool,
            allow_ops, max_asset_mb: float | None) -> None:
    """Show MODEL's signatures, op histogram, params, MACs and layers.

    MODEL is a SavedModel directory or a frozen GraphDef .pb. Nothing is executed.
    """
    channels = _channels_module() if groups else None
    tag_set = parse_tags(tags)
    from graphslim.io.loader import describe

    with app.steps() as steps:
        steps.start(f"loading {model}")
        graph = load_model(model, signature, tag_set, allow_ops, app, max_asset_mb)
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
    console.print(safe_text(header))

    sigs = new_table("signatures")
    for column in ("signature", "", "name", "dtype", "shape"):
        sigs.add_column(column, overflow="fold")
    for name, sig in signatures.items():
        label = f"{name} (inspected)" if name == graph.signature_name else name
        for kind in ("inputs", "outputs"):
            for key, arg in sig[kind].items():
                sigs.add_row(safe_text(label), kind[:-1], safe_text(key), safe_text(arg["dtype"]),
                             safe_text(_report.shape_text(arg["shape"])))
                label = ""
    console.print(sigs)

    console.print()
    console.print(f"{len(graph)} nodes, {len(graph.weights)} weights, params {count_text(snapshot.params)}, "
                  f"MACs {count_text(snapshot.macs)} per example")
    hist = new_table("ops")
    hist.add_column("op")
    hist.add_column("count", justify="right")
    for op, n in histogram.items():
        hist.add_row(safe_text(op), str(n))
    console.print(hist)

    console.print()
    table = new_table("layers (nodes with params or MACs)")
    table.add_column("name", overflow="fold")
    table.add_column("op")
    table.add_column("output shape")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    for layer in layers:
        table.add_row(safe_text(layer["name"]), safe_text(layer["op"]), safe_text(_report.shape_text(layer["shape"])),
                      count_text(layer["params"]), count_text(layer["macs"]))
    console.print(table)
    if groups_text is not None:
        console.print()
        console.print("channel groups:")
        console.print(Text("\n".join(clean(line) for line in str(groups_text).splitlines())))


@click.command("scan")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--tags", default=None, metavar="TAGS",
              help="Only the MetaGraphDef with this comma-separated tag set (default: all of them).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--list-allowed", is_flag=True,
              help="Print the allow-list (the op types graphslim accepts, by category) and exit.")
@allow_ops_option
@click.pass_obj
def scan_command(app: App, model: Path | None, tags: str | None, as_json: bool, list_allowed: bool,
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

    report = scan_report(model, tags=parse_tags(tags) if tags is not None else None, allow_ops=allow_ops)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        # Every model-provided string (op and node names, function names, attr values in the details,
        # notes) goes through _text (control characters escaped, never read as markup): an ESC
        # sequence in a node name must not be able to forge an "OK" line.
        console = app.out
        where = f"{report['meta_graphs']} MetaGraphDef(s), " if report["format"] == "saved_model" else ""
        console.print(safe_text(f"{model}: scanned {where}{report['nodes']:,} graph nodes, "
                            f"{report['functions']:,} functions ({report['function_nodes']:,} function nodes)"))
        rows = [(f, "REFUSED") for f in report["findings"]] + [(f, "allowed") for f in report["allowed"]]
        if rows:
            table = new_table()
            for column in ("op", "node", "function", "why", "result"):
                table.add_column(column, overflow="fold")
            for f, verdict in rows:
                if f["op"] == "<path>":
                    table.add_row("(file)", safe_text(f["node"]), "-", safe_text(f["category"]), verdict)
                else:
                    table.add_row(safe_text(f["op"]), safe_text(f["node"]), safe_text(f["function"] or "(graph)"),
                                  safe_text(f["category"] + f["detail"]), verdict,
                                  style="red" if verdict == "REFUSED" else "yellow")
            console.print(table)
        for note in report["notes"]:
            console.print(safe_text(f"note: {note}"), soft_wrap=True)
        if report["safe"]:
            console.print("OK: nothing outside the allow-list found" + (
                f" ({len(report['allowed'])} finding(s) accepted with --allow-ops)" if report["allowed"] else ""))
        else:
            ops = sorted({f["op"] for f in report["findings"] if f["op"] != "<path>"})
            hint = f"; accept knowingly with --allow-ops {','.join(ops)}" if ops else ""
            console.print(safe_text(f"REFUSED: {len(report['findings'])} finding(s){hint}"), soft_wrap=True)
    if not report["safe"]:
        raise click.exceptions.Exit(1)


@click.command("passes")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE_OR_FILE",
              help="Import a module or .py file that registers passes (repeatable).")
def passes_command(plugins) -> None:
    """List every registered pass with its help and options."""
    from graphslim.pipeline import BUILTIN_PASS_PACKAGE, registered_passes

    load_plugins(plugins)
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
