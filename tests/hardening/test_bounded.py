"""Bounded parsing (issue 13, item 4): walks over a model's object graph are linear, constant
evaluation and folding never allocate past a memory budget, assets are size-limited, and output
paths inside or equal to an input model are refused before anything is written.

Each hostile model is built here by protobuf surgery on a copy of a fixture; the expensive ones run
in a subprocess whose time and peak memory are measured (``ru_maxrss``) or bounded (``RLIMIT_AS``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_clean_cli_error, clean_env, limits, run_cli

import corpus


# ------------------------------------------------------------------------------------ object graph
def cyclic_object_graph(dst: Path, objects: int = 60_000) -> Path:
    """vgg_digits with two long cycles of ``objects // 2`` objects each (lengths coprime): one in the
    SavedModel's object graph, one in the checkpoint's object graph, both reached from the root as
    ``loop`` and linked by ``next``. A walk that pairs the two graphs' nodes without visiting each
    object once goes round both cycles together: lcm(a, b) ≈ objects² / 4 pairs."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    model = corpus.copy_fixture(corpus.VGG, dst)
    half = objects // 2
    a, b = half + 1, half - 1  # both odd when half is even: coprime (they differ by 2)
    sm = corpus.read_saved_model(model)
    og = sm.meta_graphs[0].object_graph_def
    _add_cycle(og.nodes, a, _user_object)
    corpus.write_saved_model(model, sm)
    values = corpus.checkpoint_values(model)
    raw = values["_CHECKPOINTABLE_OBJECT_GRAPH"]
    tog = trackable_object_graph_pb2.TrackableObjectGraph()
    tog.ParseFromString(raw.item() if hasattr(raw, "item") else raw)
    _add_cycle(tog.nodes, b, lambda node: None)
    values["_CHECKPOINTABLE_OBJECT_GRAPH"] = np.array(tog.SerializeToString(), dtype=object)
    corpus.rewrite_checkpoint(model, values)
    return model


def _user_object(node) -> None:
    node.user_object.identifier = "_generic_user_object"


def _add_cycle(nodes, length: int, init) -> None:
    first = len(nodes)
    nodes[0].children.add(local_name="loop", node_id=first)
    for i in range(length):
        node = nodes.add()
        init(node)
        node.children.add(local_name="next", node_id=first + (i + 1) % length)


_MEASURE = textwrap.dedent("""
    import resource, sys, time
    import tensorflow  # imported first: its ~2 s import and ~600 MB are not the walk's
    import graphslim
    from graphslim.errors import LoadError
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # TensorFlow and graphslim imported
    start = time.perf_counter()
    try:
        graphslim.load(sys.argv[1])
        outcome = "loaded"
    except LoadError as exc:
        outcome = "refused: " + str(exc)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"{seconds:.3f} {peak_kib / 1024:.0f} {(peak_kib - base_kib) / 1024:.0f} {outcome}")
""")


def measure_load(model: Path, timeout: float = 120) -> tuple[float, float, float, str]:
    """(seconds spent in load(), peak RSS in MB of the child process (TensorFlow included), what the
    load added to the peak after TensorFlow's import, outcome)
    of loading ``model`` in a fresh interpreter (``RUSAGE_SELF`` read by the child itself: pytest's
    ``RUSAGE_CHILDREN`` would be the largest of all the children it ever ran)."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(model)], capture_output=True, text=True,
                          env=clean_env(), cwd=ROOT, timeout=timeout, preexec_fn=limits(None))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds, peak_mb, added_mb, outcome = proc.stdout.strip().splitlines()[-1].split(" ", 3)
    return float(seconds), float(peak_mb), float(added_mb), outcome


def test_cyclic_object_graph_walk_is_linear(tmp_path):
    model = cyclic_object_graph(tmp_path)
    seconds, peak_mb, added_mb, outcome = measure_load(model)
    print(f"60k-object cyclic object graph: {seconds:.2f} s in load(), peak RSS {peak_mb:.0f} MB "
          f"({added_mb:.0f} MB over TensorFlow's import), {outcome}")
    assert seconds < 20, outcome
    # TensorFlow's own footprint after import varies with the machine's load (thread arenas): the
    # bound is on what loading the model adds
    assert added_mb < 1024, outcome
    assert outcome == "loaded" or outcome.startswith("refused: "), outcome


def test_object_graph_match_visits_each_object_once():
    """Shared children (Keras' ``variables/0`` and ``_all_variables/0``), a cycle and out-of-range
    ids: every variable found once, by its shortest path, nothing indexed out of range."""
    from tensorflow.core.protobuf import saved_object_graph_pb2, trackable_object_graph_pb2

    from graphslim.io.variables import match_object_graphs

    og = saved_object_graph_pb2.SavedObjectGraph()
    tog = trackable_object_graph_pb2.TrackableObjectGraph()
    for graph in (og, tog):
        root, a, b, var = (graph.nodes.add() for _ in range(4))
        root.children.add(local_name="variables", node_id=1)
        root.children.add(local_name="_all", node_id=2)
        a.children.add(local_name="0", node_id=3)
        b.children.add(local_name="0", node_id=3)
        var.children.add(local_name="up", node_id=0)  # a cycle back to the root
        var.children.add(local_name="bad", node_id=-1)
        var.children.add(local_name="far", node_id=10**6)
    key = "variables/0/.ATTRIBUTES/VARIABLE_VALUE"
    tog.nodes[3].attributes.add(name="VARIABLE_VALUE", checkpoint_key=key, full_name="dense/kernel")
    assert match_object_graphs(og, tog) == {3: (key, "dense/kernel")}
    del tog.nodes[:]
    assert match_object_graphs(og, tog) == {}


# ------------------------------------------------------------------------------------ constants
BIG_A, BIG_B = (2048, 1, 1024), (1, 2048, 1024)  # 8 MiB of float32 each; their product: 16 GiB


def broadcast_bomb(dst: Path) -> Path:
    """vgg_digits whose last Dense output is scaled per class by a constant that is valid and small
    ([10]) but computed from a 16 GiB broadcast (32 GiB in float64):
    ``StridedSlice(Prod(Mul(a, b), axes=[0, 1]), 0:10)`` with splat constants ``a`` [2048, 1, 1024]
    and ``b`` [1, 2048, 1024] (8 MiB each once decoded, a few bytes in the file). fold-batchnorm
    evaluates that constant to fold the Mul into the Dense kernel."""
    import tensorflow as tf

    def edit(meta):
        body = corpus.serving_body(meta)
        f32, i32 = tf.float32.as_datatype_enum, tf.int32.as_datatype_enum

        def const(name, value, dtype, shape):
            proto = tf.make_tensor_proto(value, dtype=dtype, shape=shape)
            return corpus.node_def(name, "Const", dtype=corpus.attr(type=proto.dtype),
                                   value=corpus.attr(tensor=proto))

        bias = next(n for n in body.node_def if n.op == "BiasAdd" and n.name.endswith("dense_1_2/BiasAdd"))
        softmax = next(n for n in body.node_def if n.op == "Softmax")
        body.node_def.extend([
            const("bomb/a", 1.0, tf.float32, BIG_A),
            const("bomb/b", 1.0, tf.float32, BIG_B),
            corpus.node_def("bomb/ab", "Mul", ["bomb/a:output:0", "bomb/b:output:0"],
                            T=corpus.attr(type=f32)),
            const("bomb/axes", [0, 1], tf.int32, [2]),
            corpus.node_def("bomb/prod", "Prod", ["bomb/ab:z:0", "bomb/axes:output:0"],
                            T=corpus.attr(type=f32), Tidx=corpus.attr(type=i32),
                            keep_dims=corpus.attr(b=False)),
            const("bomb/begin", [0], tf.int32, [1]),
            const("bomb/end", [10], tf.int32, [1]),
            const("bomb/step", [1], tf.int32, [1]),
            corpus.node_def("bomb/scale", "StridedSlice", ["bomb/prod:output:0", "bomb/begin:output:0",
                                                           "bomb/end:output:0", "bomb/step:output:0"],
                            T=corpus.attr(type=f32), Index=corpus.attr(type=i32)),
            corpus.node_def("bomb/scaled", "Mul", [f"{bias.name}:output:0", "bomb/scale:output:0"],
                            T=corpus.attr(type=f32)),
        ])
        softmax.input[0] = "bomb/scaled:z:0"

    return corpus.edit(corpus.VGG, edit)(dst)


def test_constant_evaluation_refuses_the_broadcast_before_allocating(tmp_path):
    from graphslim.analysis.constants import ConstantBudgetError, constant_value
    from graphslim.io.loader import load

    g = load(broadcast_bomb(tmp_path))
    scale = next(n for n in g.nodes() if n.name.endswith("bomb/scale"))
    assert constant_value(g, scale.output(0)) is None  # analysis: unknown, nothing allocated
    with pytest.raises(ConstantBudgetError) as info:
        constant_value(g, scale.output(0), strict=True)
    err = info.value
    assert err.node.endswith("bomb/ab") and err.shape == (2048, 2048, 1024) and err.nbytes == 2**35
    for fragment in ("bomb/ab", "(Mul)", "[2048, 2048, 1024]", "32.0 GiB", "1.0 GiB budget"):
        assert fragment in str(err), str(err)


def _const_graph():
    import tensorflow as tf

    from graphslim.ir.graph import Graph

    g = Graph()

    def const(name, value):
        value = np.asarray(value, np.float32)
        return g.add_node(name, "Const", attrs={"dtype": tf.float32, "value": value}).output(0)

    def op(name, kind, *inputs):
        return g.add_node(name, kind, inputs=list(inputs), attrs={"T": tf.float32}).output(0)

    return g, const, op


def test_constant_budget_counts_each_array_and_shared_subexpressions_once():
    from graphslim.analysis.constants import ConstantBudgetError, constant_value

    g, const, op = _const_graph()
    ab = op("ab", "Mul", const("a", np.ones((64, 1, 16))), const("b", np.full((1, 64, 16), 2.0)))
    g.infer_shapes()
    np.testing.assert_array_equal(constant_value(g, ab), np.full((64, 64, 16), 2.0, np.float32))
    # operands' float64 copies (8 KiB each) + the float64 product (512 KiB) + its float32 cast (256 KiB)
    assert constant_value(g, ab, budget=800 * 2**10) is not None
    assert constant_value(g, ab, budget=512 * 2**10) is None
    with pytest.raises(ConstantBudgetError, match=r"'ab' \(Mul\) .* shape \[64, 64, 16\]"):
        constant_value(g, ab, budget=512 * 2**10, strict=True)
    # Add(x, x) nested 60 deep: 2**60 evaluations without sharing; one each with it
    x = const("x", [1.0])
    for i in range(60):
        x = op(f"double_{i}", "AddV2", x, x)
    g.infer_shapes()
    assert constant_value(g, x)[0] == 2.0**60


def test_fold_batchnorm_leaves_an_over_budget_constant_unfolded(tmp_path):
    """The CLI under a 6 GiB address-space limit: finishes (the 32 GiB float64 broadcast is never
    allocated), the Mul stays, the report says why."""
    model = broadcast_bomb(tmp_path / "in")
    out, report = tmp_path / "out", tmp_path / "report.json"
    result = run_cli("optimize", model, "-o", out, "--passes", "fold-batchnorm", "--report", report,
                     timeout=300)
    assert result.returncode == 0, (result.stdout, result.stderr)
    stats = json.loads(report.read_text())["passes"][0]["stats"]
    refused = stats["over_budget"]
    assert [r["node"].rsplit("/", 2)[-2:] for r in refused] == [["bomb", "ab"]], refused
    assert refused[0]["shape"] == [2048, 2048, 1024] and "max_eval_mb" in refused[0]["reason"]
    assert (out / "saved_model.pb").is_file()


# ------------------------------------------------------------------------------------ assets
def _with_sparse_assets(dst: Path, sizes: dict) -> Path:
    """vgg_digits with sparse asset files (``name -> size``): no disk used, nothing to read fast."""
    model = corpus.copy_fixture(corpus.VGG, dst)
    for name, size in sizes.items():
        with open(model / "assets" / name, "wb") as f:
            f.truncate(size)
    return model


def test_a_sparse_1_gib_asset_is_refused_before_reading(tmp_path):
    import resource
    import time

    from graphslim.errors import LoadError
    from graphslim.io.loader import load

    model = _with_sparse_assets(tmp_path, {"huge.bin": 1 << 30})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(LoadError) as info:
        load(model)
    assert time.perf_counter() - start < 30
    message = str(info.value)
    for fragment in ("huge.bin", "1,024.0 MiB", "1,073,741,824 bytes", "64.0 MiB", "--max-asset-mb",
                     "max_asset_mb="):
        assert fragment in message, message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 256 * 1024  # KiB: never read


def test_assets_total_limit_and_raising_the_limit(tmp_path):
    from graphslim.errors import LoadError
    from graphslim.io.loader import load

    model = _with_sparse_assets(tmp_path, {f"part{i}.bin": 3 << 20 for i in range(5)})  # 15 MiB
    with pytest.raises(LoadError, match="per asset file") as info:
        load(model, max_asset_mb=2)
    assert "part0.bin" in str(info.value) and "3.0 MiB" in str(info.value)
    with pytest.raises(LoadError, match="together") as info:
        load(model, max_asset_mb=3)  # each file fits, all of them (15 MiB) not in 4 x 3 MiB
    for fragment in ("6 asset files", "12.0 MiB", "--max-asset-mb"):
        assert fragment in str(info.value), str(info.value)
    g = load(model, max_asset_mb=4)
    assert len(g.assets["part4.bin"]) == 3 << 20 and g.meta["max_asset_mb"] == 4


def test_emitter_refuses_an_asset_over_the_limit(tmp_path):
    from graphslim.errors import EmitError
    from graphslim.io.emitter import save
    from graphslim.io.loader import load

    g = load(corpus.copy_fixture(corpus.VGG, tmp_path / "in"), max_asset_mb=1)
    g.assets["big.bin"] = bytes(2 << 20)  # as a pass or plugin might make one
    out = tmp_path / "out"
    with pytest.raises(EmitError, match=r"'big.bin' holds 2,097,152 bytes.*--max-asset-mb"):
        save(g, out)
    assert not out.exists()


def test_cli_max_asset_mb(tmp_path):
    model = _with_sparse_assets(tmp_path, {"big.bin": 70 << 20})
    result = run_cli("inspect", model)
    assert_clean_cli_error(result, "big.bin", "70.0 MiB", "--max-asset-mb")
    result = run_cli("inspect", "--max-asset-mb", "80", model)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------ output paths
def _tree(path: Path) -> dict:
    """path → (size, mtime_ns) of every file under ``path`` (or of ``path`` itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@pytest.mark.parametrize("where", ["saved_model.pb", "variables/variables.index", "assets/new.json",
                                   "model_dir", "frozen_file", "config", "plugin", "output_dir"])
def test_report_inside_or_equal_to_an_input_is_refused(tmp_path, where):
    if where == "frozen_file":
        model = corpus.copy_fixture(corpus.FROZEN, tmp_path / "in")
    else:
        model = corpus.copy_fixture(corpus.VGG, tmp_path / "in")
    config = tmp_path / "pipeline.toml"
    config.write_text('pipeline = "dce"\n')
    plugin = tmp_path / "plugin.py"
    plugin.write_text("")
    out = tmp_path / "out"
    report = {"model_dir": model, "frozen_file": model, "config": config, "plugin": plugin,
              "output_dir": out}.get(where) or model / where
    extra = ["--config", config] if where == "config" else ["--passes", "dce"]
    extra += ["--plugin", plugin] if where == "plugin" else []
    before = {**_tree(model), **_tree(config), **_tree(plugin)}
    result = run_cli("optimize", model, "-o", out, *extra, "--report", report, timeout=120)
    assert_clean_cli_error(result, "--report", str(report))
    assert {**_tree(model), **_tree(config), **_tree(plugin)} == before
    assert not out.exists()


@pytest.mark.parametrize("where", ["inside", "config"])
def test_output_inside_or_onto_an_input_is_refused(tmp_path, where):
    model = corpus.copy_fixture(corpus.VGG, tmp_path / "in")
    config = tmp_path / "pipeline.toml"
    config.write_text('pipeline = "dce"\n')
    out = model / "variables" / "out" if where == "inside" else config
    before = {**_tree(model), **_tree(config)}
    result = run_cli("optimize", model, "-o", out, "--config", config, "--force", timeout=120)
    assert_clean_cli_error(result, "-o", str(out))
    assert {**_tree(model), **_tree(config)} == before


def test_report_inside_the_output_is_written(tmp_path):
    model = corpus.copy_fixture(corpus.VGG, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()  # replaced (--force), then the report is written into the new one
    result = run_cli("optimize", model, "-o", out, "--force", "--passes", "dce", "--report",
                     out / "report.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "report.json").read_text())["pipeline"] == "dce"
