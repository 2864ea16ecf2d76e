"""The pass registry: passes by name, with their typed options, and the built-in pass package.

A :class:`Registry` maps pass names to :class:`PassInfo` and remembers which pass packages and
plugins were loaded into it. One default instance, :data:`REGISTRY`, serves ``@register_pass``,
pipeline parsing and the pass manager; :meth:`Registry.snapshot` and :meth:`Registry.restore` put it
back as it was (tests, plugins that fail half-way). The built-in passes (the package
``graphslim.passes``) are imported on the first lookup.

Example::

    @register_pass("prune", options=PruneOptions)
    def prune(graph, opts: PruneOptions) -> PassResult:
        \"\"\"Remove the least important channels.\"\"\"
        ...

    get_pass("prune").help                 # 'Remove the least important channels.'
    saved = REGISTRY.snapshot()
    register_pass("my-pass")(my_pass)
    REGISTRY.restore(saved)                # 'my-pass' is gone again
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import re
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from graphslim.errors import PipelineError
from graphslim.pipeline.messages import describe_exception, qualified
from graphslim.pipeline.options import OptionInfo, analyse_options
from graphslim.pipeline.results import PassResult

BUILTIN_PASS_PACKAGE = "graphslim.passes"
"""The package whose modules hold the built-in passes (the top-level ``passes/`` folder)."""

_PASS_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: its name, function, options dataclass (or None) and one-line help.

    ``options`` describes every option (derived from ``options_cls`` at registration).

    Example::

        info = get_pass("prune")
        info.help                      # 'Remove the least important channels.'
        [o.name for o in info.options] # ['ratio', 'criterion', ...]
    """

    name: str
    fn: Callable[..., PassResult]
    options_cls: type | None
    help: str
    options: tuple[OptionInfo, ...] = ()

    def option(self, name: str) -> OptionInfo | None:
        """The option called ``name``, or None.

        Example::

            get_pass("prune").option("ratio").default   # 0.5
        """
        for opt in self.options:
            if opt.name == name:
                return opt
        return None

    def describe_options(self) -> str:
        """All options as one sentence, for error messages ("takes no options" if it has none).

        Example::

            get_pass("prune").describe_options()
            # "ratio (float, default 0.5): fraction of channels ...; criterion (l1|l2|bn, ...)"
        """
        if not self.options:
            return f"pass '{self.name}' takes no options"
        return "; ".join(opt.describe() for opt in self.options)


@dataclass(frozen=True)
class RegistrySnapshot:
    """The contents of a :class:`Registry` at one moment; give it to :meth:`Registry.restore`."""

    passes: dict[str, PassInfo] = field(default_factory=dict)
    loaded_packages: frozenset[str] = frozenset()
    missing_packages: frozenset[str] = frozenset()
    plugins: dict[str, types.ModuleType] = field(default_factory=dict)
    entry_points: frozenset[str] = frozenset()


class Registry:
    """Passes by name, plus the pass packages and plugins loaded into them.

    ``builtin_package`` is imported (every public module) on the first lookup, so that built-in
    passes need no explicit loading; None for a registry of your own passes only. ``plugins`` (spec
    or resolved path → module) and ``entry_points`` (``name=value`` keys) record the plugins loaded
    (see :mod:`graphslim.pipeline.plugins`), so that loading one twice is a no-op.

    Example::

        registry = Registry(builtin_package=None)
        registry.register("noop", lambda graph, options: PassResult(False), help="do nothing")
        registry.names()                   # ['noop']
        "noop" in registry, len(registry)  # (True, 1)
    """

    def __init__(self, builtin_package: str | None = BUILTIN_PASS_PACKAGE) -> None:
        self.builtin_package = builtin_package
        self.plugins: dict[str, types.ModuleType] = {}
        self.entry_points: set[str] = set()
        self._passes: dict[str, PassInfo] = {}
        self._loaded: set[str] = set()
        self._loading: set[str] = set()
        self._missing: set[str] = set()

    # -- registration ------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        fn: Callable[..., PassResult],
        options: type | None = None,
        help: str | None = None,
        *,
        replace: bool = False,
    ) -> PassInfo:
        """Register ``fn(graph, options) -> PassResult`` as the pass ``name``; see :func:`register_pass`.

        Example::

            REGISTRY.register("prune", prune, options=PruneOptions)
        """
        _check_name(name)
        if not callable(fn):
            raise PipelineError(f"pass '{name}' must be registered on a function, got {fn!r}")
        _check_pass_signature(name, fn)
        option_infos = analyse_options(name, options) if options is not None else ()
        text = help if help is not None else _first_doc_line(fn)
        existing = self._passes.get(name)
        if existing is not None and not replace and not _same_definition(existing.fn, fn):
            raise PipelineError(
                f"pass '{name}' is already registered (by {qualified(existing.fn)}), so "
                f"{qualified(fn)} cannot take the name; pick another name, or register with "
                "replace=True to override it deliberately"
            )
        info = PassInfo(name, fn, options, text, option_infos)
        self._passes[name] = info
        return info

    def unregister(self, name: str) -> PassInfo:
        """Remove the pass ``name`` and return it; an unknown name raises :class:`PipelineError`.

        Example::

            REGISTRY.unregister("test-noop")
        """
        try:
            return self._passes.pop(name)
        except KeyError:
            raise PipelineError(self._unknown_pass_message(name, "")) from None

    # -- lookup ------------------------------------------------------------------------------------
    def get(self, name: str, where: str = "") -> PassInfo:
        """The pass ``name`` (built-ins loaded first); ``where`` goes into the error after the name.

        An unknown name raises :class:`PipelineError` that lists every registered pass and suggests
        the closest one.

        Example::

            REGISTRY.get("prun", " (at column 1)")
            # PipelineError: unknown pass 'prun' (at column 1); did you mean 'prune'? ...
        """
        self.load_builtins()
        info = self._passes.get(name)
        if info is None:
            raise PipelineError(self._unknown_pass_message(name, where))
        return info

    def names(self) -> list[str]:
        """Every registered pass name, sorted (built-ins loaded first)."""
        self.load_builtins()
        return sorted(self._passes)

    def passes(self) -> dict[str, PassInfo]:
        """Every registered pass by name, sorted (built-ins loaded first)."""
        return {name: self._passes[name] for name in self.names()}

    def __contains__(self, name: object) -> bool:
        self.load_builtins()
        return name in self._passes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    # -- state -------------------------------------------------------------------------------------
    def snapshot(self) -> RegistrySnapshot:
        """The registry's contents now (passes, loaded packages and plugins), for :meth:`restore`.

        Example::

            saved = REGISTRY.snapshot()
            load_plugin("my_passes.py")
            REGISTRY.restore(saved)    # the plugin's passes are gone; loading it again reloads it
        """
        return RegistrySnapshot(
            passes=dict(self._passes),
            loaded_packages=frozenset(self._loaded),
            missing_packages=frozenset(self._missing),
            plugins=dict(self.plugins),
            entry_points=frozenset(self.entry_points),
        )

    def restore(self, snapshot: RegistrySnapshot) -> None:
        """Put the registry back as it was when ``snapshot`` was taken."""
        self._passes.clear()
        self._passes.update(snapshot.passes)
        self._loaded.clear()
        self._loaded.update(snapshot.loaded_packages)
        self._missing.clear()
        self._missing.update(snapshot.missing_packages)
        self.plugins.clear()
        self.plugins.update(snapshot.plugins)
        self.entry_points.clear()
        self.entry_points.update(snapshot.entry_points)

    def undo_failed_import(self, snapshot: RegistrySnapshot) -> None:
        """Undo the registrations made since ``snapshot`` by modules whose import failed.

        A module that failed to import is gone from ``sys.modules``; passes it registered are
        removed (or the ones they replaced put back). Passes of modules still imported stay.
        """
        for name, info in list(self._passes.items()):
            module = getattr(info.fn, "__module__", None)
            if snapshot.passes.get(name) is info or module in sys.modules:
                continue
            if name in snapshot.passes:
                self._passes[name] = snapshot.passes[name]
            else:
                del self._passes[name]

    # -- packages of passes ------------------------------------------------------------------------
    def load_builtins(self) -> list[str]:
        """Import the built-in pass package (once); return the modules imported."""
        if self.builtin_package is None:
            return []
        return self.load_package(self.builtin_package)

    def load_package(self, package: str) -> list[str]:
        """Import every public module of ``package`` so its passes register; see
        :func:`graphslim.pipeline.plugins.load_builtin_passes`."""
        if package in self._loaded or package in self._loading:
            return []
        self._loading.add(package)
        try:
            try:
                pkg = importlib.import_module(package)
            except ModuleNotFoundError as exc:
                if exc.name and (package == exc.name or package.startswith(exc.name + ".")):
                    self._missing.add(package)
                    return []
                raise PipelineError(
                    f"cannot import the pass package '{package}': {describe_exception(exc)}"
                ) from exc
            except Exception as exc:
                raise PipelineError(
                    f"cannot import the pass package '{package}': {describe_exception(exc)}"
                ) from exc
            self._missing.discard(package)
            imported = []
            paths = getattr(pkg, "__path__", None)
            modules = pkgutil.iter_modules(paths, package + ".") if paths else []
            for module in sorted(modules, key=lambda m: m.name):
                if module.name.rpartition(".")[2].startswith("_"):
                    continue
                saved = self.snapshot()
                try:
                    importlib.import_module(module.name)
                except Exception as exc:
                    self.undo_failed_import(saved)
                    raise PipelineError(
                        f"built-in pass module '{module.name}' failed to import: "
                        f"{describe_exception(exc)}"
                    ) from exc
                imported.append(module.name)
            self._loaded.add(package)
            return imported
        finally:
            self._loading.discard(package)

    def _unknown_pass_message(self, name: str, where: str) -> str:
        names = sorted(self._passes)
        message = f"unknown pass '{name}'{where}"
        close = difflib.get_close_matches(name, names, n=1)
        message += f"; did you mean '{close[0]}'?" if close else "."
        if names:
            message += f" Registered passes: {', '.join(names)}."
        else:
            message += " No passes are registered."
        if self._missing:
            missing = ", ".join(f"'{p}'" for p in sorted(self._missing))
            message += (
                f" The built-in pass package {missing} is not importable; install graphslim "
                "(pip install -e .) to get the built-in passes."
            )
        else:
            message += " Passes of your own must be loaded as plugins first."
        return message


REGISTRY = Registry()
"""The registry that ``@register_pass``, pipeline parsing and the pass manager use."""


# --------------------------------------------------------------------------------------------------
# The functions over the default registry
# --------------------------------------------------------------------------------------------------


def register_pass(
    name: str,
    options: type | None = None,
    help: str | None = None,
    *,
    replace: bool = False,
) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Decorator registering ``fn(graph, options) -> PassResult`` as the pass ``name``.

    ``options`` is a dataclass whose fields are the pass's options (supported field types: int,
    float, bool, str, ``X | None``, ``tuple[X, ...]``, ``Literal[...]``; per-field metadata
    ``help`` and ``choices``). A pass without options is called with ``options=None``. ``help``
    defaults to the first line of the function's docstring. Registering a name twice is an error
    unless ``replace=True`` (re-executing the same module, e.g. ``importlib.reload``, replaces
    silently). Errors in the declaration (unsupported option type, bad default, wrong function
    signature) raise :class:`PipelineError` at registration, not at first use.

    Example::

        @register_pass("prune", options=PruneOptions)
        def prune(graph, opts: PruneOptions) -> PassResult:
            \"\"\"Remove the least important channels of each channel group.\"\"\"
            ...
            return PassResult(changed=True, stats={"removed_channels": 12})
    """
    _check_name(name)

    def decorator(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        REGISTRY.register(name, fn, options, help, replace=replace)
        return fn

    return decorator


def unregister_pass(name: str) -> PassInfo:
    """Remove the pass ``name`` from the registry and return it (for tests and plugin reloads).

    Example::

        info = unregister_pass("test-noop")
    """
    return REGISTRY.unregister(name)


def get_pass(name: str) -> PassInfo:
    """The registered pass ``name`` (built-in passes are loaded on first use).

    An unknown name raises :class:`PipelineError` that lists every registered pass and suggests
    the closest one.

    Example::

        get_pass("prune").help        # 'Remove the least important channels of each group.'
        get_pass("prun")    # PipelineError: unknown pass 'prun'; did you mean 'prune'? ...
    """
    return REGISTRY.get(name)


def registered_passes() -> dict[str, PassInfo]:
    """Every registered pass (built-ins loaded on first use), sorted by name.

    Example::

        for name, info in registered_passes().items():
            print(f"{name:12} {info.help}")
    """
    return REGISTRY.passes()


# --------------------------------------------------------------------------------------------------
# Checks of a registration
# --------------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _PASS_NAME_RE.fullmatch(name):
        raise PipelineError(
            f"invalid pass name {name!r}: a pass name starts with a letter or '_' and continues "
            "with letters, digits, '_', '-' or '.'"
        )


def _check_pass_signature(name: str, fn: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise PipelineError(
            f"pass '{name}' ({qualified(fn)}) must accept two arguments (graph, options), but its "
            f"signature is {signature}; a pass without options still takes 'options' (it gets None)"
        ) from None


def _first_doc_line(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    for line in doc.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """True when ``b`` is ``a`` or the same function re-created by re-executing its module."""
    if a is b:
        return True
    a_module, b_module = getattr(a, "__module__", None), getattr(b, "__module__", None)
    a_name, b_name = getattr(a, "__qualname__", None), getattr(b, "__qualname__", None)
    return a_module is not None and a_name is not None and (a_module, a_name) == (b_module, b_name)
