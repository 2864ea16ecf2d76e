"""Progress from inside a pass: ``progress("measuring latency: 3/20")`` shows the text next to the pass on
whatever display runs the pipeline (the CLI's spinner line; nothing when no display is listening).

A display installs its callback with :func:`listen` (a context manager, so nested pipelines restore
the outer one); passes and the analyses they call only call :func:`progress`, which is cheap when no
one listens.

Example::

    from graphslim.pipeline.progress import progress
    for i, layer in enumerate(layers):
        progress(f"measuring {i + 1}/{len(layers)}")
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

__all__ = ["progress", "listen"]

_LISTENER: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "graphslim_progress", default=None)


def progress(text: str) -> None:
    """Tell the display what the running pass is doing now (one short line)."""
    listener = _LISTENER.get()
    if listener is not None:
        listener(text)


@contextlib.contextmanager
def listen(callback: Callable[[str], None]) -> Iterator[None]:
    """Route :func:`progress` to ``callback`` inside the ``with`` block."""
    token = _LISTENER.set(callback)
    try:
        yield
    finally:
        _LISTENER.reset(token)
