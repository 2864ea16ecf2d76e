"""Fuzz the loader and the pipeline parser (issue 6, item 3).

    python benchmarks/fuzz.py                      # every harness, 100,000+ executions in all, bounded
    python benchmarks/fuzz.py --harness mutate --runs 5000 --seconds 600
    python benchmarks/fuzz.py --engine random      # without atheris

Harnesses (each a function of one ``bytes``):

* ``raw``      the bytes as ``saved_model.pb`` of a directory with a valid ``variables/`` (vgg_digits);
* ``mutate``   1-4 structured mutations of a fixture's SavedModel proto (vgg_digits, tf1_model,
               tf_module): delete/duplicate/rename nodes, rewire inputs, change op types, attrs,
               shapes, dtypes, constants, signatures, function signatures and bodies, the object graph;
* ``frozen``   the same kinds of mutations of the frozen GraphDef fixture;
* ``pipeline`` text built from pipeline tokens and raw bytes, through ``parse_pipeline`` (and, when
               it parses, the round trip ``parse(str(p)) == p``) and ``parse_pipeline_config``.

A *failure* is any exception other than a GraphslimError (or a GraphslimError that only the loader's
last-resort net caught: ``unexpected``), a round-trip mismatch, a crash of the process, a timeout or an
out-of-memory. The engine is atheris (coverage-guided, graphslim's own modules instrumented) when it
is installed, else a seeded random driver. Each harness runs in a child process, one at a time (one
core); a child that dies is restarted for the remaining executions, its input saved. The summary
prints executions and failures per harness; failing inputs go to ``--out`` (default: a temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "models"

# Executions and time limit per harness for the default (long) run: 108,000 in all, at most ~37 minutes.
DEFAULT_PLAN = {"pipeline": (50_000, 300), "raw": (30_000, 600), "mutate": (20_000, 900),
                "frozen": (8_000, 400)}


class Bug(Exception):
    """A failure found by a harness (wraps the offending exception or describes the violation)."""


# ------------------------------------------------------------------------------------ fuzzed data
class Data:
    """Consumes a byte string as a stream of choices (like atheris' FuzzedDataProvider, but the same
    for both engines). Past the end, every choice is 0."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, n: int) -> int:
        """An int in [0, n)."""
        if n <= 1:
            return 0
        v = 0
        for _ in range((n.bit_length() + 7) // 8):
            v = (v << 8) | self.byte()
        return v % n

    def pick(self, seq):
        return seq[self.int(len(seq))] if seq else None

    def bytes(self, n: int) -> bytes:
        return bytes(self.byte() for _ in range(self.int(n + 1)))

    def weird_int(self) -> int:
        return self.pick([0, 1, -1, 2, 3, -5, 255, 2**31 - 1, 2**31, -2**31, 2**40, 2**62, 2**63 - 1,
                          -2**63, self.int(64), self.int(100000)])

    def text(self, n: int) -> str:
        return self.bytes(n).decode("utf-8", "replace")


# ------------------------------------------------------------------------------------ harnesses
class Harnesses:
    """Harness functions over a work directory (fixture copies are made once)."""

    def __init__(self, work: Path):
        self.work = work
        self.raw_dir = work / "raw"
        shutil.copytree(FIXTURES / "vgg_digits", self.raw_dir)
        from tensorflow.core.framework import graph_pb2
        from tensorflow.core.protobuf import saved_model_pb2

        self.models = {}
        for name in ("vgg_digits", "tf1_model", "tf_module"):
            d = work / name
            shutil.copytree(FIXTURES / name, d)
            sm = saved_model_pb2.SavedModel()
            sm.ParseFromString((d / "saved_model.pb").read_bytes())
            self.models[name] = (d, sm.SerializeToString())
        self.saved_model_cls = saved_model_pb2.SavedModel
        self.graph_def_cls = graph_pb2.GraphDef
        self.frozen = (FIXTURES / "frozen_vgg.pb").read_bytes()
        self.frozen_path = work / "frozen" / "model.pb"
        self.frozen_path.parent.mkdir()

    # -- loader
    def _load(self, path) -> None:
        from graphslim.errors import GraphslimError
        from graphslim.io.loader import load

        try:
            load(path)
        except GraphslimError as exc:
            if getattr(exc, "unexpected", False):
                raise Bug(f"safety net: {exc}") from exc.__cause__
            if "\n" in str(exc).strip():
                raise Bug(f"multi-line error: {exc!r}")

    def raw(self, data: bytes) -> None:
        (self.raw_dir / "saved_model.pb").write_bytes(data)
        self._load(self.raw_dir)

    def mutate(self, data: bytes) -> None:
        d = Data(data)
        name = d.pick(sorted(self.models))
        model, blob = self.models[name]
        sm = self.saved_model_cls()
        sm.ParseFromString(blob)
        for _ in range(1 + d.int(4)):
            mutate_meta(sm.meta_graphs[0], d)
        (model / "saved_model.pb").write_bytes(sm.SerializeToString())
        self._load(model)

    def frozen_graph(self, data: bytes) -> None:
        d = Data(data)
        gd = self.graph_def_cls()
        gd.ParseFromString(self.frozen)
        for _ in range(1 + d.int(4)):
            mutate_nodes(list(gd.node), gd.node, d, [])
        self.frozen_path.write_bytes(gd.SerializeToString())
        self._load(self.frozen_path)

    # -- pipeline
    def pipeline(self, data: bytes) -> None:
        from graphslim.errors import GraphslimError
        from graphslim.pipeline import parse_pipeline, parse_pipeline_config

        d = Data(data)
        text = pipeline_text(d)
        try:
            p = parse_pipeline(text)
        except GraphslimError:
            p = None
        if p is not None:
            again = parse_pipeline(str(p))
            if str(again) != str(p) or [s.options for s in again] != [s.options for s in p]:
                raise Bug(f"round trip: {text!r} -> {str(p)!r} -> {str(again)!r}")
            config = p.to_toml()
            back = parse_pipeline_config(config)
            if str(back) != str(p):
                raise Bug(f"TOML round trip: {str(p)!r} -> {str(back)!r}")
        try:
            parse_pipeline_config(text)
        except GraphslimError:
            pass


_TOKENS = ["dce", "fold-batchnorm", "truncate", "prune", "subset", "separable", "extend", "nosuch",
           "{", "}", ",", "=", " ", "  ", '"', "\\", "\\\"", "keep", "ratio", "output", "tensors", "0.5",
           "-1", "1e309", "nan", "none", "true", "false", "1,2,3", "", "\n", "\t", "\x00", "é", "[[pass]]",
           'name = "dce"', "pipeline = ", "#", "'", "{}", "keep=", "=,", "1" * 30]


def pipeline_text(d: Data) -> str:
    if d.int(4) == 0:
        return d.text(200)
    return "".join(d.pick(_TOKENS) if d.int(5) else d.text(4) for _ in range(d.int(24)))


# ------------------------------------------------------------------------------------ mutations
_OPS = ["Const", "Identity", "Placeholder", "Conv2D", "MatMul", "Relu", "Add", "AddV2", "Reshape",
        "StatefulPartitionedCall", "PartitionedCall", "ReadVariableOp", "VarHandleOp", "NoOp", "Unpack",
        "ConcatV2", "Split", "BiasAdd", "NoSuchOp", "If", "While", "IdentityN", "Pack", "Fill"]


def mutate_meta(meta, d: Data) -> None:
    lib = meta.graph_def.library.function
    which = d.int(10)
    if which < 3:
        mutate_nodes(list(meta.graph_def.node), meta.graph_def.node, d, [f.signature.name for f in lib])
    elif which < 6 and len(lib):
        f = lib[d.int(len(lib))]
        mutate_nodes(list(f.node_def), f.node_def, d, [x.signature.name for x in lib], function=f)
    elif which == 6:
        mutate_signature(meta, d)
    elif which == 7 and len(lib):
        mutate_function_signature(lib[d.int(len(lib))], d, lib)
    elif which == 8:
        mutate_object_graph(meta, d)
    else:
        mutate_misc(meta, d)


def mutate_nodes(nodes, container, d: Data, functions, function=None) -> None:
    if not nodes:
        return
    nd = nodes[d.int(len(nodes))]
    names = [n.name for n in nodes]
    kind = d.int(9)
    if kind == 0:
        container.remove(nd)
    elif kind == 1:
        container.add().CopyFrom(nd)
    elif kind == 2:
        nd.name = d.pick(names) if d.int(2) else d.text(12)
    elif kind == 3:
        if nd.input:
            i = d.int(len(nd.input))
            src = d.pick(names)
            port = d.weird_int() if d.int(3) == 0 else d.int(3)
            if function is not None and d.int(2):
                nd.input[i] = f"{src}:{d.pick(['output', 'y', 'z', 'activations', 'sum'])}:{port}"
            else:
                nd.input[i] = d.pick([f"{src}:{port}", f"^{src}", src, d.text(10)])
        else:
            nd.input.append(d.pick(names))
    elif kind == 4:
        nd.op = d.pick(_OPS + functions) if d.int(3) else d.pick(names)
    elif kind == 5 and nd.input:
        del nd.input[d.int(len(nd.input))]
    elif kind == 6 and nd.attr:
        del nd.attr[d.pick(sorted(nd.attr))]
    else:
        if nd.attr:
            mutate_attr(nd.attr[d.pick(sorted(nd.attr))], d, functions)
        else:
            mutate_attr(nd.attr[d.pick(["T", "dtype", "shape", "value", "f", "N", "num"])], d, functions)


def mutate_shape(shape, d: Data) -> None:
    k = d.int(4)
    if k == 0:
        shape.unknown_rank = not shape.unknown_rank
    elif k == 1 and shape.dim:
        shape.dim[d.int(len(shape.dim))].size = d.weird_int()
    elif k == 2:
        for _ in range(d.int(6) if d.int(8) else 300):
            shape.dim.add(size=d.weird_int() if d.int(2) else d.int(10))
    elif shape.dim:
        del shape.dim[d.int(len(shape.dim)):]


def mutate_tensor(t, d: Data) -> None:
    k = d.int(6)
    if k == 0:
        mutate_shape(t.tensor_shape, d)
    elif k == 1:
        t.dtype = d.pick([0, 1, 2, 3, 7, 9, 10, 20, 21, 101, 150, 999, d.int(40)])
    elif k == 2:
        t.tensor_content = t.tensor_content[: d.int(len(t.tensor_content) + 1)]
    elif k == 3:
        t.tensor_content = d.bytes(64)
    elif k == 4:
        del t.float_val[:]
        t.int_val.extend(d.weird_int() % 2**31 for _ in range(d.int(5)))
    else:
        t.string_val.append(d.bytes(16))


def mutate_attr(v, d: Data, functions) -> None:
    kind = v.WhichOneof("value")
    k = d.int(8)
    if kind == "tensor" and k < 5:
        mutate_tensor(v.tensor, d)
    elif kind == "shape" and k < 5:
        mutate_shape(v.shape, d)
    elif kind == "list" and k < 5:
        lst = v.list
        choice = d.int(5)
        if choice == 0:
            lst.i.extend(d.weird_int() for _ in range(d.int(4)))
        elif choice == 1:
            lst.type.extend(d.pick([0, 1, 3, 20, 999]) for _ in range(d.int(4)))
        elif choice == 2:
            mutate_shape(lst.shape.add(), d)
        elif choice == 3:
            lst.Clear()
        else:
            lst.func.add(name=d.pick(functions) or "nofn")
    elif kind == "func" and k < 5:
        v.func.name = d.pick(functions) if d.int(2) and functions else d.text(8)
    else:
        choice = d.int(6)
        if choice == 0:
            v.i = d.weird_int()
        elif choice == 1:
            v.type = d.pick([0, 1, 2, 3, 7, 20, 101, 999, d.int(50)])
        elif choice == 2:
            mutate_shape(v.shape, d)
        elif choice == 3:
            v.s = d.bytes(12)
        elif choice == 4:
            v.func.name = d.pick(functions) or "nofn"
        else:
            mutate_tensor(v.tensor, d)


def mutate_signature(meta, d: Data) -> None:
    sigs = sorted(meta.signature_def)
    if not sigs:
        return
    sig = meta.signature_def[d.pick(sigs)]
    table = sig.inputs if d.int(2) else sig.outputs
    keys = sorted(table)
    if not keys:
        return
    info = table[d.pick(keys)]
    k = d.int(5)
    names = [n.name for n in meta.graph_def.node]
    if k == 0:
        info.name = d.pick([f"{d.pick(names)}:{d.int(3)}", d.text(10), ""])
    elif k == 1:
        info.dtype = d.pick([0, 1, 2, 3, 7, 20, 999])
    elif k == 2:
        mutate_shape(info.tensor_shape, d)
    elif k == 3:
        del table[d.pick(keys)]
    else:
        info.coo_sparse.values_tensor_name = d.pick(names)


def mutate_function_signature(f, d: Data, lib) -> None:
    sig = f.signature
    k = d.int(6)
    if k == 0 and sig.input_arg:
        del sig.input_arg[d.int(len(sig.input_arg))]
    elif k == 1:
        sig.input_arg.add(name=d.pick([a.name for a in sig.input_arg]) or "x", type=1)
    elif k == 2 and sig.output_arg:
        out = sig.output_arg[d.int(len(sig.output_arg))]
        nodes = [n.name for n in f.node_def] or ["x"]
        f.ret[out.name] = d.pick([f"{d.pick(nodes)}:output:0", d.pick(nodes), d.text(8)])
    elif k == 3 and sig.output_arg:
        del sig.output_arg[d.int(len(sig.output_arg))]
    elif k == 4:
        sig.name = d.pick([x.signature.name for x in lib])
    else:
        for a in sig.output_arg:
            a.number_attr = d.pick(["", "N", "num"])


def mutate_object_graph(meta, d: Data) -> None:
    og = meta.object_graph_def
    if d.int(2) and og.concrete_functions:
        cf = og.concrete_functions[d.pick(sorted(og.concrete_functions))]
        if cf.bound_inputs:
            cf.bound_inputs[d.int(len(cf.bound_inputs))] = d.weird_int() % 2**31 * d.pick([1, -1])
        else:
            cf.bound_inputs.append(d.weird_int() % 2**31)
    elif len(og.nodes):
        node = og.nodes[d.int(len(og.nodes))]
        if node.children:
            node.children[d.int(len(node.children))].node_id = d.weird_int() % 2**31
        elif node.WhichOneof("kind") == "variable":
            mutate_shape(node.variable.shape, d)


def mutate_misc(meta, d: Data) -> None:
    k = d.int(5)
    lib = meta.graph_def.library.function
    if k == 0 and len(lib):
        del lib[d.int(len(lib))]
    elif k == 1:
        meta.saver_def.restore_op_name = d.pick([n.name for n in meta.graph_def.node] + [""])
    elif k == 2:
        del meta.meta_info_def.tags[:]
        meta.meta_info_def.tags.append(d.pick(["serve", "train", ""]))
    elif k == 3:
        meta.asset_file_def.add(filename=d.pick(["../x", "/etc/passwd", "labels.txt", ""]))
    else:
        meta.graph_def.node.add(name=d.text(6), op=d.pick(_OPS))


# ------------------------------------------------------------------------------------ running
def classify(harness, fn, data: bytes):
    """None, or a (key, description) of the failure ``fn(data)`` raised."""
    from graphslim.errors import GraphslimError

    try:
        fn(data)
        return None
    except KeyboardInterrupt:
        raise
    except Bug as exc:
        cause = exc.__cause__
        return _key(harness, cause or exc), f"{exc}" + (f"\n{_tb(cause)}" if cause else "")
    except GraphslimError:
        return None
    except BaseException as exc:  # noqa: BLE001 - the point of the harness
        return _key(harness, exc), f"{type(exc).__name__}: {exc}\n{_tb(exc)}"


def _tb(exc) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]


def _key(harness: str, exc: BaseException) -> str:
    where = "?"
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename
        if "graphslim" in f or "passes" in f:
            where = f"{Path(f).name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return f"{harness}:{type(exc).__name__}@{where}"


class Recorder:
    def __init__(self, harness: str, out: Path, stats_file: Path | None, flush_every: int = 250):
        self.harness, self.out, self.stats_file = harness, out, stats_file
        self.flush_every = flush_every
        self.runs, self.failures, self.kinds = 0, 0, {}
        self.start = time.time()

    def record(self, data: bytes, result) -> None:
        self.runs += 1
        if result is not None:
            key, text = result
            self.failures += 1
            if key not in self.kinds:
                self.kinds[key] = {"count": 0, "example": text[:4000]}
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / f"{key.replace('/', '_').replace(':', '_')}.bin").write_bytes(data)
            self.kinds[key]["count"] += 1
        if self.runs % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        if self.stats_file is not None:
            tmp = self.stats_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"harness": self.harness, "runs": self.runs, "failures": self.failures,
                                       "kinds": self.kinds, "seconds": time.time() - self.start}))
            os.replace(tmp, self.stats_file)


def harness_functions(work: Path) -> dict:
    h = Harnesses(work)
    return {"raw": h.raw, "mutate": h.mutate, "frozen": h.frozen_graph, "pipeline": h.pipeline}


def run_random(harness: str, runs: int, seconds: float, seed: int, out: Path, stats_file=None,
               work: Path | None = None) -> Recorder:
    """The seeded random engine, in this process: random byte strings, half of them mutations of
    earlier ones, through one harness."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="graphslim-fuzz-")) if own else work
    work.mkdir(parents=True, exist_ok=True)
    try:
        fn = harness_functions(work)[harness]
        rng = random.Random(seed)
        rec = Recorder(harness, out, stats_file)
        pool: list[bytes] = []
        seed_pb = (FIXTURES / "vgg_digits" / "saved_model.pb").read_bytes() if harness == "raw" else b""
        deadline = time.time() + seconds
        while rec.runs < runs and time.time() < deadline:
            if harness == "raw" and rng.random() < 0.7:
                data = bytearray(seed_pb)
                for _ in range(rng.randint(1, 16)):  # flips, truncation, splices of the real file
                    op = rng.random()
                    if op < 0.6 and data:
                        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                    elif op < 0.8:
                        data = data[: rng.randrange(len(data) + 1)]
                    elif data:
                        i = rng.randrange(len(data))
                        data[i:i] = rng.randbytes(rng.randint(1, 8))
                data = bytes(data)
            elif pool and rng.random() < 0.5:
                data = bytearray(rng.choice(pool))
                for _ in range(rng.randint(1, 4)):
                    if data:
                        data[rng.randrange(len(data))] = rng.randrange(256)
                data = bytes(data)
            else:
                data = rng.randbytes(rng.randint(0, 256))
            if len(pool) < 256:
                pool.append(data)
            rec.record(data, classify(harness, fn, data))
        rec.flush()
        return rec
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def run_atheris_child(harness: str, runs: int, seconds: float, out: Path, stats_file: Path) -> None:
    """This process runs one harness under atheris (libFuzzer) until ``runs`` or ``seconds``."""
    import atheris

    with atheris.instrument_imports(include=["graphslim"]):
        import graphslim.io.loader  # noqa: F401
        import graphslim.io.scan  # noqa: F401
        import graphslim.pipeline  # noqa: F401
        import graphslim.ir.tfconv  # noqa: F401
        import graphslim.ir.graph  # noqa: F401
    work = Path(tempfile.mkdtemp(prefix="graphslim-fuzz-"))
    fn = harness_functions(work)[harness]
    rec = Recorder(harness, out, stats_file, flush_every=25)  # libFuzzer may exit without Python's atexit
    corpus_dir = out / f"corpus-{harness}"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    if harness == "raw" and not any(corpus_dir.iterdir()):
        shutil.copy(FIXTURES / "vgg_digits" / "saved_model.pb", corpus_dir / "seed")

    def one(data: bytes) -> None:
        rec.record(data, classify(harness, fn, data))
        if rec.runs >= runs:
            rec.flush()
            os._exit(0)

    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-max_total_time={int(seconds)}", "-timeout=60",
                   "-rss_limit_mb=6144", f"-artifact_prefix={out}/", "-max_len=300000",
                   "-print_final_stats=0", str(corpus_dir)], one)
    try:
        atheris.Fuzz()
    finally:
        rec.flush()


def run_harness_in_children(harness: str, runs: int, seconds: float, engine: str, out: Path,
                            seed: int) -> dict:
    """Run a harness in child processes until ``runs`` or ``seconds``; a child that dies (a crash, a
    libFuzzer timeout or out-of-memory) counts as a failure and is replaced."""
    total = {"harness": harness, "runs": 0, "failures": 0, "kinds": {}, "children": 0}
    deadline = time.time() + seconds
    while total["runs"] < runs and time.time() < deadline - 5:
        stats_file = out / f"stats-{harness}-{total['children']}.json"
        left_runs, left_time = runs - total["runs"], deadline - time.time()
        cmd = [sys.executable, __file__, "--child", "--harness", harness, "--runs", str(left_runs),
               "--seconds", str(int(left_time)), "--engine", engine, "--out", str(out),
               "--stats", str(stats_file), "--seed", str(seed + total["children"])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left_time + 120)
            code, tail = proc.returncode, proc.stderr[-3000:]
        except subprocess.TimeoutExpired:
            code, tail = "timeout", "the child did not stop in time"
        total["children"] += 1
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"runs": 0, "failures": 0, "kinds": {}}
        total["runs"] += stats["runs"]
        total["failures"] += stats["failures"]
        for key, info in stats["kinds"].items():
            k = total["kinds"].setdefault(key, {"count": 0, "example": info["example"]})
            k["count"] += info["count"]
        if code != 0:  # died: a crash, a hang or an OOM of the whole process
            total["failures"] += 1
            key = f"{harness}:child-exit-{code}"
            k = total["kinds"].setdefault(key, {"count": 0, "example": tail})
            k["count"] += 1
            total["runs"] += 1  # the input that killed it
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", choices=["raw", "mutate", "frozen", "pipeline", "all"], default="all")
    ap.add_argument("--runs", type=int, default=None, help="executions (per harness)")
    ap.add_argument("--seconds", type=float, default=None, help="time limit (per harness)")
    ap.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    ap.add_argument("--out", type=Path, default=None, help="where failing inputs and stats go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stats", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    out = args.out or Path(tempfile.mkdtemp(prefix="graphslim-fuzz-out-"))
    out.mkdir(parents=True, exist_ok=True)

    if args.child:
        if engine == "atheris":
            run_atheris_child(args.harness, args.runs, args.seconds, out, args.stats)
        else:
            run_random(args.harness, args.runs, args.seconds, args.seed, out, args.stats)
        return

    harnesses = list(DEFAULT_PLAN) if args.harness == "all" else [args.harness]
    results = []
    start = time.time()
    for h in harnesses:
        runs = args.runs or DEFAULT_PLAN[h][0]
        seconds = args.seconds or DEFAULT_PLAN[h][1]
        print(f"{h}: up to {runs:,} executions / {seconds:.0f}s with {engine} ...", flush=True)
        r = run_harness_in_children(h, runs, seconds, engine, out, args.seed)
        results.append(r)
        print(f"{h}: {r['runs']:,} executions, {r['failures']} failures, {len(r['kinds'])} distinct "
              f"({r['children']} child process(es))", flush=True)
        for key, info in r["kinds"].items():
            print(f"    {key} x{info['count']}: {info['example'].splitlines()[0][:300] if info['example'] else ''}")
    print()
    print(f"{'harness':10} {'executions':>12} {'failures':>9} {'distinct':>9}")
    for r in results:
        print(f"{r['harness']:10} {r['runs']:>12,} {r['failures']:>9} {len(r['kinds']):>9}")
    print(f"{'total':10} {sum(r['runs'] for r in results):>12,} {sum(r['failures'] for r in results):>9}")
    print(f"engine {engine}, {time.time() - start:.0f}s, inputs and stats in {out}")
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    if any(r["failures"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
