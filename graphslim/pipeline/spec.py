"""Pass specs and pipelines: what to run, validated against the registry, printed canonically.

A :class:`PassSpec` is one pass and the options the user gave; a :class:`Pipeline` is an ordered,
immutable sequence of them. ``str()`` gives the canonical MLIR-style text that the parser
(:mod:`graphslim.pipeline.text`) reads back to an equal pipeline, and :meth:`Pipeline.to_toml` the
same pipeline as a TOML config (:mod:`graphslim.pipeline.config`).

Example::

    spec = PassSpec.of("subset", keep=[3, 7])     # validated: keep becomes (3, 7)
    str(Pipeline([spec, PassSpec.of("dce")]))     # 'subset{keep=3,7},dce'
"""

from __future__ import annotations

import difflib
import json
import numbers
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphslim.errors import OptionError, PipelineError
from graphslim.pipeline.messages import describe_exception
from graphslim.pipeline.options import format_value, value_from_native
from graphslim.pipeline.registry import REGISTRY, PassInfo


@dataclass(frozen=True)
class PassSpec:
    """One pass of a pipeline: its name and the options the user gave, in the order given.

    ``str(spec)`` is the canonical text, e.g. ``prune{ratio=0.5 criterion=l1}``. Options not given
    take the defaults of the pass's options dataclass. Build validated specs with
    :meth:`PassSpec.of`, or by parsing.

    Example::

        spec = PassSpec.of("subset", keep=[3, 7])   # validated: keep becomes (3, 7)
        str(spec)                                   # 'subset{keep=3,7}'
        spec.build_options()                        # SubsetOptions(keep=(3, 7), background=False)
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options))

    def __hash__(self) -> int:
        return hash((self.name, frozenset(self.options.items())))

    @classmethod
    def of(cls, name: str, **options: Any) -> PassSpec:
        """A spec for the registered pass ``name`` with ``options`` checked and normalised.

        Example::

            PassSpec.of("prune", ratio=1)   # PassSpec(name='prune', options={'ratio': 1.0})
        """
        return resolve(cls(name, options), "")[1]

    @property
    def info(self) -> PassInfo:
        """The registered pass this spec names.

        Example::

            PassSpec.of("dce").info.help
        """
        return REGISTRY.get(self.name)

    def build_options(self) -> Any:
        """The pass's options dataclass filled with these options and defaults (None if no options).

        Example::

            parse_pipeline("prune{ratio=0.3}")[0].build_options().criterion   # 'l1' (default)
        """
        info, spec = resolve(self, "")
        return instantiate_options(info, spec, "")

    def __str__(self) -> str:
        if not self.options:
            return self.name
        body = " ".join(f"{key}={format_value(value)}" for key, value in self.options.items())
        return f"{self.name}{{{body}}}"


@dataclass(frozen=True, repr=False)
class Pipeline(Sequence[PassSpec]):
    """An ordered, immutable sequence of :class:`PassSpec`; ``str()`` gives the canonical text.

    Example::

        p = parse_pipeline("subset{keep=3,7},prune{ratio=0.5},dce")
        len(p), p[1].name, str(p)      # (3, 'prune', 'subset{keep=3,7},prune{ratio=0.5},dce')
        Pipeline([PassSpec.of("dce")]) # built in Python
    """

    passes: tuple[PassSpec, ...] = ()

    def __post_init__(self) -> None:
        passes = tuple(self.passes)
        for spec in passes:
            if not isinstance(spec, PassSpec):
                raise PipelineError(f"a Pipeline holds PassSpec objects, got {spec!r}")
        object.__setattr__(self, "passes", passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self) -> Iterator[PassSpec]:
        return iter(self.passes)

    @typing.overload
    def __getitem__(self, index: int) -> PassSpec: ...
    @typing.overload
    def __getitem__(self, index: slice) -> Pipeline: ...
    def __getitem__(self, index: int | slice) -> PassSpec | Pipeline:
        if isinstance(index, slice):
            return Pipeline(self.passes[index])
        return self.passes[index]

    def __str__(self) -> str:
        return ",".join(str(spec) for spec in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def to_toml(self) -> str:
        """The pipeline as a TOML config (``[[pass]]`` tables); ``load_pipeline_config`` reads it.

        TOML has no null, so an option set to none is written as the string "none"; in the rare
        case of a string option whose value *is* "none", the whole pipeline is written as one
        ``pipeline = "..."`` string instead, so that reading it back gives the same pipeline.

        Example::

            print(parse_pipeline("subset{keep=3,7},dce").to_toml())
            # # graphslim pipeline: subset{keep=3,7},dce
            # [[pass]]
            # name = "subset"
            # keep = [3, 7]
            #
            # [[pass]]
            # name = "dce"
        """
        text = "".join(c if c.isprintable() else "?" for c in str(self))
        ambiguous = any(
            isinstance(value, str) and value.lower() == "none"
            for spec in self.passes
            for value in spec.options.values()
        )
        if not self.passes or ambiguous:
            return f"# graphslim pipeline\npipeline = {_toml_value(str(self))}\n"
        blocks = [f"# graphslim pipeline: {text}"]
        for i, spec in enumerate(self.passes):
            lines = ["[[pass]]", f"name = {_toml_value(spec.name)}"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in spec.options.items()]
            blocks.append(("\n" if i else "") + "\n".join(lines))
        return "\n".join(blocks) + "\n"


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


# --------------------------------------------------------------------------------------------------
# Validation against the registry (shared by the text parser, the TOML reader and the manager)
# --------------------------------------------------------------------------------------------------


def unknown_option(info: PassInfo, key: str, where: str) -> OptionError:
    """The error for an option ``key`` that pass ``info`` does not have (it lists the valid ones)."""
    if not info.options:
        return OptionError(
            f"pass '{info.name}'{where} takes no options, but was given '{key}'; write it as "
            f"just '{info.name}'"
        )
    names = [o.name for o in info.options]
    message = f"pass '{info.name}'{where} has no option '{key}'"
    close = difflib.get_close_matches(key, names, n=1)
    message += f"; did you mean '{close[0]}'?" if close else "."
    return OptionError(f"{message} Valid options: {info.describe_options()}.")


def make_spec(info: PassInfo, values: dict[str, Any], where: str) -> PassSpec:
    """A spec from checked option values: required options present, and the options dataclass
    accepts them (its ``__post_init__`` validation becomes an :class:`OptionError`)."""
    missing = [o for o in info.options if o.required and o.name not in values]
    if missing:
        first = missing[0]
        raise OptionError(
            f"pass '{info.name}'{where} requires option '{first.name}' ({first.type_name}"
            f"{': ' + first.help if first.help else ''}); add it, e.g. "
            f"{info.name}{{{first.name}=...}}."
            f" Valid options: {info.describe_options()}."
        )
    spec = PassSpec(info.name, values)
    instantiate_options(info, spec, where)
    return spec


def instantiate_options(info: PassInfo, spec: PassSpec, where: str) -> Any:
    """The options dataclass of ``info`` filled from ``spec`` (None for a pass without options)."""
    if info.options_cls is None:
        return None
    try:
        return info.options_cls(**spec.options)
    except Exception as exc:
        raise OptionError(
            f"invalid options for pass '{info.name}'{where} in '{spec}': {describe_exception(exc)}"
        ) from exc


def resolve(spec: PassSpec, where: str) -> tuple[PassInfo, PassSpec]:
    """Validate a (possibly hand-built) spec against the registry; return it normalised.

    Example::

        info, spec = resolve(PassSpec("prune", {"ratio": 1}), "")   # spec.options == {'ratio': 1.0}
    """
    info = REGISTRY.get(spec.name, where)
    values: dict[str, Any] = {}
    for key, value in spec.options.items():
        opt = info.option(key)
        if opt is None:
            raise unknown_option(info, key, where)
        values[key] = value_from_native(info.name, opt, value, where)
    return info, make_spec(info, values, where)
