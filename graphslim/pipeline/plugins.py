"""Loading passes: the built-in pass package, plugin modules and files, installed entry points.

Each loader registers into the default registry (:data:`~graphslim.pipeline.registry.REGISTRY`), is
idempotent, and on failure removes the passes the failed module had registered and raises a
:class:`PipelineError` naming it.

Example::

    load_plugin("./my_passes.py")       # a file (or an importable module name)
    load_entry_point_plugins()          # every installed entry point of group "graphslim.passes"
    load_builtin_passes()               # graphslim.passes (also done on the first lookup)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

from graphslim.errors import PipelineError
from graphslim.pipeline.messages import describe_exception
from graphslim.pipeline.registry import BUILTIN_PASS_PACKAGE, REGISTRY

ENTRY_POINT_GROUP = "graphslim.passes"
"""The entry-point group through which installed distributions contribute passes."""


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
    return REGISTRY.load_package(package)


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
    if text in REGISTRY.plugins:
        return REGISTRY.plugins[text]
    saved = REGISTRY.snapshot()
    try:
        module = importlib.import_module(text)
    except Exception as exc:
        REGISTRY.undo_failed_import(saved)
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name and text.startswith(exc.name):
            hint = " (is it installed? a plugin file must be given as a path ending in .py)"
        raise PipelineError(
            f"cannot load plugin '{text}': {describe_exception(exc)}{hint}"
        ) from exc
    REGISTRY.plugins[text] = module
    return module


def _load_plugin_file(text: str) -> types.ModuleType:
    path = Path(text).expanduser()
    if not path.exists():
        raise PipelineError(f"cannot load plugin '{text}': the file does not exist")
    if not path.is_file():
        raise PipelineError(f"cannot load plugin '{text}': it is not a file")
    resolved = path.resolve()
    key = str(resolved)
    if key in REGISTRY.plugins:
        return REGISTRY.plugins[key]
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"graphslim_plugin_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise PipelineError(f"cannot load plugin '{text}': Python cannot import this file")
    module = importlib.util.module_from_spec(module_spec)
    saved = REGISTRY.snapshot()
    sys.modules[module_name] = module  # dataclasses and get_type_hints look the module up
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        REGISTRY.undo_failed_import(saved)
        raise PipelineError(f"cannot load plugin '{text}': {describe_exception(exc)}") from exc
    REGISTRY.plugins[key] = module
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
        if key in REGISTRY.entry_points:
            continue
        saved = REGISTRY.snapshot()
        try:
            obj = entry_point.load()
            if not isinstance(obj, types.ModuleType) and callable(obj):
                obj()
        except Exception as exc:
            REGISTRY.undo_failed_import(saved)
            dist = getattr(entry_point, "dist", None)
            source = f" from distribution '{dist.name}'" if dist is not None else ""
            raise PipelineError(
                f"cannot load pass plugin '{entry_point.name}' (entry point '{entry_point.value}' "
                f"of group '{group}'{source}): {describe_exception(exc)}; uninstall or fix it"
            ) from exc
        REGISTRY.entry_points.add(key)
        loaded.append(entry_point.name)
    return loaded
