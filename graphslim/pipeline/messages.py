"""Wording shared by the pipeline's error messages: exceptions, ordinals, function names.

Example::

    describe_exception(KeyError("x"))   # "KeyError: 'x'"
    ordinal(2)                          # '2nd'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from graphslim.errors import GraphslimError


def describe_exception(exc: BaseException) -> str:
    """An exception for a message: graphslim's own errors by their text, others with their type.

    Example::

        describe_exception(ValueError("bad"))        # 'ValueError: bad'
        describe_exception(PassError("no rule"))     # 'no rule'
    """
    if isinstance(exc, GraphslimError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ``11th``, ``21st``...

    Example::

        f"pass 'dce' ({ordinal(3)} of 4)"   # "pass 'dce' (3rd of 4)"
    """
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def qualified(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a function, to name it in a message.

    Example::

        qualified(prune)   # 'graphslim.passes.prune.prune'
    """
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"
