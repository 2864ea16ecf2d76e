"""Round-trip benchmark and zoo check (issue: foundation).

    python benchmarks/roundtrip.py speed [--runs 5]   # graphslim load+save vs tf.saved_model.load+save, ResNet50
    python benchmarks/roundtrip.py zoo                # exactness on Keras Applications (weights=None)

Timings are medians of interleaved runs on the same model in the same process, printed as ratios:
this machine is shared and noisy, so absolute seconds mean little.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphslim  # noqa: E402

ZOO = {
    "MobileNetV2": (224, 224, 3),
    "ResNet50": (224, 224, 3),
    "EfficientNetB0": (224, 224, 3),
    "DenseNet121": (224, 224, 3),
    "InceptionV3": (299, 299, 3),
}


def export(arch: str, where: Path) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None, input_shape=ZOO.get(arch, (224, 224, 3)))
    path = where / arch
    model.export(str(path), verbose=False)
    return path


def graphslim_roundtrip(src: Path, dst: Path, pipeline: str = "") -> None:
    g = graphslim.load(src)
    graphslim.run_pipeline(g, pipeline)
    graphslim.save(g, dst, force=True)


def tf_roundtrip(src: Path, dst: Path) -> None:
    obj = tf.saved_model.load(str(src))
    tf.saved_model.save(obj, str(dst))


def speed(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = export("ResNet50", tmp)
        ours_model = tmp / "ours_model"
        graphslim_roundtrip(src, ours_model)  # warm-up; also gives a model with one copy of each variable
        rows = {"graphslim (Keras export)": [], "tf (Keras export)": [],
                "graphslim (graphslim-written model)": [], "tf (graphslim-written model)": []}
        for i in range(runs):
            for label, fn in (("graphslim (Keras export)", lambda: graphslim_roundtrip(src, tmp / "a")),
                              ("tf (Keras export)", lambda: tf_roundtrip(src, tmp / f"b{i}")),
                              ("graphslim (graphslim-written model)", lambda: graphslim_roundtrip(ours_model, tmp / "c")),
                              ("tf (graphslim-written model)", lambda: tf_roundtrip(ours_model, tmp / f"d{i}"))):
                t = time.perf_counter()
                fn()
                rows[label].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"ResNet50 (weights=None) round trip, median of {runs} interleaved runs")
        for k, v in med.items():
            print(f"  {k:40s} {v:6.2f} s")
        r1 = med["graphslim (Keras export)"] / med["tf (Keras export)"]
        r2 = med["graphslim (graphslim-written model)"] / med["tf (graphslim-written model)"]
        print(f"ratio graphslim / tf on the Keras export:          {r1:.2f}x  (target <= 1.2x)")
        print(f"ratio graphslim / tf on a model with one copy of each variable: {r2:.2f}x  (target <= 1.2x)")


def zoo(archs) -> int:
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{'architecture':16s} {'pipeline':22s} {'nodes':>6s} {'params':>10s} {'max abs err':>12s}  result")
        for arch in archs:
            src = export(arch, tmp)
            obj = tf.saved_model.load(str(src))
            fn = obj.signatures["serving_default"]
            (name, spec), = fn.structured_input_signature[1].items()
            x = np.random.RandomState(0).rand(2, *spec.shape[1:]).astype("float32")
            ref = {k: v.numpy() for k, v in fn(**{name: tf.constant(x)}).items()}
            for pipeline in ("", "dce", "fold-batchnorm,dce", "fuse-batchnorm"):
                dst = tmp / f"{arch}_out"
                g = graphslim.load(src)
                graphslim.run_pipeline(g, pipeline)
                graphslim.save(g, dst, force=True)
                got_obj = tf.saved_model.load(str(dst))
                got = {k: v.numpy() for k, v in got_obj.signatures["serving_default"](**{name: tf.constant(x)}).items()}
                err = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
                ok = all(np.allclose(got[k], ref[k], rtol=1e-5, atol=1e-5) for k in ref)
                failures += not ok
                print(f"{arch:16s} {pipeline or '(empty)':22s} {len(g):6d} {g.cost().params:10d} {err:12.3g}  "
                      f"{'ok' if ok else 'FAIL'}")
                sys.stdout.flush()
            shutil.rmtree(src)
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--runs", type=int, default=5)
    z = sub.add_parser("zoo")
    z.add_argument("archs", nargs="*", default=list(ZOO))
    args = ap.parse_args()
    if args.cmd == "speed":
        speed(args.runs)
        return 0
    return 1 if zoo(args.archs) else 0


if __name__ == "__main__":
    sys.exit(main())
