"""Terminal safety (issue 13, item 5): model-provided strings (signature names and keys, node and op
names in error messages, warnings) reach the terminal with their control characters escaped, and
rich markup in them is shown, never interpreted: a model cannot move the cursor, erase a line or
forge an "OK" verdict. (``scan``'s table is tested with the scan; JSON output is exempt.)
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import assert_clean_cli_error, run_cli

import corpus

EVIL = "\x1b[2K\r[green]OK[/green]\x1b[0m"
SHOWN = "\\x1b[2K\\r[green]OK[/green]\\x1b[0m"  # what the terminal must show instead


def evil_names(dst: Path, node: bool = False, op: bool = False) -> Path:
    """vgg_digits whose serving_default output key, and a second signature's name and key, carry ``EVIL``;
    with ``node`` the Softmax node's name too (TensorFlow refuses such a name: the load fails naming
    it), with ``op`` an extra node of op type ``"Evil" + EVIL`` (refused by the scan, naming it)."""
    def edit(meta):
        body = corpus.serving_body(meta)
        if node:
            softmax = next(n for n in body.node_def if n.op == "Softmax")
            old, softmax.name = softmax.name, "probs" + EVIL
            for n in body.node_def:
                for i, text in enumerate(n.input):
                    if text.startswith(old + ":"):
                        n.input[i] = softmax.name + text[len(old):]
            for key, text in body.ret.items():
                if text.startswith(old + ":"):
                    body.ret[key] = softmax.name + text[len(old):]
        if op:
            body.node_def.append(corpus.node_def("evil", "Evil" + EVIL))
        sig = meta.signature_def["serving_default"]
        key = next(iter(sig.outputs))
        sig.outputs["out" + EVIL].CopyFrom(sig.outputs[key])
        del sig.outputs[key]
        other = meta.signature_def["sig" + EVIL]
        other.CopyFrom(sig)
        other.outputs["alt" + EVIL].CopyFrom(sig.outputs["out" + EVIL])  # not an alias: listed
        del other.outputs["out" + EVIL]

    return corpus.edit(corpus.VGG, edit)(dst)


def assert_escaped(text: str) -> None:
    assert "\x1b" not in text and "\r" not in text, repr(text)
    assert "[green]OK[/green]" not in text.replace(SHOWN, ""), repr(text)  # only inside the escape


def test_inspect_escapes_signature_names_and_keys(tmp_path):
    model = evil_names(tmp_path)
    result = run_cli("inspect", model)
    assert result.returncode == 0, result.stderr
    assert_escaped(result.stdout)
    assert_escaped(result.stderr)
    assert f"sig{SHOWN}" in result.stdout and f"out{SHOWN}" in result.stdout


def test_optimize_escapes_warnings_and_the_summary(tmp_path):
    model = evil_names(tmp_path / "in")
    result = run_cli("optimize", model, "-o", tmp_path / "out", "--passes", "dce")
    assert result.returncode == 0, result.stderr
    assert_escaped(result.stdout)
    assert_escaped(result.stderr)
    assert f"'sig{SHOWN}'" in result.stderr  # the other-signatures warning names it


@pytest.mark.parametrize("kind", ["node", "op"])
def test_errors_naming_a_hostile_name_are_escaped(tmp_path, kind):
    model = evil_names(tmp_path / "in", **{kind: True})
    result = run_cli("optimize", model, "-o", tmp_path / "out", "--passes", "dce")
    line = assert_clean_cli_error(result, "\\x1b[2K")
    assert_escaped(result.stdout)
    assert_escaped(result.stderr)
    assert ("probs" if kind == "node" else "Evil") in line


def test_error_printer_escapes_every_error(monkeypatch):
    """GraphslimError and internal errors: the paragraph goes through clean()."""
    from click.testing import CliRunner

    from graphslim import cli
    from graphslim.commands import inspect as inspect_command
    from graphslim.errors import LoadError

    for exc, code in ((LoadError(f"node {EVIL}\u202e bad"), 2), (RuntimeError(f"x{EVIL}\u202e"), 3)):
        def boom(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(inspect_command, "load_model", boom)
        result = CliRunner().invoke(cli.cli, ["inspect", "somewhere"])
        assert result.exit_code == code, result.output
        assert_escaped(result.output)
        assert SHOWN in result.output and "\\u202e" in result.output and "\u202e" not in result.output


def test_progress_spinner_takes_no_markup_from_paths():
    """On a terminal the progress spinner is rich's, which parses markup: a path holding a stray
    closing tag must neither raise nor restyle."""
    from rich.console import Console

    from graphslim.commands.output import Steps

    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, markup=False, width=100)
    with Steps(console, enabled=True) as steps:
        steps.start(f"loading models/[/green]{EVIL}")
        steps.start("pass 1/1: dce")
    shown = stream.getvalue()
    assert "[/green]" in shown and "\\x1b[2K" in shown
