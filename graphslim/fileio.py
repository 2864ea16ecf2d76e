"""File-system helpers shared by graphslim's modules (pure Python: importing it loads no TensorFlow).

Example::

    write_text_atomic(Path("report.json"), json.dumps(data, indent=2) + "\n")
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_text_atomic"]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling (``.NAME.tmp-PID``) renamed over
    it, so that nobody ever reads half a file. On an OSError the temporary is removed and the error
    raised again, for the caller to word.

    Example::

        try:
            write_text_atomic(path, text)
        except OSError as exc:
            raise GraphslimError(f"cannot write {path}: {exc.strerror or exc}") from exc
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
