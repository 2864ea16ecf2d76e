"""Model-provided text on a terminal: node names, op names, file names and error messages come from
the model, and a model is untrusted input. Printed raw, an ESC sequence in a node name can move the
cursor, erase a line and forge an "OK" verdict; a rich markup tag (``[green]``) can restyle one.

Every string that the CLI prints and a model could have chosen goes through :func:`clean` (plain
text: ``click.echo``) or :func:`markup` (text handed to rich, which interprets ``[...]`` tags). JSON
output is not escaped (``json.dumps`` already escapes control characters).

    >>> clean("conv\\x1b[2K\\rOK")
    'conv\\\\x1b[2K\\\\rOK'
"""

from __future__ import annotations

import re

__all__ = ["clean", "markup"]

# C0 controls (newline and tab included: a model's name has no business starting a new line), DEL,
# C1 controls, and the Unicode format characters that reorder or hide text (bidi overrides and
# isolates, zero-width joiners, the BOM, line and paragraph separators).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"}


def _escape(m: re.Match) -> str:
    ch = m.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text) -> str:
    """``text`` (any object: ``str()`` is taken) with every control or format character written as
    a visible escape (``\\x1b``, ``\\n``, ``\\u202e``); printable text, non-ASCII letters included,
    unchanged."""
    return _UNSAFE.sub(_escape, str(text))


def markup(text) -> str:
    """:func:`clean`, then escaped for rich markup (``[`` tags are shown, never interpreted)."""
    from rich.markup import escape

    return escape(clean(text))
