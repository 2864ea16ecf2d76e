"""Pass registry, pipeline text and TOML config, and the pass manager.

A *pass* is a plain function ``fn(graph, options) -> PassResult`` that rewrites ``graph`` in place.
It is registered by name with a frozen dataclass describing its options (type, default and help per
field). A *pipeline* is an ordered list of passes with their options, written as text in MLIR style
or as a TOML file; both print back to the same text. The :class:`PassManager` runs a pipeline over a
graph, verifies the graph after every pass, rolls back a pass that fails, times each pass and
reports what it did (stats and warnings).

Example::

    from dataclasses import dataclass, field
    from graphslim.pipeline import PassManager, PassResult, parse_pipeline, register_pass

    @dataclass(frozen=True)
    class PruneOptions:
        ratio: float = field(default=0.5, metadata={"help": "fraction of channels removed"})

    @register_pass("prune", options=PruneOptions)
    def prune(graph, opts: PruneOptions) -> PassResult:
        \"\"\"Remove the least important channels.\"\"\"
        return PassResult(changed=True, stats={"removed_channels": 12})

    pipeline = parse_pipeline("prune{ratio=0.25},dce")
    report = PassManager(pipeline).run(graph)
    report.to_dict()   # JSON-ready: pipeline text, per pass timing, changed flag, stats, warnings

Pipeline text grammar: passes are separated by commas; a pass may carry options in braces,
space-separated ``key=value`` pairs with no spaces around ``=``; a list value is comma-separated
(``keep=3,7,12``) and an empty list is written as nothing (``keep=``); a value is double-quoted when
it holds spaces, commas, braces, ``=`` or quotes (``labels="my labels.txt"``), with the escapes
``\\\\``, ``\\"``, ``\\n``, ``\\t`` and ``\\r``; ``none`` (unquoted) is the null of an optional
option.

The package, one concern a module (each imports only those listed before it):

========================  ======================================================================
``messages``              wording shared by error messages (exceptions, ordinals, function names)
``options``               option types from a dataclass; values from text/TOML/Python; printing
``results``               ``PassResult`` (changed, stats, warnings), ``PipelineReport``
``registry``              ``Registry`` (snapshot/restore), the default ``REGISTRY``, ``register_pass``
``spec``                  ``PassSpec``, ``Pipeline`` (canonical text, ``to_toml``), validation
``text``                  the pipeline text parser, ``parse_pipeline``
``config``                TOML pipeline configs
``instruments``           ``PassInstrument`` hooks, ``PrintIRAfter``/``PrintIRBefore``
``manager``               ``PassManager``: verify, time, roll back, report
``plugins``               built-in pass package, plugin files and modules, entry points
========================  ======================================================================
"""

from __future__ import annotations

from graphslim.pipeline.config import load_pipeline_config, parse_pipeline_config
from graphslim.pipeline.instruments import PassInstrument, PrintIRAfter, PrintIRBefore
from graphslim.pipeline.manager import PassManager, pipeline_input
from graphslim.pipeline.options import OptionInfo
from graphslim.pipeline.plugins import (
    ENTRY_POINT_GROUP,
    load_builtin_passes,
    load_entry_point_plugins,
    load_plugin,
)
from graphslim.pipeline.registry import (
    BUILTIN_PASS_PACKAGE,
    REGISTRY,
    PassInfo,
    Registry,
    RegistrySnapshot,
    get_pass,
    register_pass,
    registered_passes,
    unregister_pass,
)
from graphslim.pipeline.results import PassResult, PipelineReport
from graphslim.pipeline.spec import PassSpec, Pipeline
from graphslim.pipeline.text import parse_pipeline

__all__ = [
    "BUILTIN_PASS_PACKAGE",
    "ENTRY_POINT_GROUP",
    "REGISTRY",
    "OptionInfo",
    "PassInfo",
    "PassInstrument",
    "PassManager",
    "PassResult",
    "PassSpec",
    "Pipeline",
    "PipelineReport",
    "PrintIRAfter",
    "PrintIRBefore",
    "Registry",
    "RegistrySnapshot",
    "get_pass",
    "load_builtin_passes",
    "load_entry_point_plugins",
    "load_pipeline_config",
    "load_plugin",
    "parse_pipeline",
    "parse_pipeline_config",
    "pipeline_input",
    "register_pass",
    "registered_passes",
    "unregister_pass",
]
