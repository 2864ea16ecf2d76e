"""Terminal output of the ``graphslim`` commands: the stdout / stderr consoles, progress, tables.

All of graphslim's user-facing output goes through here (see :mod:`graphslim.cli`): results on stdout,
progress and warnings on stderr, model-provided text escaped (:func:`safe_text`, or
:func:`graphslim.terminal.clean` for plain text).

Example::

    app = App(quiet=False)
    with app.steps() as steps:
        steps.start("loading model/")
    table = new_table("ops")
    table.add_column("op")
    table.add_row(safe_text(node.op))
    app.out.print(table)
"""

from __future__ import annotations

import os
import re
import sys
import time

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from graphslim.pipeline import PassInstrument  # pure Python: importing it loads no TensorFlow
from graphslim.terminal import clean, markup


def paragraph(exc: BaseException) -> str:
    """``exc`` (or a message) as one line: its text with line breaks and the white space around them
    folded to single spaces, or the exception's type name when it has no text.

    Example::

        paragraph(ValueError("bad\n  shape"))   # "bad shape"
    """
    text = re.sub(r"\s*\n\s*", " ", str(exc).strip())
    return text or type(exc).__name__


# Model-provided text (node, op, signature and file names, error messages) can hold ESC sequences
# that move the cursor or restyle the terminal: it reaches the terminal only through clean() (plain
# text) or safe_text() (rich), see graphslim.terminal.
def safe_text(value) -> Text:
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


class App:
    """Per-invocation state: the -q flag and the stdout / stderr consoles."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.out = _console(sys.stdout)
        self.err = _console(sys.stderr)

    def warn(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"warning: {clean(paragraph(message))}", err=True)  # one line, escaped

    def steps(self) -> "Steps":
        return Steps(self.err, enabled=not self.quiet)


class Steps:
    """Progress on stderr: on a terminal, a spinner with the current step and a line per finished
    step; elsewhere (a pipe, a log) one plain line as each step starts, no animation."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self._status = None
        self._text: str | None = None
        self._start = 0.0

    def __enter__(self) -> "Steps":
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
            self.console.print(safe_text(f"{text} ..."))
        elif self._status is None:
            self._status = self.console.status(markup(text))  # rich's spinner reads markup
            self._status.start()
        else:
            self._status.update(markup(text))

    def update(self, text: str) -> None:
        """Change the current step's text (progress inside a step): on a terminal the spinner line; in
        a pipe or log a plain line at most every 5 seconds."""
        if not self.enabled or self._text is None:
            return
        if self.live and self._status is not None:
            self._status.update(markup(text))
        elif not self.live and time.perf_counter() - getattr(self, "_last_plain", 0.0) >= 5.0:
            self._last_plain = time.perf_counter()
            self.console.print(safe_text(f"  {text}"))

    def finish(self, note: str = "") -> None:
        if self._text is not None and self.live:
            elapsed = time.perf_counter() - self._start
            self.console.print(Text(f"done  {self._text} ({elapsed:.2f}s{note})", style="green"))
        self._text = None

    def fail(self) -> None:
        if self._text is not None and self.live:
            self.console.print(Text(f"FAILED  {self._text}", style="red"))
        self._text = None


class ProgressInstrument(PassInstrument):
    """Shows each pass by its text on the progress display as the pipeline runs."""

    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.index, self.total = 0, 0

    def run_before_pipeline(self, pipeline, graph) -> None:
        self.index, self.total = 0, len(pipeline)

    def run_before_pass(self, spec, graph) -> None:
        self.index += 1
        self.current = f"pass {self.index}/{self.total}: {spec}"
        self.steps.start(self.current)

    def on_progress(self, text: str) -> None:
        """What a pass reports with :func:`graphslim.pipeline.progress.progress`, shown after its name
        (install with ``graphslim.pipeline.progress.listen(instrument.on_progress)``)."""
        self.steps.update(f"{getattr(self, 'current', 'pass')}: {text}")

    def run_after_pass(self, spec, graph, result, seconds) -> None:
        self.steps.finish(", changed" if result.changed else ", unchanged")

    def run_on_error(self, spec, graph, exc) -> None:
        self.steps.fail()


def new_table(title: str | None = None) -> Table:
    """An empty table in the CLI's style (a rule under the header, no outer edge), titled on the left.

    Example::

        table = new_table("ops")
        table.add_column("op")
        app.out.print(table)
    """
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False)


def count_text(n: int | None) -> str:
    """A count with thousands separators (``"1,234"``), ``"-"`` when unknown."""
    return "-" if n is None else f"{n:,}"
