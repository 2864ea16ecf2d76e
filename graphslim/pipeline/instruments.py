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
# The graph as text (until the IR has its own Graph.format())
# --------------------------------------------------------------------------------------------------

_MAX_VALUE = 60  # characters of one attribute value before it is elided


def format_graph(graph: Any) -> str:
    """A compact, readable text of a graphslim :class:`~graphslim.ir.Graph`, one node a line.

    Nodes in topological order as ``name = Op(inputs) {attrs} -> dtype[shape]``; an input is
    ``node`` (port 0), ``node:1`` or ``^node`` (control); attributes whose name starts with ``_``
    are left out and long values elided; weights say whether they are trainable. The signature's
    outputs close the graph. Uses only the public Graph API (no TensorFlow import here).

    Example::

        print(format_graph(graph))
        # graph serving_default (3 nodes, 1 weights) {
        #   x = Placeholder() {dtype=float32, shape=[?,4]} -> float32[?,4]
        #   w = Weight() -> float32[4,2]  // trainable
        #   y = MatMul(x, w) {T=float32, transpose_a=false, transpose_b=false} -> float32[?,2]
        #   return {logits: y}
        # }
    """
    weights = graph.weights
    lines = [f"graph {graph.signature_name} ({len(graph)} nodes, {len(weights)} weights) {{"]
    for node in graph.topo_order():
        args = [_tensor_text(t) for t in graph.inputs_of(node)]
        args += [f"^{name}" for name in graph.control_inputs_of(node)]
        attrs = ", ".join(
            f"{key}={_value_text(node.attr(key))}" for key in sorted(node.attrs) if not key.startswith("_")
        )
        outputs = [_type_text(d, s) for d, s in zip(node.dtypes, node.shapes)]
        line = f"  {node.name} = {node.op}({', '.join(args)})"
        line += f" {{{attrs}}}" if attrs else ""
        if len(outputs) == 1:
            line += f" -> {outputs[0]}"
        elif outputs:
            line += f" -> ({', '.join(outputs)})"
        if node.name in weights:
            line += "  // trainable" if weights[node.name].trainable else "  // not trainable"
        lines.append(line)
    results = ", ".join(f"{arg.name}: {_tensor_text(arg.tensor)}" for arg in graph.outputs)
    lines.append(f"  return {{{results}}}")
    if graph.functions:
        lines.append(f"  // functions: {', '.join(sorted(graph.functions))}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _tensor_text(tensor: Any) -> str:
    return tensor.node if tensor.port == 0 else f"{tensor.node}:{tensor.port}"


def _type_text(dtype: Any, shape: Any) -> str:
    name = getattr(dtype, "name", str(dtype))
    if shape is None:
        return f"{name}[*]"
    return f"{name}[{','.join('?' if d is None else str(d) for d in shape)}]"


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, bytes)):
        text = repr(value) if isinstance(value, bytes) else f'"{value}"'
    elif isinstance(value, tuple):  # a shape
        text = "[" + ",".join("?" if d is None else str(d) for d in value) + "]"
    elif isinstance(value, list):
        text = "[" + ",".join(_value_text(v) for v in value) + "]"
    elif hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor (numpy array)
        if value.size <= 8:
            text = f"{value.dtype}{list(value.shape)}:{value.tolist()}"
        else:
            text = f"tensor<{value.dtype}[{','.join(map(str, value.shape))}]>"
    elif hasattr(value, "name") and hasattr(value, "as_numpy_dtype"):  # a tf.DType
        text = value.name
    else:
        text = str(value)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 3] + "..."
