"""Tests of the pipeline package's newer pieces: its layout, the Registry object, pass warnings,
IR printing instruments and the rollback of a failed pass (on the real IR).

Every pass registered here is named ``test-*`` and the registry is restored after each test.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import graphslim.pipeline
from graphslim.errors import PassError, PipelineError
from graphslim.pipeline import (
    REGISTRY,
    PassManager,
    PassResult,
    PrintIRAfter,
    PrintIRBefore,
    Registry,
    load_builtin_passes,
    load_plugin,
    register_pass,
)
from graphslim.pipeline.instruments import format_graph

PACKAGE = Path(graphslim.pipeline.__file__).parent


@pytest.fixture(autouse=True)
def isolated_registry():
    load_builtin_passes()
    saved = REGISTRY.snapshot()
    yield
    REGISTRY.restore(saved)


# --------------------------------------------------------------------------------------------------
# Layout: small modules, no cycles, no private names across modules, no TensorFlow on import
# --------------------------------------------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``graphslim.pipeline.*`` import of a module (module level or inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("graphslim.pipeline"):
                found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("graphslim.pipeline")]
    return found


def test_modules_are_small_and_import_each_other_without_cycles_or_private_names():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    assert {"registry", "options", "text", "config", "manager", "plugins"} <= set(modules)
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        assert len(path.read_text().splitlines()) <= 900, f"{path.name} is over 900 lines"
        edges[name] = set()
        for module, names in _imports(path):
            assert not module.startswith("."), f"{path.name}: relative import {module}"
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{path.name} imports private {private} from {module}"
            target = module.removeprefix("graphslim.pipeline").lstrip(".")
            if name != "__init__":
                assert target, f"{path.name} imports the package itself (use its modules)"
            if target:
                edges[name].add(target)
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import cycle: " + " -> ".join(path + (name,))
        if name not in done:
            for target in edges.get(name, ()):
                visit(target, path + (name,))
            done.add(name)

    for name in edges:
        visit(name, ())


def test_importing_the_pipeline_loads_no_tensorflow():
    code = "import sys, graphslim.pipeline; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_of_the_old_module_are_still_exported():
    for name in ("BUILTIN_PASS_PACKAGE", "ENTRY_POINT_GROUP", "OptionInfo", "PassInfo", "PassInstrument",
                 "PassManager", "PassResult", "PassSpec", "Pipeline", "PipelineReport", "get_pass",
                 "load_builtin_passes", "load_entry_point_plugins", "load_pipeline_config", "load_plugin",
                 "parse_pipeline", "parse_pipeline_config", "register_pass", "registered_passes",
                 "unregister_pass"):
        assert name in graphslim.pipeline.__all__ and hasattr(graphslim.pipeline, name), name


# --------------------------------------------------------------------------------------------------
# Registry object
# --------------------------------------------------------------------------------------------------


def _noop(graph, options):
    """Do nothing (test)."""
    return PassResult(False)


def test_a_registry_of_its_own():
    registry = Registry(builtin_package=None)
    assert registry.names() == [] and len(registry) == 0
    info = registry.register("test-b", _noop)
    registry.register("test-a", _noop, help="first")
    assert info.help == "Do nothing (test)."
    assert registry.names() == list(registry) == ["test-a", "test-b"]
    assert "test-a" in registry and "test-c" not in registry and len(registry) == 2
    assert registry.get("test-a").help == "first"
    assert list(registry.passes()) == ["test-a", "test-b"]
    with pytest.raises(PipelineError, match="unknown pass 'test-c'; .* Registered passes: test-a, test-b"):
        registry.get("test-c")
    assert registry.unregister("test-b") is info
    assert "test-a" not in REGISTRY  # the default registry is another one


def test_snapshot_and_restore_cover_passes_packages_and_plugins(tmp_path):
    saved = REGISTRY.snapshot()
    register_pass("test-snap")(_noop)
    REGISTRY.unregister("dce")
    plugin = tmp_path / "snap_passes.py"
    plugin.write_text("from graphslim.pipeline import PassResult, register_pass\n"
                      "register_pass('test-from-plugin')(lambda graph, options: PassResult(False))\n")
    load_plugin(plugin)
    assert load_builtin_passes("graphslim_no_such_package") == []
    assert "test-from-plugin" in REGISTRY and "dce" not in REGISTRY
    REGISTRY.restore(saved)
    assert "test-snap" not in REGISTRY and "test-from-plugin" not in REGISTRY and "dce" in REGISTRY
    assert REGISTRY.snapshot() == saved
    with pytest.raises(PipelineError) as err:
        REGISTRY.get("test-nope")
    assert "not importable" not in str(err.value)  # the missing package was forgotten too
    load_plugin(plugin)  # forgotten: loading it again registers again
    assert "test-from-plugin" in REGISTRY


def test_register_pass_uses_the_default_registry():
    register_pass("test-default")(_noop)
    assert REGISTRY.get("test-default").fn is _noop


# --------------------------------------------------------------------------------------------------
# Warnings
# --------------------------------------------------------------------------------------------------


class FakeGraph:
    """Stand-in graph with a text dump and nothing to roll back."""

    def __init__(self):
        self.log: list[str] = []

    def verify(self):
        pass

    def format(self):
        return "fake graph: " + " ".join(self.log)


@pytest.fixture
def warning_passes():
    @register_pass("test-warn")
    def warn(graph, options):
        graph.log.append("warn")
        return PassResult(True, {"n": 1}, warnings=["3 batch norms stay element-wise", "second"])

    @register_pass("test-quiet")
    def quiet(graph, options):
        graph.log.append("quiet")
        return PassResult(False)

    @register_pass("test-bad-warnings")
    def bad(graph, options):
        return PassResult(False, warnings="one string, not a list")


def test_warnings_are_collected_per_pass(warning_passes):
    report = PassManager("test-quiet,test-warn").run(FakeGraph())
    assert report.passes[0]["warnings"] == []
    assert report.passes[1]["warnings"] == ["3 batch norms stay element-wise", "second"]
    assert report.warnings == [("test-warn", "3 batch norms stay element-wise"), ("test-warn", "second")]
    assert report.to_dict()["passes"][1]["warnings"] == ["3 batch norms stay element-wise", "second"]


def test_warnings_that_are_not_a_list_of_strings_are_an_error(warning_passes):
    with pytest.raises(PipelineError) as err:
        PassManager("test-bad-warnings").run(FakeGraph())
    assert "returned a PassResult whose warnings is a str, not a list of strings," in str(err.value)


def test_pass_result_defaults():
    result = PassResult(True)
    assert (result.stats, result.warnings) == ({}, [])
    assert PassResult(False, {"a": 1}).stats == {"a": 1}  # positional stats still work


# --------------------------------------------------------------------------------------------------
# IR printing
# --------------------------------------------------------------------------------------------------


def test_print_ir_after_a_named_pass(warning_passes):
    out = io.StringIO()
    PassManager("test-quiet,test-warn,test-quiet", instruments=[PrintIRAfter("test-warn", file=out)]).run(FakeGraph())
    assert out.getvalue() == "// -----// IR Dump After test-warn (2nd of 3) //----- //\nfake graph: quiet warn\n"


def test_print_ir_after_every_pass_and_only_changed(warning_passes):
    out = io.StringIO()
    PassManager("test-quiet,test-warn", instruments=[PrintIRAfter(file=out)]).run(FakeGraph())
    assert out.getvalue().count("IR Dump After") == 2
    out = io.StringIO()
    PassManager("test-quiet,test-warn", instruments=[PrintIRAfter(file=out, only_changed=True)]).run(FakeGraph())
    assert out.getvalue().splitlines()[0] == "// -----// IR Dump After test-warn (2nd of 2) //----- //"


@dataclass(frozen=True)
class RatioOptions:
    ratio: float = 0.5


def test_print_ir_by_canonical_text_and_before():
    @register_pass("test-ratio", options=RatioOptions)
    def ratio(graph, opts):
        graph.log.append(f"ratio:{opts.ratio}")
        return PassResult(True)

    out = io.StringIO()
    instruments = [PrintIRAfter("test-ratio{ratio=0.75}", file=out), PrintIRBefore("test-ratio", file=out)]
    PassManager("test-ratio{ratio=0.25},test-ratio{ratio=0.75}", instruments=instruments).run(FakeGraph())
    assert out.getvalue().splitlines() == [
        "// -----// IR Dump Before test-ratio{ratio=0.25} (1st of 2) //----- //",
        "fake graph: ",
        "// -----// IR Dump Before test-ratio{ratio=0.75} (2nd of 2) //----- //",
        "fake graph: ratio:0.25",
        "// -----// IR Dump After test-ratio{ratio=0.75} (2nd of 2) //----- //",
        "fake graph: ratio:0.25 ratio:0.75",
    ]


def test_print_ir_names_a_pass_missing_from_the_pipeline(warning_passes):
    with pytest.raises(PipelineError, match=r"PrintIRAfter: no pass 'test-wran' .*did you mean 'test-warn'"):
        PassManager("test-quiet,test-warn", instruments=[PrintIRAfter("test-wran")]).run(FakeGraph())


def test_print_ir_after_a_failed_pass_shows_what_it_left(capsys):
    @register_pass("test-half")
    def half(graph, options):
        graph.log.append("half-done")
        raise PassError("gave up")

    with pytest.raises(PipelineError):
        PassManager("test-half", instruments=[PrintIRAfter("test-half")]).run(FakeGraph())
    assert capsys.readouterr().err == (
        "// -----// IR Dump After test-half (1st of 1) Failed //----- //\nfake graph: half-done\n"
    )


# --------------------------------------------------------------------------------------------------
# Rollback on the real IR
# --------------------------------------------------------------------------------------------------


def _conv_graph():
    import tensorflow as tf

    from graphslim.ir.graph import Graph, SignatureArg, Tensor

    g = Graph()
    g.add_node("x", "Placeholder", attrs={"dtype": tf.float32, "shape": (None, 8, 8, 3)})
    g.inputs.append(SignatureArg("x", Tensor("x", 0)))
    k = g.add_weight("conv/kernel", np.ones((3, 3, 3, 4), np.float32))
    b = g.add_weight("conv/bias", np.zeros((4,), np.float32))
    c = g.add_node("conv/Conv2D", "Conv2D", inputs=["x", k],
                   attrs={"T": tf.float32, "strides": [1, 1, 1, 1], "padding": "SAME"})
    ba = g.add_node("conv/BiasAdd", "BiasAdd", inputs=[c, b], attrs={"T": tf.float32})
    r = g.add_node("conv/Relu", "Relu", inputs=[ba], attrs={"T": tf.float32})
    g.outputs.append(SignatureArg("y", r.output(0)))
    g.assets["labels.txt"] = b"a\nb\n"
    g.infer_shapes()
    return g


def _state(g) -> dict:
    """Everything a pass may change, through the public Graph API."""
    return {
        "nodes": [
            (n.name, n.op, n.device, {k: v.SerializeToString() for k, v in n.attrs.items()},
             [d.name for d in n.dtypes], list(n.shapes), [str(t) for t in g.inputs_of(n)],
             g.control_inputs_of(n))
            for n in g.nodes()
        ],
        "weights": {k: (w.name, w.shape, w.trainable, id(w.value)) for k, w in g.weights.items()},
        "inputs": [(a.name, str(a.tensor)) for a in g.inputs],
        "outputs": [(a.name, str(a.tensor)) for a in g.outputs],
        "signature": g.signature_name,
        "assets": dict(g.assets),
        "functions": sorted(g.functions),
    }


@pytest.fixture
def vandal_passes():
    """Passes that change much of the graph and then fail in different ways."""

    def vandalize(graph):
        graph.set_weight("conv/kernel", np.zeros((3, 3, 3, 2), np.float32))
        graph.node("conv/Conv2D").set_attr("padding", "VALID")
        extra = graph.add_node("extra", "Relu", inputs=["conv/Relu"], attrs={"T": graph.node("conv/Relu").attr("T")})
        graph.set_output("y", extra.output(0))
        graph.outputs[0].name = "renamed"
        graph.signature_name = "other"
        graph.assets["labels.txt"] = b"changed\n"
        graph.weights["conv/bias"].trainable = False

    @register_pass("test-vandal-raises")
    def raises(graph, options):
        vandalize(graph)
        raise PassError("gave up half-way")

    @register_pass("test-vandal-unverified")
    def unverified(graph, options):
        vandalize(graph)  # the kernel now has 2 output channels, the bias 4: verification fails
        return PassResult(True)

    @register_pass("test-vandal-none")
    def returns_none(graph, options):
        vandalize(graph)

    @register_pass("test-vandal-interrupted")
    def interrupted(graph, options):
        vandalize(graph)
        raise KeyboardInterrupt

    @register_pass("test-valid-padding")
    def fine(graph, options):
        graph.node("conv/Conv2D").set_attr("padding", "VALID")
        graph.infer_shapes()
        return PassResult(True)


@pytest.mark.parametrize("name", ["test-vandal-raises", "test-vandal-unverified", "test-vandal-none"])
def test_a_failed_pass_leaves_the_graph_as_it_was(vandal_passes, name):
    g = _conv_graph()
    before = _state(g)
    with pytest.raises(PipelineError) as err:
        PassManager(f"test-valid-padding,{name}").run(g)
    assert f"pass '{name}' (2nd of 2)" in str(err.value)
    expected = _conv_graph()
    PassManager("test-valid-padding").run(expected)  # the first pass's change stays
    after = _state(g)
    assert after != before
    assert {k: v for k, v in after.items() if k != "weights"} == {
        k: v for k, v in _state(expected).items() if k != "weights"}
    assert after["weights"] == before["weights"]  # same Weight values (arrays shared, not copied)
    g.verify()  # usable: the same object, whole again
    PassManager("dce").run(g)


def test_an_interrupted_pass_is_rolled_back_and_the_interrupt_goes_through(vandal_passes):
    g = _conv_graph()
    before = _state(g)
    with pytest.raises(KeyboardInterrupt):
        PassManager("test-vandal-interrupted").run(g)
    assert _state(g) == before


def test_rollback_can_be_turned_off(vandal_passes):
    g = _conv_graph()
    with pytest.raises(PipelineError):
        PassManager("test-vandal-raises", rollback=False).run(g)
    assert "extra" in g and g.signature_name == "other"


def test_on_error_instruments_see_the_failed_graph_before_rollback(vandal_passes):
    out = io.StringIO()
    g = _conv_graph()
    with pytest.raises(PipelineError):
        PassManager("test-vandal-raises", instruments=[PrintIRAfter(file=out)]).run(g)
    assert "Failed" in out.getvalue() and "extra = Relu(conv/Relu)" in out.getvalue()
    assert "extra" not in g


def test_format_graph_is_one_readable_line_per_node():
    text = format_graph(_conv_graph())
    lines = text.splitlines()
    assert lines[0] == "graph serving_default (6 nodes, 2 weights) {"
    assert "  x = Placeholder() {dtype=float32, shape=[?,8,8,3]} -> float32[?,8,8,3]" in lines
    assert "  conv/kernel = Weight() -> float32[3,3,3,4]  // trainable" in lines
    assert ('  conv/Conv2D = Conv2D(x, conv/kernel) {T=float32, padding="SAME", strides=[1,1,1,1]} '
            "-> float32[?,8,8,4]") in lines
    assert lines[-2:] == ["  return {y: conv/Relu}", "}"]
