"""Prune Keras ResNet50 (weights=None) with ``prune{ratio=0.5 round_to=8}``: pass time, MACs, latency.

Prints the pass's own time (the PassManager's timing of the pass, without load, verification and save;
target < 2 s), the MACs ratio, and the latency of the original and the pruned SavedModel run side by
side in the TensorFlow runtime (``tf.saved_model.load``, batch 1, 2 intra-op threads, 1 inter-op
thread): rounds interleave the models, the median per-call time of each is compared.
Target: speedup ≥ 0.75 × the MACs reduction (MACs before / after).

Two runtimes (``--runtimes graph,xla``), each with the same setting on both sides:

* ``graph``: TensorFlow's graph executor, what a SavedModel gets by default. Every element-wise op is
  a kernel of its own, whose time shrinks only linearly with the channels (conv MACs shrink
  quadratically), and Eigen's convolutions lose efficiency per MAC as they narrow;
* ``xla``: both models written by graphslim with ``jit_compile=True`` (the original through an empty
  pipeline, an exact round trip), so TensorFlow compiles each with XLA on its first call: the
  element-wise ops between convolutions fuse into one loop each.

And, by default, three bases (``--base "none;fuse-batchnorm;fold-batchnorm"``), each applied to BOTH
models before pruning:

* ``none``: the Keras export as is. Keras 3 writes each batch norm as element-wise ops;
* ``fuse-batchnorm``: those batch norms as ``FusedBatchNormV3`` over the same variables (nothing folded,
  the model stays fine-tunable), which TensorFlow's graph optimizer fuses into the convolutions;
* ``fold-batchnorm``: batch norms folded into the conv weights.

    .venv/bin/python benchmarks/prune_resnet50.py [--pipeline "prune{ratio=0.5 round_to=8}"] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(2)
tf.config.threading.set_inter_op_parallelism_threads(1)

import graphslim  # noqa: E402
from graphslim.pipeline import PassManager  # noqa: E402
from graphslim.runtime import run  # noqa: E402


def export_resnet50(path: Path, size: int) -> None:
    import keras

    keras.applications.ResNet50(weights=None, input_shape=(size, size, 3)).export(str(path), verbose=False)
    keras.backend.clear_session()


def latency(paths: dict, x: np.ndarray, rounds: int, calls: int) -> dict:
    fns = {}
    for k, p in paths.items():
        obj = tf.saved_model.load(str(p))
        fn = obj.signatures["serving_default"]
        name = list(fn.structured_input_signature[1])[0]
        fns[k] = (obj, fn, name)
    xt = tf.constant(x)
    for k, (_, fn, name) in fns.items():  # warm up
        for _ in range(3):
            fn(**{name: xt})
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, (_, fn, name) in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                out = fn(**{name: xt})
            next(iter(out.values())).numpy()
            times[k].append((time.perf_counter() - t) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def run_one(orig: Path, work: Path, base: str, args) -> None:
    t = time.perf_counter()
    g = graphslim.load(orig)
    load_s = time.perf_counter() - t
    tag = base.replace("{", "_").replace("}", "").replace(" ", "_")
    if base != "none":
        PassManager(base).run(g)
    macs0, params0 = g.cost().macs, g.cost().params
    refs = {}
    for rt in args.runtimes:
        if base == "none" and rt == "graph":
            refs[rt] = orig  # the Keras export itself
        else:
            refs[rt] = work / f"ref_{tag}_{rt}"
            graphslim.save(g, refs[rt], force=True, jit_compile=(rt == "xla"))
    report = PassManager(args.pipeline).run(g)
    passes = report.passes
    outs, save_s = {}, 0.0
    for rt in args.runtimes:
        t = time.perf_counter()
        outs[rt] = work / f"pruned_{tag}_{rt}"
        graphslim.save(g, outs[rt], force=True, jit_compile=(rt == "xla"))
        save_s = save_s or time.perf_counter() - t
    macs1, params1 = g.cost().macs, g.cost().params
    x = np.random.RandomState(0).rand(1, args.size, args.size, 3).astype("float32")
    models = {}
    for rt in args.runtimes:
        models[("original", rt)] = refs[rt]
        models[("pruned", rt)] = outs[rt]
    lat = latency(models, x, args.rounds, args.calls)
    # outputs of the emitted models are what the IR computes
    ref = run(g, {g.inputs[0].name: x})
    errs = {}
    for rt in args.runtimes:
        got = tf.saved_model.load(str(outs[rt])).signatures["serving_default"](**{g.inputs[0].name: tf.constant(x)})
        errs[rt] = max(float(np.max(np.abs(got[k].numpy() - ref[k]))) for k in ref)
    reduction = macs0 / macs1
    print(f"\n## ResNet50 {args.size}x{args.size}: original{' + ' + base if base != 'none' else ''} vs + {report.pipeline}")
    print("| measure | value |\n|---|---|")
    for p in passes:
        print(f"| pass {p['text']} own time | {p['seconds']:.2f} s (verify {p['verify_seconds']:.2f} s) |")
        st = p["stats"]
        if "seconds" in st:
            print(f"| ... breakdown | " + ", ".join(f"{k} {v:.2f} s" for k, v in st["seconds"].items()) + " |")
        if "pruned_groups" in st:
            print(f"| groups pruned / not prunable | {st['pruned_groups']} / {len(st['not_prunable'])} "
                  f"({'; '.join(n['reason'] for n in st['not_prunable'])}) |")
    print(f"| load / save | {load_s:.2f} s / {save_s:.2f} s |")
    print(f"| MACs | {macs0:,} → {macs1:,} (ratio {macs1 / macs0:.3f}, {reduction:.2f}x fewer) |")
    print(f"| params | {params0:,} → {params1:,} (ratio {params1 / params0:.3f}) |")
    for rt in args.runtimes:
        o, pr = lat[("original", rt)], lat[("pruned", rt)]
        speedup = o / pr
        print(f"| {RUNTIMES[rt]}: latency, batch 1, 2 threads (median of {args.rounds} interleaved rounds) "
              f"| original {1e3 * o:.1f} ms, pruned {1e3 * pr:.1f} ms |")
        print(f"| {RUNTIMES[rt]}: speedup | {speedup:.2f}x = {speedup / reduction:.2f} x the MACs reduction "
              f"(target >= 0.75: {'met' if speedup / reduction >= 0.75 else 'NOT met'}) |")
        print(f"| {RUNTIMES[rt]}: emitted SavedModel vs IR, max abs diff | {errs[rt]:.2e} |")


RUNTIMES = {"graph": "graph executor", "xla": "XLA (both emitted with jit_compile=True)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="prune{ratio=0.5 round_to=8}")
    ap.add_argument("--base", default="none;fuse-batchnorm;fold-batchnorm",
                    help="';'-separated pipelines applied to BOTH models first, one comparison each "
                         "(none: the Keras export as is)")
    ap.add_argument("--runtimes", default="graph,xla",
                    help="comma-separated: graph (TensorFlow's graph executor, the default runtime) and/or "
                         "xla (both models written with jit_compile=True, so TensorFlow compiles them "
                         "with XLA)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="keep the exported models here (reused if present)")
    args = ap.parse_args(argv)
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = [r for r in args.runtimes if r not in RUNTIMES]
    if unknown:
        ap.error(f"--runtimes: unknown {unknown}; choose from {sorted(RUNTIMES)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prune_resnet50_"))
    work.mkdir(parents=True, exist_ok=True)
    orig = work / f"resnet50_{args.size}"
    if not (orig / "saved_model.pb").exists():
        t = time.perf_counter()
        export_resnet50(orig, args.size)
        print(f"exported Keras ResNet50 (weights=None, {args.size}x{args.size}) in {time.perf_counter() - t:.1f} s")
    for base in [b.strip() for b in args.base.split(";") if b.strip()]:
        run_one(orig, work, base, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
