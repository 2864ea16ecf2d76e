"""subset benchmark (head surgery issue).

    python benchmarks/subset.py digits      # held-out accuracy on the kept classes, original vs subset
    python benchmarks/subset.py resnet50    # ResNet50 1000 -> 20 classes: params, MACs, latency ratio

Latency: both SavedModels loaded in one process, batch 1, 2 intra-op threads, interleaved runs,
medians; printed as a ratio (this machine is shared and noisy).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphslim  # noqa: E402
from graphslim.runtime import run  # noqa: E402
from graphslim.testing import digits, fixture_path  # noqa: E402


def digits_accuracy() -> None:
    d = digits()
    print(f"{'fixture':14s} {'kept classes':22s} {'n':>4s} {'original acc':>13s} {'subset acc':>11s}")
    for name in ("vgg_digits", "resnet_digits"):
        for keep in ([1, 3, 5, 7, 8], [0, 6], [2, 3, 5, 8, 9], list(range(10))[::-1]):
            mask = np.isin(d["y_test"], keep)
            x, y = d["x_test"][mask], d["y_test"][mask]
            g = graphslim.load(fixture_path(name))
            orig = run(g, {"image": x})["output_0"].argmax(-1)
            graphslim.run_pipeline(g, f"subset{{keep={','.join(map(str, keep))}}}")
            sub = np.array(keep)[run(g, {"image": x})["output_0"].argmax(-1)]
            print(f"{name:14s} {str(keep):22s} {len(y):4d} {(orig == y).mean():13.4f} {(sub == y).mean():11.4f}")


def latency_ratio(a: Path, b: Path, shape, runs: int = 30) -> tuple[float, float]:
    ma, mb = tf.saved_model.load(str(a)), tf.saved_model.load(str(b))
    fa, fb = ma.signatures["serving_default"], mb.signatures["serving_default"]
    (name, _), = fa.structured_input_signature[1].items()
    x = tf.constant(np.random.RandomState(0).rand(1, *shape).astype("float32"))
    for _ in range(5):
        fa(**{name: x}), fb(**{name: x})
    ta, tb = [], []
    for _ in range(runs):
        for f, acc in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            f(**{name: x})
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def resnet50() -> None:
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keras.utils.set_random_seed(0)
        keras.applications.ResNet50(weights=None).export(str(tmp / "orig"), verbose=False)
        g = graphslim.load(tmp / "orig")
        keep = list(range(0, 1000, 50))  # 20 classes
        c0 = g.cost()
        t = time.perf_counter()
        rep = graphslim.run_pipeline(g, f"subset{{keep={','.join(map(str, keep))}}}")
        pass_s = time.perf_counter() - t
        c1 = g.cost()
        graphslim.save(g, tmp / "sub")
        a, b = latency_ratio(tmp / "orig", tmp / "sub", (224, 224, 3))
        print("ResNet50 (weights=None), subset 1000 -> 20 classes")
        print(f"  params   {c0.params:>12,d} -> {c1.params:>12,d}   ({c1.params / c0.params:.4f}x)")
        print(f"  MACs     {c0.macs:>12,d} -> {c1.macs:>12,d}   ({c1.macs / c0.macs:.4f}x)")
        print(f"  pass time (incl. verify) {pass_s:.2f} s; removed nodes {rep.passes[0]['stats']['removed_nodes']}")
        print(f"  latency batch 1 (median of interleaved runs): {a * 1e3:.1f} ms -> {b * 1e3:.1f} ms, "
              f"speedup {a / b:.3f}x")


if __name__ == "__main__":
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    what = sys.argv[1] if len(sys.argv) > 1 else "digits"
    {"digits": digits_accuracy, "resnet50": resnet50}[what]()
