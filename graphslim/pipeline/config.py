"""Pipeline configs in TOML, for build systems: ``[[pass]]`` tables, or one pipeline string.

Writing a config is :meth:`Pipeline.to_toml`; reading one gives the same :class:`Pipeline` as the
text it prints (``str(load_pipeline_config(path))`` is the canonical pipeline text).

Example (``slim.toml``)::

    [[pass]]
    name = "subset"
    keep = [3, 7, 12]

    [[pass]]
    name = "prune"
    ratio = 0.5

then ``str(load_pipeline_config("slim.toml"))`` is ``'subset{keep=3,7,12},prune{ratio=0.5}'``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from graphslim.errors import PipelineError
from graphslim.pipeline.options import value_from_native
from graphslim.pipeline.registry import REGISTRY
from graphslim.pipeline.spec import Pipeline, make_spec, unknown_option
from graphslim.pipeline.text import parse_pipeline


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
        info = REGISTRY.get(name, where)
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key == "name":
                continue
            opt = info.option(key)
            if opt is None:
                raise unknown_option(info, key, where)
            values[key] = value_from_native(info.name, opt, value, where, none_string=True)
        specs.append(make_spec(info, values, where))
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
