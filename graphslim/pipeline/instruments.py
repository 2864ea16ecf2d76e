"""Pass instruments: hooks around each pass (TVM style), and IR printing (MLIR style).

:class:`PassInstrument` is the base: every hook is a no-op, subclass and override what you need.
:class:`PrintIRAfter` and :class:`PrintIRBefore` print the graph as text after (before) chosen passes,
like MLIR's ``--mlir-print-ir-after=``; the text is ``graph.format()`` when the graph has it, else
:func:`format_graph`.

Example::

    PassManager("fold-batchnorm,prune{ratio=0.5},dce", instruments=[PrintIRAfter("prune")]).run(graph)
    # stderr:
    # // -----// IR Dump After prune{ratio=0.5} (2nd of 3) //----- //
    # graph serving_default (41 nodes, 12 weights) {
    #   input_1 = Placeholder() {dtype=float32, shape=[?,32,32,3]} -> float32[?,32,32,3]
    #   ...
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from typing import Any, TextIO

from graphslim.errors import PipelineError
from graphslim.pipeline.messages import ordinal
from graphslim.pipeline.results import PassResult, PipelineReport
from graphslim.pipeline.spec import PassSpec, Pipeline


class PassInstrument:
    """Hooks around pass execution (TVM style); subclass and override what you need.

    Instruments observe, they do not change the run: the CLI uses them for progress display, and
    they are the place for IR dumps and extra timing. Every method is a no-op here. An exception
    raised by an instrument propagates unchanged.

    Example::

        class Progress(PassInstrument):
            def run_after_pass(self, spec, graph, result, seconds):
                console.log(f"{spec}: {seconds:.2f}s, changed={result.changed}")

        PassManager("dce", instruments=[Progress()]).run(graph)
    """

    def run_before_pipeline(self, pipeline: Pipeline, graph: Any) -> None:
        """Called once before the first pass (after verifying the input graph)."""

    def run_before_pass(self, spec: PassSpec, graph: Any) -> None:
        """Called before each pass."""

    def run_after_pass(
        self, spec: PassSpec, graph: Any, result: PassResult, seconds: float
    ) -> None:
        """Called after each pass that succeeded and verified; ``seconds`` times the pass alone."""

    def run_on_error(self, spec: PassSpec, graph: Any, exc: BaseException) -> None:
        """Called when a pass raises or the graph fails verification after it (``exc``: the cause).

        ``graph`` is as the failed pass left it; the manager rolls it back after this hook.
        """

    def run_after_pipeline(self, pipeline: Pipeline, graph: Any, report: PipelineReport) -> None:
        """Called once after the last pass succeeded."""


class _PrintIR(PassInstrument):
    """What PrintIRAfter and PrintIRBefore share: which passes, where to, how to format."""

    when = ""

    def __init__(
        self,
        *passes: str,
        file: TextIO | None = None,
        formatter: Callable[[Any], str] | None = None,
    ) -> None:
        self.passes = tuple(passes)
        self.file = file
        self.formatter = formatter
        self._index, self._total = 0, 0

    def run_before_pipeline(self, pipeline: Pipeline, graph: Any) -> None:
        self._index, self._total = 0, len(pipeline)
        texts = [t for spec in pipeline for t in (spec.name, str(spec))]
        for name in self.passes:
            if name not in texts:
                close = difflib.get_close_matches(name, texts, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise PipelineError(
                    f"{type(self).__name__}: no pass '{name}' in the pipeline '{pipeline}'{hint} "
                    "(name a pass by its name, e.g. 'prune', or its text, e.g. 'prune{ratio=0.5}')"
                )

    def run_before_pass(self, spec: PassSpec, graph: Any) -> None:
        self._index += 1

    def chosen(self, spec: PassSpec) -> bool:
        """True when this instrument prints around ``spec`` (every pass when none was named)."""
        return not self.passes or spec.name in self.passes or str(spec) in self.passes

    def dump(self, spec: PassSpec, graph: Any, failed: bool = False) -> None:
        """Write the header line and the graph's text to ``file`` (stderr by default)."""
        where = f" ({ordinal(self._index)} of {self._total})" if self._total else ""
        status = " Failed" if failed else ""
        if self.formatter is not None:
            text = self.formatter(graph)
        elif callable(getattr(graph, "format", None)):
            text = graph.format()
        else:
            text = format_graph(graph)
        out = self.file if self.file is not None else sys.stderr
        out.write(f"// -----// IR Dump {self.when} {spec}{where}{status} //----- //\n")
        out.write(text if text.endswith("\n") else text + "\n")
        out.flush()


class PrintIRAfter(_PrintIR):
    """Print the graph after the named passes (all passes when none is named), MLIR style.

    ``passes`` are pass names (``"prune"``) or canonical pass texts (``"prune{ratio=0.5}"``); a name
    that matches no pass of the pipeline is an error before the first pass runs. A pass that fails
    is printed too, as it left the graph (before the manager rolls it back), with ``Failed`` in the
    header. ``only_changed`` skips passes that reported no change. ``file`` is a text stream
    (default: stderr); ``formatter(graph) -> str`` replaces the default text of the graph.

    Example::

        PassManager("prune{ratio=0.5},dce", instruments=[PrintIRAfter("prune")]).run(graph)
        # // -----// IR Dump After prune{ratio=0.5} (1st of 2) //----- //
        # graph serving_default (40 nodes, 12 weights) { ... }
    """

    when = "After"

    def __init__(
        self,
        *passes: str,
        file: TextIO | None = None,
        only_changed: bool = False,
        formatter: Callable[[Any], str] | None = None,
    ) -> None:
        super().__init__(*passes, file=file, formatter=formatter)
        self.only_changed = only_changed

    def run_after_pass(
        self, spec: PassSpec, graph: Any, result: PassResult, seconds: float
    ) -> None:
        if self.chosen(spec) and (result.changed or not self.only_changed):
            self.dump(spec, graph)

    def run_on_error(self, spec: PassSpec, graph: Any, exc: BaseException) -> None:
        if self.chosen(spec):
            self.dump(spec, graph, failed=True)


class PrintIRBefore(_PrintIR):
    """Print the graph before the named passes (all passes when none is named), MLIR style.

    Arguments as for :class:`PrintIRAfter` (without ``only_changed``).

    Example::

        PassManager("prune{ratio=0.5},dce", instruments=[PrintIRBefore("dce")]).run(graph)
        # // -----// IR Dump Before dce (2nd of 2) //----- //
    """

    when = "Before"

    def run_before_pass(self, spec: PassSpec, graph: Any) -> None:
        super().run_before_pass(spec, graph)
        if self.chosen(spec):
            self.dump(spec, graph)


# --------------------------------------------------------------------------------------------------
# The graph as text
# --------------------------------------------------------------------------------------------------


def format_graph(graph: Any) -> str:
    """The graph's own text dump, :meth:`graphslim.ir.graph.Graph.format` (one node a line:
    ``name = Op(inputs) {attrs} -> dtype[shape]``, the signature's outputs last). Any graph-like object
    with a ``format()`` method works (the pipeline needs no TensorFlow import here)."""
    return graph.format()
