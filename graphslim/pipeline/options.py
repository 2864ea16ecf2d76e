"""Typed pass options: what a field of an options dataclass may be, and values checked against it.

A pass declares its options as a frozen dataclass. :func:`analyse_options` turns its fields into
:class:`OptionInfo` records (base type, list, optional, choices, default, help) when the pass is
registered; :func:`value_from_text` and :func:`value_from_native` convert what a user wrote (pipeline
text, TOML, Python) to the declared type, with errors that name the pass, the option and what it
expects; :func:`format_value` prints a value back as canonical pipeline text.

Example::

    @dataclass(frozen=True)
    class PruneOptions:
        ratio: float = field(default=0.5, metadata={"help": "fraction of channels removed"})

    (ratio,) = analyse_options("prune", PruneOptions)
    ratio.describe()                                          # 'ratio (float, default 0.5): ...'
    value_from_text("prune", ratio, [TextItem("0.25", False)], "")   # 0.25
    format_value((3, 7, 12))                                  # '3,7,12'
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from graphslim.errors import OptionError, PipelineError
from graphslim.pipeline.messages import describe_exception

_BASE_NAMES = {int: "int", float: "float", bool: "bool", str: "string"}
_PRINT_BARE_RE = re.compile(r'[^\s,{}"=\\]+')  # printed unquoted (backslashes get quoted)
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


def format_value(value: Any) -> str:
    """Canonical pipeline text of an option value (the inverse of the pipeline parser).

    Example::

        format_value(None), format_value(True), format_value((3, 7))   # ('none', 'true', '3,7')
        format_value("my labels.txt")                                  # '"my labels.txt"'
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
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
            name = "|".join(format_value(c) for c in self.choices)
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
            default = f"default {format_value(self.default)}"
        text = f"{self.name} ({self.type_name}, {default})"
        return f"{text}: {self.help}" if self.help else text


class TextItem(NamedTuple):
    """One item of an option value as written in pipeline text (``keep=3,7`` has two).

    ``quoted`` tells ``"none"`` (a string) from ``none`` (the null); ``pos`` is its offset in the
    text, for error messages.
    """

    text: str
    quoted: bool
    pos: int = 0


# --------------------------------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------------------------------


def analyse_options(pass_name: str, cls: type) -> tuple[OptionInfo, ...]:
    """The options of a pass from its options dataclass, checked (types supported, defaults fit).

    A declaration error raises :class:`PipelineError` naming the pass and the field.

    Example::

        [o.name for o in analyse_options("prune", PruneOptions)]   # ['ratio', 'criterion', ...]
    """
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
            f"{describe_exception(exc)}; make sure every annotation names an importable type"
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
                coerced = value_from_native(pass_name, info, default, "")
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


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------


def _expected(opt: OptionInfo) -> str:
    if opt.choices is not None:
        values = ", ".join(format_value(c) for c in opt.choices)
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
        shown = [format_value(c) for c in opt.choices]
        close = difflib.get_close_matches(format_value(value), shown, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}?" if close else ""
        raise _bad_value(pass_name, opt, repr(value), where, hint)
    return value


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


def value_from_text(
    pass_name: str, opt: OptionInfo, items: Sequence[TextItem], where: str
) -> Any:
    """Convert the items of ``key=a,b,c`` as written in pipeline text to the option's type.

    An unquoted ``none`` is the null of an optional option. ``where`` (e.g. ``" (at column 7)"``)
    goes into the :class:`OptionError` after the pass name.

    Example::

        value_from_text("subset", keep, [TextItem("3", False), TextItem("7", False)], "")  # (3, 7)
    """
    if opt.optional and len(items) == 1 and not items[0].quoted and items[0].text.lower() == "none":
        return None
    if opt.is_list:
        return tuple(_scalar_from_text(pass_name, opt, item.text, where) for item in items)
    if not items:
        raise _bad_value(pass_name, opt, "nothing", where, f"write {opt.name}=VALUE")
    if len(items) > 1:
        hint = f"quote it to include commas: {opt.name}=\"...\"" if opt.base is str else ""
        got = "a list " + ",".join(format_value(i.text) for i in items)
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


def value_from_native(
    pass_name: str, opt: OptionInfo, value: Any, where: str, none_string: bool = False
) -> Any:
    """Check and normalise a Python or TOML value (lists become tuples, ints become floats...).

    With ``none_string`` (TOML, which has no null), the string "none" is the null of an optional.

    Example::

        value_from_native("prune", ratio, 1, "")     # 1.0
        value_from_native("subset", keep, [3, 7], "")   # (3, 7)
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
