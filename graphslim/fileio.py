"""File-system helpers shared by graphslim's modules (pure Python: importing it loads no TensorFlow).

Example::

    write_text_atomic(Path("report.json"), json.dumps(data, indent=2) + "\n")
    write_bytes_atomic(Path("model.tflite"), flatbuffer)
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_bytes_atomic", "write_text_atomic"]


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling (``.NAME.tmp-PID``) renamed over it, so
    that nobody ever reads half a file. On an OSError the temporary is removed and the error raised
    again, for the caller to word.

    Example::

        try:
            write_bytes_atomic(path, data)
        except OSError as exc:
            raise GraphslimError(f"cannot write {path}: {exc.strerror or exc}") from exc
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))
