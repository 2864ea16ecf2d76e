"""What a pass returns (:class:`PassResult`) and what a pipeline run returns (:class:`PipelineReport`).

Example::

    @register_pass("prune", options=PruneOptions)
    def prune(graph, opts):
        ...
        return PassResult(changed=True, stats={"removed_channels": 12},
                          warnings=["3 batch norms stay element-wise ops"])

    report = PassManager("prune{ratio=0.5},dce").run(graph)
    report.passes[0]["stats"]     # {'removed_channels': 12}
    report.warnings               # [('prune{ratio=0.5}', '3 batch norms stay element-wise ops')]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphslim.report import jsonable


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: whether it changed the graph, statistics for the report, and warnings.

    ``stats`` is free-form (JSON-ready after :meth:`PipelineReport.to_dict`); ``warnings`` are
    sentences for the user (the CLI prints each one prefixed by the pass's text), for what worked
    but may not be what the user wanted.

    Example::

        return PassResult(changed=True, stats={"removed_channels": 12, "layers": ["conv2d_1"]})
        return PassResult(changed=False, warnings=["no Conv2D found: nothing to factorize"])
    """

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PipelineReport:
    """What a pipeline run did: the pipeline text and one record per pass that completed.

    Each record in ``passes`` is a dict with ``name``, ``text`` (the pass's canonical text),
    ``seconds`` (the pass alone), ``verify_seconds`` (None when verification is off), ``changed``,
    ``stats`` and ``warnings`` (a list of strings). ``input_verify_seconds`` is the time spent
    verifying the input graph.

    Example::

        report = PassManager("prune{ratio=0.5},dce").run(graph)
        report.passes[0]["stats"]          # {'removed_channels': 12}
        for text, message in report.warnings:
            print(f"warning: {text}: {message}")
        json.dumps(report.to_dict())
    """

    pipeline: str
    passes: list[dict[str, Any]] = field(default_factory=list)
    input_verify_seconds: float | None = None

    @property
    def seconds(self) -> float:
        """Total time of passes and verification."""
        total = self.input_verify_seconds or 0.0
        for record in self.passes:
            total += record["seconds"] + (record["verify_seconds"] or 0.0)
        return total

    @property
    def changed(self) -> bool:
        """True when any pass reported a change."""
        return any(record["changed"] for record in self.passes)

    @property
    def warnings(self) -> list[tuple[str, str]]:
        """Every pass's warnings in pipeline order, as ``(pass text, message)`` pairs.

        Example::

            report.warnings   # [('prune{ratio=0.5}', '3 batch norms stay element-wise ops')]
        """
        return [
            (record["text"], message)
            for record in self.passes
            for message in record.get("warnings", ())
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (numpy scalars and arrays in stats become numbers and lists).

        Example::

            Path("report.json").write_text(json.dumps(report.to_dict(), indent=2))
        """
        return {
            "pipeline": self.pipeline,
            "seconds": self.seconds,
            "changed": self.changed,
            "input_verify_seconds": self.input_verify_seconds,
            "passes": [jsonable(record) for record in self.passes],
        }
