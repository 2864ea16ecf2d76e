"""Pass registry, pipeline text and TOML config, and the pass manager.

A *pass* is a plain function ``fn(graph, options) -> PassResult`` that rewrites ``graph`` in place.
It is registered by name with a frozen dataclass describing its options (type, default and help per
field). A *pipeline* is an ordered list of passes with their options, written as text in MLIR style
or as a TOML file; both print back to the same text. The :class:`PassManager` runs a pipeline over a
graph, verifies the graph after every pass, times each pass and reports what it did.

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
    report.to_dict()   # JSON-ready: pipeline text, per pass timing, changed flag and stats

Pipeline text grammar: passes are separated by commas; a pass may carry options in braces,
space-separated ``key=value`` pairs with no spaces around ``=``; a list value is comma-separated
(``keep=3,7,12``) and an empty list is written as nothing (``keep=``); a value is double-quoted when
it holds spaces, commas, braces, ``=`` or quotes (``labels="my labels.txt"``), with the escapes
``\\\\``, ``\\"``, ``\\n``, ``\\t`` and ``\\r``; ``none`` (unquoted) is the null of an optional
option.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import numbers
import os
import pkgutil
import re
import sys
import time
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphslim.errors import GraphslimError, OptionError, PipelineError

__all__ = [
    "BUILTIN_PASS_PACKAGE",
    "ENTRY_POINT_GROUP",
    "OptionInfo",
    "PassInfo",
    "PassInstrument",
    "PassManager",
    "PassResult",
    "PassSpec",
    "Pipeline",
    "PipelineReport",
    "get_pass",
    "load_builtin_passes",
    "load_entry_point_plugins",
    "load_pipeline_config",
    "load_plugin",
    "parse_pipeline",
    "parse_pipeline_config",
    "register_pass",
    "registered_passes",
    "unregister_pass",
]

BUILTIN_PASS_PACKAGE = "graphslim.passes"
"""The package whose modules hold the built-in passes (the top-level ``passes/`` folder)."""

ENTRY_POINT_GROUP = "graphslim.passes"
"""The entry-point group through which installed distributions contribute passes."""


# --------------------------------------------------------------------------------------------------
# Results and registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: whether it changed the graph, and free-form statistics for the report.

    Example::

        return PassResult(changed=True, stats={"removed_channels": 12, "layers": ["conv2d_1"]})
    """

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptionInfo:
    """One option of a pass, derived from a field of its options dataclass.

    ``base`` is ``int``, ``float``, ``bool`` or ``str``; ``is_list`` marks ``tuple[base, ...]``;
    ``optional`` marks ``... | None``; ``choices`` restricts the value (or every item of a list);
    ``required`` marks a field without default (``default`` is then None).

    Example::

        info = get_pass("prune").option("criterion")
        info.type_name    # 'l1|l2|bn'
        info.describe()   # "criterion (l1|l2|bn, default l1): importance criterion"
    """

    name: str
    base: type
    is_list: bool = False
    optional: bool = False
    choices: tuple[Any, ...] | None = None
    default: Any = None
    required: bool = False
    help: str = ""

    @property
    def type_name(self) -> str:
        """A short human name of the option's type, e.g. ``list of int`` or ``string or none``."""
        if self.choices is not None:
            name = "|".join(_format_value(c) for c in self.choices)
        else:
            name = _BASE_NAMES[self.base]
        if self.is_list:
            name = f"list of {name}"
        if self.optional:
            name = f"{name} or none"
        return name

    def describe(self) -> str:
        """One line for help and error messages: name, type, default and help text.

        Example::

            "ratio (float, default 0.5): fraction of channels removed per group"
        """
        if self.required:
            default = "required"
        elif self.default == () and self.is_list:
            default = "default empty"
        else:
            default = f"default {_format_value(self.default)}"
        text = f"{self.name} ({self.type_name}, {default})"
        return f"{text}: {self.help}" if self.help else text


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: its name, function, options dataclass (or None) and one-line help.

    ``options`` describes every option (derived from ``options_cls`` at registration).

    Example::

        info = get_pass("prune")
        info.help                      # 'Remove the least important channels.'
        [o.name for o in info.options] # ['ratio', 'criterion', ...]
    """

    name: str
    fn: Callable[..., PassResult]
    options_cls: type | None
    help: str
    options: tuple[OptionInfo, ...] = ()

    def option(self, name: str) -> OptionInfo | None:
        """The option called ``name``, or None.

        Example::

            get_pass("prune").option("ratio").default   # 0.5
        """
        for opt in self.options:
            if opt.name == name:
                return opt
        return None

    def describe_options(self) -> str:
        """All options as one sentence, for error messages ("takes no options" if it has none).

        Example::

            get_pass("prune").describe_options()
            # "ratio (float, default 0.5): fraction of channels ...; criterion (l1|l2|bn, ...)"
        """
        if not self.options:
            return f"pass '{self.name}' takes no options"
        return "; ".join(opt.describe() for opt in self.options)


_REGISTRY: dict[str, PassInfo] = {}
_PASS_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_BASE_NAMES = {int: "int", float: "float", bool: "bool", str: "string"}


def register_pass(
    name: str,
    options: type | None = None,
    help: str | None = None,
    *,
    replace: bool = False,
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Decorator registering ``fn(graph, options) -> PassResult`` as the pass ``name``.

    ``options`` is a dataclass whose fields are the pass's options (supported field types: int,
    float, bool, str, ``X | None``, ``tuple[X, ...]``, ``Literal[...]``; per-field metadata
    ``help`` and ``choices``). A pass without options is called with ``options=None``. ``help``
    defaults to the first line of the function's docstring. Registering a name twice is an error
    unless ``replace=True`` (re-executing the same module, e.g. ``importlib.reload``, replaces
    silently). Errors in the declaration (unsupported option type, bad default, wrong function
    signature) raise :class:`PipelineError` at registration, not at first use.

    Example::

        @register_pass("prune", options=PruneOptions)
        def prune(graph, opts: PruneOptions) -> PassResult:
            \"\"\"Remove the least important channels of each channel group.\"\"\"
            ...
            return PassResult(changed=True, stats={"removed_channels": 12})
    """
    if not isinstance(name, str) or not _PASS_NAME_RE.fullmatch(name):
        raise PipelineError(
            f"invalid pass name {name!r}: a pass name starts with a letter or '_' and continues "
            "with letters, digits, '_', '-' or '.'"
        )

    def decorator(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        if not callable(fn):
            raise PipelineError(f"pass '{name}' must be registered on a function, got {fn!r}")
        _check_pass_signature(name, fn)
        option_infos = _analyse_options(name, options) if options is not None else ()
        text = help if help is not None else _first_doc_line(fn)
        existing = _REGISTRY.get(name)
        if existing is not None and not replace and not _same_definition(existing.fn, fn):
            raise PipelineError(
                f"pass '{name}' is already registered (by {_qualified(existing.fn)}), so "
                f"{_qualified(fn)} cannot take the name; pick another name, or register with "
                "replace=True to override it deliberately"
            )
        _REGISTRY[name] = PassInfo(name, fn, options, text, option_infos)
        return fn

    return decorator


def unregister_pass(name: str) -> PassInfo:
    """Remove the pass ``name`` from the registry and return it (for tests and plugin reloads).

    Example::

        info = unregister_pass("test-noop")
    """
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise PipelineError(_unknown_pass_message(name, "")) from None


def get_pass(name: str) -> PassInfo:
    """The registered pass ``name`` (built-in passes are loaded on first use).

    An unknown name raises :class:`PipelineError` that lists every registered pass and suggests
    the closest one.

    Example::

        get_pass("prune").help        # 'Remove the least important channels of each group.'
        get_pass("prun")    # PipelineError: unknown pass 'prun'; did you mean 'prune'? ...
    """
    return _lookup(name, "")


def registered_passes() -> dict[str, PassInfo]:
    """Every registered pass (built-ins loaded on first use), sorted by name.

    Example::

        for name, info in registered_passes().items():
            print(f"{name:12} {info.help}")
    """
    load_builtin_passes()
    return {name: _REGISTRY[name] for name in sorted(_REGISTRY)}


def _lookup(name: str, where: str) -> PassInfo:
    load_builtin_passes()
    info = _REGISTRY.get(name)
    if info is None:
        raise PipelineError(_unknown_pass_message(name, where))
    return info


def _unknown_pass_message(name: str, where: str) -> str:
    names = sorted(_REGISTRY)
    message = f"unknown pass '{name}'{where}"
    close = difflib.get_close_matches(name, names, n=1)
    message += f"; did you mean '{close[0]}'?" if close else "."
    if names:
        message += f" Registered passes: {', '.join(names)}."
    else:
        message += " No passes are registered."
    if _MISSING_PACKAGES:
        missing = ", ".join(f"'{p}'" for p in sorted(_MISSING_PACKAGES))
        message += (
            f" The built-in pass package {missing} is not importable; install graphslim "
            "(pip install -e .) to get the built-in passes."
        )
    else:
        message += " Passes of your own must be loaded as plugins first."
    return message


def _check_pass_signature(name: str, fn: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise PipelineError(
            f"pass '{name}' ({_qualified(fn)}) must accept two arguments (graph, options), but its "
            f"signature is {signature}; a pass without options still takes 'options' (it gets None)"
        ) from None


def _first_doc_line(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    for line in doc.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _qualified(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """True when ``b`` is ``a`` or the same function re-created by re-executing its module."""
    if a is b:
        return True
    a_module, b_module = getattr(a, "__module__", None), getattr(b, "__module__", None)
    a_name, b_name = getattr(a, "__qualname__", None), getattr(b, "__qualname__", None)
    return a_module is not None and a_name is not None and (a_module, a_name) == (b_module, b_name)


# --------------------------------------------------------------------------------------------------
# Option types
# --------------------------------------------------------------------------------------------------


def _analyse_options(pass_name: str, cls: type) -> tuple[OptionInfo, ...]:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise PipelineError(
            f"the options of pass '{pass_name}' must be a dataclass type, got {cls!r}; declare "
            "them as @dataclass(frozen=True) with one field per option"
        )
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        raise PipelineError(
            f"cannot resolve the option types of pass '{pass_name}' ({cls.__qualname__}): "
            f"{_describe_exception(exc)}; make sure every annotation names an importable type"
        ) from exc
    infos = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name == "name":
            raise PipelineError(
                f"pass '{pass_name}' declares an option called 'name', which is reserved (a TOML "
                "pipeline config uses 'name' for the pass name); rename the field"
            )
        analysed = _analyse_type(hints[f.name])
        if analysed is None:
            raise PipelineError(
                f"option '{f.name}' of pass '{pass_name}' has unsupported type {hints[f.name]!r}; "
                "use int, float, bool, str, Literal[...], tuple[X, ...] of those, or any of them "
                "'| None'"
            )
        base, is_list, optional, choices = analysed
        if "choices" in f.metadata:
            choices = _check_choices_declaration(pass_name, f.name, base, f.metadata["choices"])
        required = False
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default, required = None, True
        info = OptionInfo(
            name=f.name,
            base=base,
            is_list=is_list,
            optional=optional,
            choices=choices,
            default=default,
            required=required,
            help=str(f.metadata.get("help", "")),
        )
        if not required:
            try:
                coerced = _value_from_native(pass_name, info, default, "")
            except OptionError as exc:
                raise PipelineError(
                    f"the default of option '{f.name}' of pass '{pass_name}' does not fit its "
                    f"declared type: {exc}"
                ) from None
            info = dataclasses.replace(info, default=coerced)
        infos.append(info)
    return tuple(infos)


def _analyse_type(hint: Any) -> tuple[type, bool, bool, tuple[Any, ...] | None] | None:
    optional = is_list = False
    choices: tuple[Any, ...] | None = None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            return None
        optional, hint = True, rest[0]
        origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            return None
        is_list, hint = True, args[0]
        origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1:
            return None
        hint = kinds.pop()
    if hint not in _BASE_NAMES:
        return None
    return hint, is_list, optional, choices


def _check_choices_declaration(
    pass_name: str, option: str, base: type, choices: Any
) -> tuple[Any, ...]:
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Iterable):
        raise PipelineError(
            f"the 'choices' of option '{option}' of pass '{pass_name}' must be a tuple of values, "
            f"got {choices!r}"
        )
    result = tuple(choices)
    probe = OptionInfo(option, base)
    for choice in result:
        try:
            _scalar_from_native(pass_name, probe, choice, "")
        except OptionError:
            raise PipelineError(
                f"choice {choice!r} of option '{option}' of pass '{pass_name}' is not "
                f"{_expected(probe)}"
            ) from None
    if not result:
        raise PipelineError(f"option '{option}' of pass '{pass_name}' declares no choices")
    return result


def _expected(opt: OptionInfo) -> str:
    if opt.choices is not None:
        values = ", ".join(_format_value(c) for c in opt.choices)
        text = f"a list of values from {values}" if opt.is_list else f"one of {values}"
    elif opt.is_list:
        text = f"a list of {_BASE_NAMES[opt.base]}s"
    else:
        text = {
            int: "an int",
            float: "a float",
            bool: "a bool (true/false, yes/no, 1/0)",
            str: "a string",
        }[opt.base]
    return f"{text} or none" if opt.optional else text


def _bad_value(
    pass_name: str, opt: OptionInfo, got: str, where: str, hint: str = ""
) -> OptionError:
    message = f"option '{opt.name}' of pass '{pass_name}'{where} expects {_expected(opt)}"
    message += f", got {got}"
    if hint:
        message += f"; {hint}"
    if opt.help:
        message += f" ({opt.name}: {opt.help})"
    return OptionError(message)


def _check_choice(pass_name: str, opt: OptionInfo, value: Any, where: str) -> Any:
    if opt.choices is not None and value not in opt.choices:
        shown = [_format_value(c) for c in opt.choices]
        close = difflib.get_close_matches(_format_value(value), shown, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}?" if close else ""
        raise _bad_value(pass_name, opt, repr(value), where, hint)
    return value


_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


def _scalar_from_text(pass_name: str, opt: OptionInfo, text: str, where: str) -> Any:
    value: Any
    try:
        if opt.base is bool:
            lowered = text.lower()
            if lowered in _TRUE:
                value = True
            elif lowered in _FALSE:
                value = False
            else:
                raise ValueError(text)
        elif opt.base is int:
            value = int(text)
        elif opt.base is float:
            value = float(text)
        else:
            value = text
    except ValueError:
        raise _bad_value(pass_name, opt, repr(text), where) from None
    return _check_choice(pass_name, opt, value, where)


def _value_from_text(pass_name: str, opt: OptionInfo, items: list[_Item], where: str) -> Any:
    """Convert the raw items of ``key=a,b,c`` to the option's type."""
    if opt.optional and len(items) == 1 and not items[0].quoted and items[0].text.lower() == "none":
        return None
    if opt.is_list:
        return tuple(_scalar_from_text(pass_name, opt, item.text, where) for item in items)
    if not items:
        raise _bad_value(pass_name, opt, "nothing", where, f"write {opt.name}=VALUE")
    if len(items) > 1:
        hint = f"quote it to include commas: {opt.name}=\"...\"" if opt.base is str else ""
        got = "a list " + ",".join(_format_value(i.text) for i in items)
        raise _bad_value(pass_name, opt, got, where, hint)
    return _scalar_from_text(pass_name, opt, items[0].text, where)


def _scalar_from_native(pass_name: str, opt: OptionInfo, value: Any, where: str) -> Any:
    ok = False
    if opt.base is bool:
        ok = isinstance(value, bool)
    elif opt.base is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        value = int(value) if ok else value
    elif opt.base is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise _bad_value(pass_name, opt, f"{value!r} ({type(value).__name__})", where)
    return _check_choice(pass_name, opt, value, where)


def _value_from_native(
    pass_name: str, opt: OptionInfo, value: Any, where: str, none_string: bool = False
) -> Any:
    """Check and normalise a Python or TOML value (lists become tuples, ints become floats...).

    With ``none_string`` (TOML, which has no null), the string "none" is the null of an optional.
    """
    if value is None or (
        none_string and opt.optional and isinstance(value, str) and value.lower() == "none"
    ):
        if opt.optional:
            return None
        raise _bad_value(pass_name, opt, "none", where, "this option cannot be none")
    if opt.is_list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_scalar_from_native(pass_name, opt, item, where) for item in items)
    if isinstance(value, (list, tuple)):
        raise _bad_value(pass_name, opt, f"a list {value!r}", where)
    return _scalar_from_native(pass_name, opt, value, where)


def _unknown_option(info: PassInfo, key: str, where: str) -> OptionError:
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


def _make_spec(info: PassInfo, values: dict[str, Any], where: str) -> PassSpec:
    """Check required options and let the options dataclass validate itself (``__post_init__``)."""
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
    _instantiate_options(info, spec, where)
    return spec


def _instantiate_options(info: PassInfo, spec: PassSpec, where: str) -> Any:
    if info.options_cls is None:
        return None
    try:
        return info.options_cls(**spec.options)
    except Exception as exc:
        raise OptionError(
            f"invalid options for pass '{info.name}'{where} in '{spec}': {_describe_exception(exc)}"
        ) from exc


def _resolve(spec: PassSpec, where: str) -> tuple[PassInfo, PassSpec]:
    """Validate a (possibly hand-built) spec against the registry; return it normalised."""
    info = _lookup(spec.name, where)
    values: dict[str, Any] = {}
    for key, value in spec.options.items():
        opt = info.option(key)
        if opt is None:
            raise _unknown_option(info, key, where)
        values[key] = _value_from_native(info.name, opt, value, where)
    return info, _make_spec(info, values, where)


# --------------------------------------------------------------------------------------------------
# Pass specs, pipelines and canonical printing
# --------------------------------------------------------------------------------------------------

_BARE_RE = re.compile(r'[^\s,{}"=]+')  # an unquoted value (a backslash in it is literal)
_PRINT_BARE_RE = re.compile(r'[^\s,{}"=\\]+')  # printed unquoted (backslashes get quoted)


def _format_value(value: Any) -> str:
    """Canonical text of an option value (the inverse of the pipeline parser)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, (tuple, list)):
        return ",".join(_format_value(v) for v in value)
    text = str(value)
    if _PRINT_BARE_RE.fullmatch(text) and text.lower() != "none":
        return text
    escaped = (
        text.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
    )
    return f'"{escaped}"'


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
        return _resolve(cls(name, options), "")[1]

    @property
    def info(self) -> PassInfo:
        """The registered pass this spec names.

        Example::

            PassSpec.of("dce").info.help
        """
        return get_pass(self.name)

    def build_options(self) -> Any:
        """The pass's options dataclass filled with these options and defaults (None if no options).

        Example::

            parse_pipeline("prune{ratio=0.3}")[0].build_options().criterion   # 'l1' (default)
        """
        info, spec = _resolve(self, "")
        return _instantiate_options(info, spec, "")

    def __str__(self) -> str:
        if not self.options:
            return self.name
        body = " ".join(f"{key}={_format_value(value)}" for key, value in self.options.items())
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
# Pipeline text parser
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    text: str
    quoted: bool
    pos: int


@dataclass
class _RawOption:
    key: str
    pos: int
    items: list[_Item]


@dataclass
class _RawPass:
    name: str
    pos: int
    options: list[_RawOption]


_NAME_CHARS_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_KEY_CHARS_RE = re.compile(r'[^\s,{}"=]+')
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t", "r": "\r"}


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"column {column}" if line == 1 and "\n" not in text else f"line {line}, column {column}"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    # -- helpers ---------------------------------------------------------------------------------
    def error(self, message: str, pos: int, hint: str = "") -> PipelineError:
        excerpt = self.text
        if len(excerpt) > 60:
            start = max(0, pos - 30)
            excerpt = ("..." if start else "") + self.text[start : start + 60]
            excerpt += "..." if start + 60 < len(self.text) else ""
        full = f"{message} at {_position(self.text, pos)} of pipeline '{excerpt}'"
        if hint:
            full += f"; {hint}"
        return PipelineError(full)

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def match(self, pattern: re.Pattern[str]) -> str:
        m = pattern.match(self.text, self.i)
        if not m:
            return ""
        self.i = m.end()
        return m.group()

    # -- grammar ---------------------------------------------------------------------------------
    def parse(self) -> list[_RawPass]:
        passes: list[_RawPass] = []
        self.skip_ws()
        if self.i == len(self.text):
            return passes
        comma = -1
        while True:
            self.skip_ws()
            pos = self.i
            name = self.match(_NAME_CHARS_RE)
            if not name:
                c = self.peek()
                if not c:
                    raise self.error(
                        "expected a pass name after ','", comma, "remove the trailing ','"
                    )
                if c == ",":
                    raise self.error("expected a pass name before ','", pos, "remove the extra ','")
                if c == "{":
                    raise self.error("expected a pass name before '{'", pos)
                if c == "}":
                    raise self.error("unbalanced '}'", pos)
                raise self.error(
                    f"unexpected {c!r}",
                    pos,
                    "pass names use letters, digits, '_', '-' and '.'",
                )
            self.skip_ws()
            options: list[_RawOption] = []
            if self.peek() == "{":
                self.i += 1
                options = self.parse_options(self.i - 1)
            passes.append(_RawPass(name, pos, options))
            self.skip_ws()
            c = self.peek()
            if not c:
                return passes
            if c == ",":
                comma = self.i
                self.i += 1
                continue
            if c == "}":
                raise self.error("unbalanced '}'", self.i)
            if c == "{":
                raise self.error(
                    f"second option block for pass '{name}'",
                    self.i,
                    "put all options in one {...}, separated by spaces",
                )
            raise self.error(
                f"expected ',' or the end after pass '{name}', got {c!r}",
                self.i,
                "separate passes with ','",
            )

    def parse_options(self, open_pos: int) -> list[_RawOption]:
        options: list[_RawOption] = []
        while True:
            self.skip_ws()
            c = self.peek()
            if not c:
                raise self.error("unbalanced '{'", open_pos, "add the missing '}'")
            if c == "}":
                self.i += 1
                return options
            pos = self.i
            key = self.match(_KEY_CHARS_RE)
            if not key:
                if c == "{":
                    raise self.error("unexpected '{'", pos, "braces do not nest")
                if c == ",":
                    raise self.error(
                        "unexpected ','",
                        pos,
                        "options are separated by spaces and the items of a list by ','",
                    )
                if c == "=":
                    raise self.error("missing option name before '='", pos)
                raise self.error(f"expected an option name, got {c!r}", pos)
            if self.peek() != "=":
                raise self.error(
                    f"expected '=' after option name '{key}'",
                    self.i,
                    "write options as key=value, with no spaces around '='",
                )
            self.i += 1
            options.append(_RawOption(key, pos, self.parse_value(open_pos)))

    def parse_value(self, open_pos: int) -> list[_Item]:
        items: list[_Item] = []
        c = self.peek()
        if not c:
            raise self.error("unbalanced '{'", open_pos, "add the missing '}'")
        if c.isspace() or c == "}":
            return items  # empty value: an empty list
        after_comma = -1
        while True:
            pos = self.i
            c = self.peek()
            if c == '"':
                items.append(_Item(self.parse_quoted(), True, pos))
            else:
                text = self.match(_BARE_RE)
                if not text:
                    if not c:
                        raise self.error("unbalanced '{'", open_pos, "add the missing '}'")
                    if c == ",":
                        raise self.error("missing value before ','", pos)
                    if c == "}":
                        raise self.error("missing value after ','", after_comma)
                    if c == "{":
                        raise self.error(
                            "unexpected '{' in a value", pos, "quote values that contain braces"
                        )
                    if c == "=":
                        raise self.error(
                            "unexpected '=' in a value", pos, "quote values that contain '='"
                        )
                    raise self.error(f"unexpected {c!r}", pos)
                if self.peek() == "=" and after_comma >= 0:
                    raise self.error(
                        f"missing value after ',' (found option '{text}')",
                        after_comma,
                        "remove the trailing ','",
                    )
                items.append(_Item(text, False, pos))
            c = self.peek()
            if c in ('"', "=", "{"):
                what = {'"': "quote", "=": "'='", "{": "'{'"}[c]
                raise self.error(
                    f"unexpected {what} inside a value", self.i, "quote the whole value instead"
                )
            j = self.i
            while j < len(self.text) and self.text[j].isspace():
                j += 1
            if j < len(self.text) and self.text[j] == ",":
                after_comma = j
                self.i = j + 1
                self.skip_ws()
                continue
            return items

    def parse_quoted(self) -> str:
        start = self.i
        self.i += 1
        out: list[str] = []
        while True:
            c = self.peek()
            if not c:
                raise self.error("unterminated string", start, "add the closing '\"'")
            if c == '"':
                self.i += 1
                return "".join(out)
            if c == "\\":
                esc = self.text[self.i + 1 : self.i + 2]
                if not esc:
                    raise self.error("unterminated string", start, "add the closing '\"'")
                if esc not in _ESCAPES:
                    raise self.error(
                        f"unknown escape '\\{esc}'",
                        self.i,
                        "write '\\\\' for a backslash (escapes: \\\\ \\\" \\n \\t \\r)",
                    )
                out.append(_ESCAPES[esc])
                self.i += 2
                continue
            out.append(c)
            self.i += 1


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text, validating pass names and options against the registry.

    Syntax errors give the column; an unknown pass lists the registered ones; an unknown or badly
    typed option raises :class:`OptionError` that lists the pass's valid options. Empty or
    whitespace-only text is the empty pipeline.

    Example::

        p = parse_pipeline('subset{keep=3,7,12 background=true}, prune{ratio=0.5}, dce')
        str(p)    # 'subset{keep=3,7,12 background=true},prune{ratio=0.5},dce'
        p[0].options["keep"]    # (3, 7, 12)
        parse_pipeline('subset{labels_file="my labels.txt"}')[0].options   # {'labels_file': ...}
    """
    if not isinstance(text, str):
        raise PipelineError(f"a pipeline must be text, got {type(text).__name__}")
    specs = []
    for raw in _Parser(text).parse():
        where = f" (at {_position(text, raw.pos)})"
        info = _lookup(raw.name, where)
        values: dict[str, Any] = {}
        for option in raw.options:
            opt_where = f" (at {_position(text, option.pos)})"
            if option.key in values:
                raise OptionError(
                    f"option '{option.key}' of pass '{raw.name}'{opt_where} is given twice; "
                    "keep one"
                )
            opt = info.option(option.key)
            if opt is None:
                raise _unknown_option(info, option.key, opt_where)
            values[option.key] = _value_from_text(info.name, opt, option.items, opt_where)
        specs.append(_make_spec(info, values, where))
    return Pipeline(specs)


# --------------------------------------------------------------------------------------------------
# TOML config
# --------------------------------------------------------------------------------------------------


def parse_pipeline_config(text: str, source: str = "<string>") -> Pipeline:
    """Parse a TOML pipeline config given as text; ``source`` names it in error messages.

    The config is either ``[[pass]]`` tables (``name`` plus the pass's options, TOML-typed) or a
    single top-level ``pipeline = "..."`` string in pipeline-text syntax.

    Example::

        parse_pipeline_config('''
        [[pass]]
        name = "subset"
        keep = [3, 7, 12]
        [[pass]]
        name = "prune"
        ratio = 0.5
        ''')    # Pipeline('subset{keep=3,7,12},prune{ratio=0.5}')
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"cannot parse pipeline config '{source}': {exc}") from exc
    unknown = sorted(set(data) - {"pass", "pipeline"})
    if unknown:
        raise PipelineError(
            f"pipeline config '{source}' has unknown top-level key(s) {', '.join(unknown)}; it "
            "holds either [[pass]] tables or one 'pipeline = \"...\"' string"
        )
    if "pass" in data and "pipeline" in data:
        raise PipelineError(
            f"pipeline config '{source}' has both [[pass]] tables and a 'pipeline' string; keep one"
        )
    if "pipeline" in data:
        if not isinstance(data["pipeline"], str):
            raise PipelineError(
                f"'pipeline' in pipeline config '{source}' must be a string like "
                f"\"subset{{keep=3}},dce\", got {type(data['pipeline']).__name__}"
            )
        try:
            return parse_pipeline(data["pipeline"])
        except PipelineError as exc:
            raise type(exc)(f"in pipeline config '{source}': {exc}") from exc
    if "pass" not in data:
        raise PipelineError(
            f"pipeline config '{source}' defines no pipeline: add [[pass]] tables (name = "
            "\"...\" plus options) or a 'pipeline = \"...\"' string"
        )
    tables = data["pass"]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise PipelineError(
            f"'pass' in pipeline config '{source}' must be an array of tables, written [[pass]]"
        )
    specs = []
    for index, table in enumerate(tables, start=1):
        where = f" (pass {index} in '{source}')"
        name = table.get("name")
        if not isinstance(name, str):
            raise PipelineError(
                f"[[pass]] number {index} in pipeline config '{source}' needs a string "
                f"'name = \"...\"', got {name!r}"
            )
        info = _lookup(name, where)
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key == "name":
                continue
            opt = info.option(key)
            if opt is None:
                raise _unknown_option(info, key, where)
            values[key] = _value_from_native(info.name, opt, value, where, none_string=True)
        specs.append(_make_spec(info, values, where))
    return Pipeline(specs)


def load_pipeline_config(path: str | os.PathLike[str]) -> Pipeline:
    """Read a TOML pipeline config file (see :func:`parse_pipeline_config`); errors name the file.

    Example::

        pipeline = load_pipeline_config("slim.toml")
        Path("copy.toml").write_text(pipeline.to_toml())
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PipelineError(f"pipeline config '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read pipeline config '{path}': {exc}") from exc
    return parse_pipeline_config(text, str(path))


# --------------------------------------------------------------------------------------------------
# Pass manager
# --------------------------------------------------------------------------------------------------


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
        """Called when a pass raises or the graph fails verification after it (``exc``: the cause)."""

    def run_after_pipeline(self, pipeline: Pipeline, graph: Any, report: PipelineReport) -> None:
        """Called once after the last pass succeeded."""


@dataclass
class PipelineReport:
    """What a pipeline run did: the pipeline text and one record per pass that completed.

    Each record in ``passes`` is a dict with ``name``, ``text`` (the pass's canonical text),
    ``seconds`` (the pass alone), ``verify_seconds`` (None when verification is off), ``changed``
    and ``stats``. ``input_verify_seconds`` is the time spent verifying the input graph.

    Example::

        report = PassManager("prune{ratio=0.5},dce").run(graph)
        report.passes[0]["stats"]          # {'removed_channels': 12}
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
            "passes": [_jsonable(record) for record in self.passes],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    return str(value)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, GraphslimError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class PassManager:
    """Runs a pipeline over a graph: passes in order, ``graph.verify()`` after each, timed.

    ``pipeline`` is a :class:`Pipeline`, pipeline text, or an iterable of :class:`PassSpec`; it is
    validated against the registry here, before any graph is touched. With ``verify=True`` the
    input graph is verified first and the graph again after every pass. A failure raises
    :class:`PipelineError` naming the failing pass, its position and the passes that ran before
    it, chained to the original exception; the error carries ``report`` (the passes that
    completed) and ``pass_index`` (0-based) as attributes.

    Example::

        manager = PassManager("subset{keep=1,2},prune{ratio=0.5},dce", instruments=[Progress()])
        report = manager.run(graph)
        # PipelineError: pass 'prune{ratio=0.5}' (2nd of 3) failed after 'subset{keep=1,2}': ...
    """

    def __init__(
        self,
        pipeline: Pipeline | str | Iterable[PassSpec],
        verify: bool = True,
        instruments: Iterable[PassInstrument] = (),
    ) -> None:
        if isinstance(pipeline, str):
            pipeline = parse_pipeline(pipeline)
        elif not isinstance(pipeline, Pipeline):
            pipeline = Pipeline(tuple(pipeline))
        plan = []
        for index, spec in enumerate(pipeline, start=1):
            where = f" ({_ordinal(index)} of {len(pipeline)})"
            info, spec = _resolve(spec, where)
            plan.append((spec, info, _instantiate_options(info, spec, where)))
        self.pipeline = Pipeline(spec for spec, _, _ in plan)
        self.verify = verify
        self.instruments = tuple(instruments)
        self._plan = plan

    def run(self, graph: Any) -> PipelineReport:
        """Run every pass on ``graph`` (mutated in place) and return the report.

        Example::

            report = PassManager(parse_pipeline("dce")).run(graph)
            report.passes[0]["changed"]
        """
        report = PipelineReport(str(self.pipeline))
        if self.verify:
            start = time.perf_counter()
            try:
                graph.verify()
            except Exception as exc:
                error = PipelineError(
                    "the input graph failed verification before any pass ran (a loader bug or a "
                    f"corrupt model, not a pass): {_describe_exception(exc)}"
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
        start = time.perf_counter()
        try:
            result = info.fn(graph, options)
        except Exception as exc:
            self._fail(index, spec, graph, report, "failed", exc)
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult) or not isinstance(result.stats, Mapping):
            got = type(result).__name__
            if isinstance(result, PassResult):
                got = f"a PassResult whose stats is a {type(result.stats).__name__}, not a dict,"
            wrong = PipelineError(
                f"returned {got} instead of a PassResult (the pass function "
                f"{_qualified(info.fn)} must end with "
                "'return PassResult(changed=..., stats={...})')"
            )
            self._fail(index, spec, graph, report, "failed", wrong, chain=False)
        verify_seconds = None
        if self.verify:
            start = time.perf_counter()
            try:
                graph.verify()
            except Exception as exc:
                self._fail(index, spec, graph, report, "failed verification", exc)
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
        }

    def _fail(
        self,
        index: int,
        spec: PassSpec,
        graph: Any,
        report: PipelineReport,
        what: str,
        exc: BaseException,
        chain: bool = True,
    ) -> typing.NoReturn:
        for instrument in self.instruments:
            instrument.run_on_error(spec, graph, exc)
        message = f"pass '{spec}' ({_ordinal(index + 1)} of {len(self._plan)}) {what}"
        if index:
            message += " after " + ", ".join(f"'{s}'" for s, _, _ in self._plan[:index])
        message += f": {_describe_exception(exc)}"
        error = PipelineError(message)
        error.report, error.pass_index = report, index  # type: ignore[attr-defined]
        if chain:
            raise error from exc
        raise error


# --------------------------------------------------------------------------------------------------
# Built-in passes and plugins
# --------------------------------------------------------------------------------------------------

_LOADED_PACKAGES: set[str] = set()
_LOADING_PACKAGES: set[str] = set()
_MISSING_PACKAGES: set[str] = set()
_PLUGINS: dict[str, types.ModuleType] = {}
_ENTRY_POINTS: set[str] = set()


def _rollback(snapshot: dict[str, PassInfo]) -> None:
    """Undo registrations made by modules whose import failed (they are gone from sys.modules)."""
    for name, info in list(_REGISTRY.items()):
        if snapshot.get(name) is info or getattr(info.fn, "__module__", None) in sys.modules:
            continue
        if name in snapshot:
            _REGISTRY[name] = snapshot[name]
        else:
            del _REGISTRY[name]


def load_builtin_passes(package: str = BUILTIN_PASS_PACKAGE) -> list[str]:
    """Import every module of ``package`` so its passes register; return the modules imported.

    Idempotent (a second call imports nothing). Modules whose name starts with '_' are skipped. A
    module that fails to import raises :class:`PipelineError` naming it. If the package itself is
    absent (a source checkout that was never installed) nothing is loaded, and "unknown pass"
    errors say so.

    Example::

        load_builtin_passes()    # ['graphslim.passes.dce', 'graphslim.passes.prune', ...]
        load_builtin_passes("mycompany.passes")   # any package of pass modules
    """
    if package in _LOADED_PACKAGES or package in _LOADING_PACKAGES:
        return []
    _LOADING_PACKAGES.add(package)
    try:
        try:
            pkg = importlib.import_module(package)
        except ModuleNotFoundError as exc:
            if exc.name and (package == exc.name or package.startswith(exc.name + ".")):
                _MISSING_PACKAGES.add(package)
                return []
            raise PipelineError(
                f"cannot import the pass package '{package}': {_describe_exception(exc)}"
            ) from exc
        except Exception as exc:
            raise PipelineError(
                f"cannot import the pass package '{package}': {_describe_exception(exc)}"
            ) from exc
        _MISSING_PACKAGES.discard(package)
        imported = []
        paths = getattr(pkg, "__path__", None)
        modules = pkgutil.iter_modules(paths, package + ".") if paths else []
        for module in sorted(modules, key=lambda m: m.name):
            if module.name.rpartition(".")[2].startswith("_"):
                continue
            snapshot = dict(_REGISTRY)
            try:
                importlib.import_module(module.name)
            except Exception as exc:
                _rollback(snapshot)
                raise PipelineError(
                    f"built-in pass module '{module.name}' failed to import: "
                    f"{_describe_exception(exc)}"
                ) from exc
            imported.append(module.name)
        _LOADED_PACKAGES.add(package)
        return imported
    finally:
        _LOADING_PACKAGES.discard(package)


def load_plugin(spec: str | os.PathLike[str]) -> types.ModuleType:
    """Import a plugin that registers passes: a module name, or a path to a ``.py`` file.

    Idempotent per module or file. Any failure (missing file, import error, error while the plugin
    registers its passes) raises :class:`PipelineError` naming the plugin and the cause, and the
    passes the failed plugin had registered are removed again.

    Example::

        load_plugin("mycompany.graphslim_passes")   # importable module
        load_plugin("./my_passes.py")               # a file; its passes are now in the registry
    """
    text = os.fspath(spec)
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    if text.endswith(".py") or any(sep in text for sep in separators):
        return _load_plugin_file(text)
    if text in _PLUGINS:
        return _PLUGINS[text]
    snapshot = dict(_REGISTRY)
    try:
        module = importlib.import_module(text)
    except Exception as exc:
        _rollback(snapshot)
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name and text.startswith(exc.name):
            hint = " (is it installed? a plugin file must be given as a path ending in .py)"
        raise PipelineError(
            f"cannot load plugin '{text}': {_describe_exception(exc)}{hint}"
        ) from exc
    _PLUGINS[text] = module
    return module


def _load_plugin_file(text: str) -> types.ModuleType:
    path = Path(text).expanduser()
    if not path.exists():
        raise PipelineError(f"cannot load plugin '{text}': the file does not exist")
    if not path.is_file():
        raise PipelineError(f"cannot load plugin '{text}': it is not a file")
    resolved = path.resolve()
    key = str(resolved)
    if key in _PLUGINS:
        return _PLUGINS[key]
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"graphslim_plugin_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise PipelineError(f"cannot load plugin '{text}': Python cannot import this file")
    module = importlib.util.module_from_spec(module_spec)
    snapshot = dict(_REGISTRY)
    sys.modules[module_name] = module  # dataclasses and get_type_hints look the module up
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        _rollback(snapshot)
        raise PipelineError(f"cannot load plugin '{text}': {_describe_exception(exc)}") from exc
    _PLUGINS[key] = module
    return module


def load_entry_point_plugins(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every installed entry point of ``group``; return the names of those newly loaded.

    An entry point names a module whose import registers passes (``mypasses = "pkg.passes"``), or
    a callable that is called once with no arguments to register them. Idempotent. One that fails
    raises :class:`PipelineError` naming the entry point and its distribution.

    Example (in the plugin's pyproject.toml)::

        [project.entry-points."graphslim.passes"]
        mycompany = "mycompany.graphslim_passes"

    then ``load_entry_point_plugins()`` returns ``['mycompany']``.
    """
    loaded = []
    for entry_point in importlib.metadata.entry_points(group=group):
        key = f"{entry_point.name}={entry_point.value}"
        if key in _ENTRY_POINTS:
            continue
        snapshot = dict(_REGISTRY)
        try:
            obj = entry_point.load()
            if not isinstance(obj, types.ModuleType) and callable(obj):
                obj()
        except Exception as exc:
            _rollback(snapshot)
            dist = getattr(entry_point, "dist", None)
            source = f" from distribution '{dist.name}'" if dist is not None else ""
            raise PipelineError(
                f"cannot load pass plugin '{entry_point.name}' (entry point '{entry_point.value}' "
                f"of group '{group}'{source}): {_describe_exception(exc)}; uninstall or fix it"
            ) from exc
        _ENTRY_POINTS.add(key)
        loaded.append(entry_point.name)
    return loaded
