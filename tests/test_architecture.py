"""The house rules of the package layout (issue 14), checked on the source with ``ast``, nothing imported.

For every module of ``graphslim/`` and ``passes/`` (installed as ``graphslim.passes``):

* no import cycle between the package's modules, counting imports inside functions as well as at module
  level (relative imports resolved; ``if TYPE_CHECKING:`` blocks left out: they never run);
* no private name (``_x``) of another graphslim module used: ``from m import _x``, or ``m._x`` where
  ``m`` names a graphslim module;
* networkx imported only by ``graphslim/ir/graph.py``, and the IR's networkx graph (``Graph._g``) used
  nowhere else (the IR owns the graph mechanics);
* no file over 900 lines.

``KNOWN_VIOLATIONS`` lists what still breaks a rule in files being reworked elsewhere. It can only
shrink: an entry that is no longer a violation fails the test, so whoever fixes one deletes its line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 900
NETWORKX_HOME = "graphslim/ir/graph.py"

# Each entry: (rule, where, what). Every one must still be a violation (see the module docstring).
KNOWN_VIOLATIONS: set[tuple[str, str, str]] = set()  # none left (issue 14 done); a set, not {}


def _module_files() -> dict[str, Path]:
    """``{dotted module name: file}``; ``passes/x.py`` is ``graphslim.passes.x``."""
    out = {}
    for top, prefix in (("graphslim", ("graphslim",)), ("passes", ("graphslim", "passes"))):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(prefix + tuple(parts))] = path
    return out


MODULES = _module_files()


def _canonical(name: str) -> str:
    """``passes.x`` (the source tree's name) is ``graphslim.passes.x`` (the installed one)."""
    return "graphslim." + name if name == "passes" or name.startswith("passes.") else name


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (annotations only, never executed)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return _canonical(node.module or "")
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


class _Scan:
    """Imports, private uses and networkx imports of one module."""

    def __init__(self, module: str) -> None:
        self.module = module
        tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
        skip = _type_checking_nodes(tree)
        self.imports: set[str] = set()  # graphslim modules imported
        self.private: set[str] = set()  # "module._name" of other graphslim modules
        self.networkx = False
        self.graph_internals = any(isinstance(n, ast.Attribute) and n.attr == "_g" for n in ast.walk(tree))
        aliases: dict[str, str] = {}  # local name -> graphslim module it names
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.networkx |= a.name.split(".")[0] == "networkx"
                    target = _canonical(a.name)
                    if target in MODULES:
                        self.imports.add(target)
                        if a.asname:
                            aliases[a.asname] = target
                        else:
                            aliases[a.name.split(".")[0]] = _canonical(a.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(module, node)
                self.networkx |= base.split(".")[0] == "networkx"
                if base not in MODULES:
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if sub in MODULES:  # a submodule
                        self.imports.add(sub)
                        aliases[a.asname or a.name] = sub
                    else:
                        self.imports.add(base)
                    if _private(a.name) and base != module:
                        self.private.add(f"{base}.{a.name}")
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            target = _dotted(node.value, aliases)
            if target is not None and target != module:
                self.private.add(f"{target}.{node.attr}")
        self.imports.discard(module)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """The graphslim module an expression like ``loader`` or ``graphslim.io.loader`` names, or None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        if base is not None and f"{base}.{node.attr}" in MODULES:
            return f"{base}.{node.attr}"
    return None


SCANS = {m: _Scan(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(SCANS[v].imports):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(SCANS):
        if v not in index:
            visit(v)
    return out


def _rel(module: str) -> str:
    return MODULES[module].relative_to(ROOT).as_posix()


def _violations() -> set[tuple[str, str, str]]:
    found = set()
    for comp in _cycles():
        found.add(("cycle", comp[0], " <-> ".join(comp)))
    for module, scan in SCANS.items():
        for name in scan.private:
            found.add(("private", module, name))
        if scan.networkx and _rel(module) != NETWORKX_HOME:
            found.add(("networkx", _rel(module), "imports networkx"))
        if scan.graph_internals and _rel(module) != NETWORKX_HOME:
            found.add(("networkx", _rel(module), "uses Graph._g"))
        with open(MODULES[module], encoding="utf-8") as f:
            if sum(1 for _ in f) > MAX_LINES:
                found.add(("size", _rel(module), f"over {MAX_LINES} lines"))
    return found


def test_the_scan_sees_the_package():
    assert "graphslim.ir.graph" in MODULES and "graphslim.passes.dce" in MODULES
    assert "graphslim.ir.node" in SCANS["graphslim.ir.graph"].imports
    assert SCANS["graphslim.ir.graph"].networkx


def test_no_new_cycles_private_names_networkx_or_large_files():
    new = sorted(_violations() - KNOWN_VIOLATIONS)
    assert not new, "layout rules broken (see tests/test_architecture.py):\n" + "\n".join(map(str, new))


def test_known_violations_are_still_violations():
    fixed = sorted(KNOWN_VIOLATIONS - _violations())
    assert not fixed, "no longer violations: delete them from KNOWN_VIOLATIONS:\n" + "\n".join(map(str, fixed))


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
    """The detector itself: a cycle through a function-level import, a private name by import and by
    attribute, networkx outside the IR."""
    pkg = tmp_path / "graphslim"
    (pkg / "ir").mkdir(parents=True)
    (tmp_path / "passes").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ir" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from graphslim import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a._hidden\n")
    (pkg / "c.py").write_text("from graphslim.b import _g\nimport networkx\nfrom typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from graphslim import d\n")
    (pkg / "d.py").write_text("import graphslim.c\n\ndef f(graph):\n    return graph._g\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", _module_files())
    monkeypatch.setattr(sys.modules[__name__], "SCANS", {m: _Scan(m) for m in _module_files()})
    found = _violations()
    assert ("cycle", "graphslim.a", "graphslim.a <-> graphslim.b") in found
    assert ("private", "graphslim.b", "graphslim.a._hidden") in found
    assert ("private", "graphslim.c", "graphslim.b._g") in found
    assert ("networkx", "graphslim/c.py", "imports networkx") in found
    assert ("networkx", "graphslim/d.py", "uses Graph._g") in found
    assert not any(v[0] == "cycle" and "graphslim.d" in v[2] for v in found)  # TYPE_CHECKING only
