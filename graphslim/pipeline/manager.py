"""The pass manager: runs a pipeline over a graph, verifying, timing and rolling back each pass.

Example::

    manager = PassManager("subset{keep=1,2},prune{ratio=0.5},dce", instruments=[PrintIRAfter("prune")])
    report = manager.run(graph)          # graph rewritten in place
    report.to_dict()                     # JSON-ready: pipeline text, per pass timing, stats, warnings
"""

from __future__ import annotations

import contextvars
import time
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from graphslim.errors import PipelineError
from graphslim.pipeline.instruments import PassInstrument
from graphslim.pipeline.messages import describe_exception, ordinal, qualified
from graphslim.pipeline.registry import PassInfo
from graphslim.pipeline.results import PassResult, PipelineReport
from graphslim.pipeline.spec import PassSpec, Pipeline, instantiate_options, resolve
from graphslim.pipeline.text import parse_pipeline


_INPUT: contextvars.ContextVar = contextvars.ContextVar("graphslim_pipeline_input", default=None)


def pipeline_input() -> Any:
    """The graph as it entered the running :meth:`PassManager.run` (a copy sharing the weight arrays),
    or None outside a pipeline: the reference for passes that compare with the original model
    (``distill`` trains the current graph to mimic it)."""
    return _INPUT.get()


class PassManager:
    """Runs a pipeline over a graph: passes in order, ``graph.verify()`` after each, timed.

    ``pipeline`` is a :class:`Pipeline`, pipeline text, or an iterable of :class:`PassSpec`; it is
    validated against the registry here, before any graph is touched. With ``verify=True`` the
    input graph is verified first and the graph again after every pass. A failure raises
    :class:`PipelineError` naming the failing pass, its position and the passes that ran before
    it, chained to the original exception; the error carries ``report`` (the passes that
    completed) and ``pass_index`` (0-based) as attributes.

    With ``rollback=True`` a failed pass leaves the graph as it was before that pass: the manager
    takes ``graph.copy()`` before each pass (structure, attributes and the weight table; the
    weights' arrays are shared, so this is cheap) and ``graph.restore(copy)`` when the pass raises,
    returns something else than a :class:`PassResult`, or leaves a graph that fails verification
    (then the error is raised). Graphs without ``copy``/``restore`` (stand-ins in tests) are not
    rolled back. Passes must replace weight arrays (``graph.set_weight``), never write into them.

    Example::

        manager = PassManager("subset{keep=1,2},prune{ratio=0.5},dce", instruments=[Progress()])
        report = manager.run(graph)
        # PipelineError: pass 'prune{ratio=0.5}' (2nd of 3) failed after 'subset{keep=1,2}': ...
        # and graph is as 'subset{keep=1,2}' left it
    """

    def __init__(
        self,
        pipeline: Pipeline | str | Iterable[PassSpec],
        verify: bool = True,
        instruments: Iterable[PassInstrument] = (),
        rollback: bool = True,
    ) -> None:
        if isinstance(pipeline, str):
            pipeline = parse_pipeline(pipeline)
        elif not isinstance(pipeline, Pipeline):
            pipeline = Pipeline(tuple(pipeline))
        plan = []
        for index, spec in enumerate(pipeline, start=1):
            where = f" ({ordinal(index)} of {len(pipeline)})"
            info, spec = resolve(spec, where)
            plan.append((spec, info, instantiate_options(info, spec, where)))
        self.pipeline = Pipeline(spec for spec, _, _ in plan)
        self.verify = verify
        self.instruments = tuple(instruments)
        self.rollback = rollback
        self._plan = plan

    def run(self, graph: Any) -> PipelineReport:
        """Run every pass on ``graph`` (mutated in place) and return the report.

        Example::

            report = PassManager(parse_pipeline("dce")).run(graph)
            report.passes[0]["changed"]
        """
        token = _INPUT.set(graph.copy() if callable(getattr(graph, "copy", None)) else None)
        try:
            return self._run(graph)
        finally:
            _INPUT.reset(token)

    def _run(self, graph: Any) -> PipelineReport:
        report = PipelineReport(str(self.pipeline))
        if self.verify:
            start = time.perf_counter()
            try:
                graph.verify()
            except Exception as exc:
                error = PipelineError(
                    "the input graph failed verification before any pass ran (a loader bug or a "
                    f"corrupt model, not a pass): {describe_exception(exc)}"
                )
                error.report, error.pass_index = report, None  # type: ignore[attr-defined]
                raise error from exc
            report.input_verify_seconds = time.perf_counter() - start
        for instrument in self.instruments:
            instrument.run_before_pipeline(self.pipeline, graph)
        for index, (spec, info, options) in enumerate(self._plan):
            report.passes.append(self._run_pass(index, spec, info, options, graph, report))
        for instrument in self.instruments:
            instrument.run_after_pipeline(self.pipeline, graph, report)
        return report

    def _run_pass(
        self,
        index: int,
        spec: PassSpec,
        info: PassInfo,
        options: Any,
        graph: Any,
        report: PipelineReport,
    ) -> dict[str, Any]:
        for instrument in self.instruments:
            instrument.run_before_pass(spec, graph)
        saved = self._snapshot(graph)
        start = time.perf_counter()
        try:
            result = info.fn(graph, options)
        except Exception as exc:
            self._fail(index, spec, graph, saved, report, "failed", exc)
        except BaseException:  # KeyboardInterrupt, SystemExit: undo, then let it through
            self._restore(graph, saved)
            raise
        seconds = time.perf_counter() - start
        problem = _result_problem(result)
        if problem:
            wrong = PipelineError(
                f"returned {problem} instead of a PassResult (the pass function "
                f"{qualified(info.fn)} must end with "
                "'return PassResult(changed=..., stats={...})')"
            )
            self._fail(index, spec, graph, saved, report, "failed", wrong, chain=False)
        verify_seconds = None
        if self.verify:
            start = time.perf_counter()
            try:
                graph.verify()
            except Exception as exc:
                self._fail(index, spec, graph, saved, report, "failed verification", exc)
            verify_seconds = time.perf_counter() - start
        for instrument in self.instruments:
            instrument.run_after_pass(spec, graph, result, seconds)
        return {
            "name": spec.name,
            "text": str(spec),
            "seconds": seconds,
            "verify_seconds": verify_seconds,
            "changed": bool(result.changed),
            "stats": dict(result.stats),
            "warnings": list(result.warnings),
        }

    def _snapshot(self, graph: Any) -> Any:
        if self.rollback and all(callable(getattr(graph, m, None)) for m in ("copy", "restore")):
            return graph.copy()
        return None

    @staticmethod
    def _restore(graph: Any, saved: Any) -> None:
        if saved is not None:
            graph.restore(saved)

    def _fail(
        self,
        index: int,
        spec: PassSpec,
        graph: Any,
        saved: Any,
        report: PipelineReport,
        what: str,
        exc: BaseException,
        chain: bool = True,
    ) -> typing.NoReturn:
        try:
            for instrument in self.instruments:
                instrument.run_on_error(spec, graph, exc)
        finally:
            self._restore(graph, saved)
        message = f"pass '{spec}' ({ordinal(index + 1)} of {len(self._plan)}) {what}"
        if index:
            message += " after " + ", ".join(f"'{s}'" for s, _, _ in self._plan[:index])
        message += f": {describe_exception(exc)}"
        error = PipelineError(message)
        error.report, error.pass_index = report, index  # type: ignore[attr-defined]
        if chain:
            raise error from exc
        raise error


def _result_problem(result: Any) -> str:
    """What is wrong with what a pass returned ('' when it is a well-formed PassResult)."""
    if not isinstance(result, PassResult):
        return type(result).__name__
    if not isinstance(result.stats, Mapping):
        return f"a PassResult whose stats is a {type(result.stats).__name__}, not a dict,"
    warnings = result.warnings
    if isinstance(warnings, str) or not isinstance(warnings, (list, tuple)):
        return f"a PassResult whose warnings is a {type(warnings).__name__}, not a list of strings,"
    bad = [w for w in warnings if not isinstance(w, str)]
    if bad:
        return f"a PassResult whose warnings hold a {type(bad[0]).__name__}, not only strings,"
    return ""
