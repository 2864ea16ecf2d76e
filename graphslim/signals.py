"""The signals that abort a run cleanly (SIGINT, SIGTERM, SIGHUP), and a record of their arrival that
does not depend on Python's exception reaching graphslim's code.

Python runs a signal's handler in the main thread at some later bytecode, wherever that is: inside
TensorFlow, a library's callback, a finalizer. If code there swallows the ``KeyboardInterrupt``, or the
handler's turn never comes before the step that matters, a Ctrl-C would be lost and a write committed
as if nothing happened (seen under load: ``optimize --force`` exited 0 after SIGINT). :func:`watch`
therefore routes every signal's C-level arrival to a pipe (``signal.set_wakeup_fd``), and
:func:`raise_if_received` turns anything recorded there into the exception its handler would have
raised: the emitter calls it right before it moves a finished model into place, and the CLI before
it reports success.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["Terminated", "WATCHED", "forget", "raise_if_received", "received", "watch"]

#: the signals that abort a run (the CLI makes SIGTERM and SIGHUP behave like Ctrl-C)
WATCHED = frozenset(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

_read_fd: int | None = None
_received: list[int] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt so that the same
    cleanup runs (the emitter removes its temporary directory); exit status 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


def watch() -> bool:
    """Record the arrival of every watched signal from now on (main thread only; once per process).
    False where that is not possible (another thread, or an embedder that owns the wakeup fd)."""
    global _read_fd
    if _read_fd is not None:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    try:
        if signal.set_wakeup_fd(w, warn_on_full_buffer=False) != -1:
            signal.set_wakeup_fd(-1)  # someone else's (an event loop): leave it to them
            raise ValueError("in use")
    except ValueError:
        os.close(r)
        os.close(w)
        return False
    _read_fd = r
    return True


def received() -> list[int]:
    """The watched signals that arrived since :func:`watch` (in order; each arrival once)."""
    if _read_fd is not None:
        while True:
            try:
                data = os.read(_read_fd, 4096)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            _received.extend(b for b in data if b in WATCHED)
    return list(_received)


def raise_if_received() -> None:
    """Raise what the first watched signal's handler raises (KeyboardInterrupt for SIGINT,
    :class:`Terminated` for the others) if one arrived, even if that exception was lost."""
    got = received()
    if got:
        if got[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(got[0])


def forget() -> None:
    """Drop the record so far: for a caller that handled the interrupt itself (``distill`` ends its
    training early on Ctrl-C and keeps the best weights; the run goes on)."""
    received()
    _received.clear()
