"""The pipeline text parser: MLIR-style text to a validated :class:`Pipeline`.

Grammar: passes are separated by commas; a pass may carry options in braces, space-separated
``key=value`` pairs with no spaces around ``=``; a list value is comma-separated (``keep=3,7,12``) and
an empty list is written as nothing (``keep=``); a value is double-quoted when it holds spaces,
commas, braces, ``=`` or quotes (``labels="my labels.txt"``), with the escapes ``\\\\``, ``\\"``,
``\\n``, ``\\t`` and ``\\r``; ``none`` (unquoted) is the null of an optional option. The printer is
``str()`` of a :class:`Pipeline` (:mod:`graphslim.pipeline.spec`); parsing its output gives an equal
pipeline.

Example::

    p = parse_pipeline('subset{keep=3,7,12 background=true}, prune{ratio=0.5}, dce')
    str(p)    # 'subset{keep=3,7,12 background=true},prune{ratio=0.5},dce'
    parse_pipeline("prune{ratio=0.5 ratio=0.3}")   # OptionError: option 'ratio' ... is given twice
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from graphslim.errors import OptionError, PipelineError
from graphslim.pipeline.options import TextItem, value_from_text
from graphslim.pipeline.registry import REGISTRY
from graphslim.pipeline.spec import Pipeline, make_spec, unknown_option

_BARE_RE = re.compile(r'[^\s,{}"=]+')  # an unquoted value (a backslash in it is literal)


@dataclass
class _RawOption:
    key: str
    pos: int
    items: list[TextItem]


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

    def parse_value(self, open_pos: int) -> list[TextItem]:
        items: list[TextItem] = []
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
                items.append(TextItem(self.parse_quoted(), True, pos))
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
                items.append(TextItem(text, False, pos))
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
        info = REGISTRY.get(raw.name, where)
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
                raise unknown_option(info, option.key, opt_where)
            values[option.key] = value_from_text(info.name, opt, option.items, opt_where)
        specs.append(make_spec(info, values, where))
    return Pipeline(specs)
