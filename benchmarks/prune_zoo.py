"""``prune{ratio=0.3}`` on Keras Applications (weights=None): valid, loadable, runnable SavedModels.

For MobileNetV2, ResNet50, DenseNet121, EfficientNetB0 and InceptionV3: export, load with graphslim,
run ``prune{ratio=0.3}`` (verified by the PassManager), save, load the result with
``tf.saved_model.load``, run it on a batch of 2 and check that every output has the original's shape and
matches what the pruned IR computes; print MACs and params before/after, pass time, groups pruned and
the groups that are not prunable with their reasons.

    .venv/bin/python benchmarks/prune_zoo.py [--models MobileNetV2,ResNet50] [--pipeline "prune{ratio=0.3}"]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import graphslim  # noqa: E402
from graphslim.pipeline import PassManager  # noqa: E402
from graphslim.runtime import run  # noqa: E402

MODELS = {"MobileNetV2": 224, "ResNet50": 224, "DenseNet121": 224, "EfficientNetB0": 224, "InceptionV3": 299}


def export(name: str, size: int, path: Path) -> None:
    import keras

    getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3)).export(str(path), verbose=False)
    keras.backend.clear_session()


def check(name: str, size: int, work: Path, pipeline: str) -> dict:
    src = work / f"{name}_{size}"
    if not (src / "saved_model.pb").exists():
        export(name, size, src)
    g = graphslim.load(src)
    macs0, params0 = g.cost().macs, g.cost().params
    x = {g.inputs[0].name: np.random.RandomState(0).rand(2, size, size, 3).astype("float32")}
    shapes0 = {k: v.shape for k, v in run(g, x).items()}
    report = PassManager(pipeline).run(g)
    rec = report.passes[-1]
    st = rec["stats"]
    out = work / f"{name}_pruned"
    graphslim.save(g, out, force=True)
    loaded = tf.saved_model.load(str(out))
    got = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in x.items()})
    got = {k: v.numpy() for k, v in got.items()}
    ref = run(g, x)
    shapes_ok = {k: v.shape for k, v in got.items()} == shapes0
    err = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
    return {"model": f"{name} {size}", "pass_s": rec["seconds"], "verify_s": rec["verify_seconds"],
            "macs": (macs0, g.cost().macs), "params": (params0, g.cost().params),
            "groups": st.get("pruned_groups"), "not_prunable": st.get("not_prunable", []),
            "shapes_ok": shapes_ok, "err": err, "finite": all(np.isfinite(v).all() for v in got.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--pipeline", default="prune{ratio=0.3}")
    ap.add_argument("--workdir", default=None, help="keep exported models here (reused if present)")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prune_zoo_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"| model | pass s (verify s) | MACs before → after (ratio) | params before → after (ratio) | "
          f"groups pruned | not prunable | output shapes kept | runs (emitted vs IR max abs diff) |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for name in args.models.split(","):
        t = time.perf_counter()
        try:
            r = check(name, MODELS[name], work, args.pipeline)
        except Exception as exc:  # report and go on with the next model
            ok = False
            print(f"| {name} | FAILED after {time.perf_counter() - t:.1f} s: {type(exc).__name__}: {exc} |")
            continue
        (m0, m1), (p0, p1) = r["macs"], r["params"]
        reasons = "; ".join(f"{n['group']} ({n['channels']}): {n['reason']}" for n in r["not_prunable"]) or "-"
        ok &= r["shapes_ok"] and r["finite"]
        print(f"| {r['model']} | {r['pass_s']:.2f} ({r['verify_s']:.2f}) | {m0 / 1e6:,.0f}M → {m1 / 1e6:,.0f}M "
              f"({m1 / m0:.3f}) | {p0 / 1e6:.2f}M → {p1 / 1e6:.2f}M ({p1 / p0:.3f}) | {r['groups']} | {reasons} | "
              f"{'yes' if r['shapes_ok'] else 'NO'} | {'yes' if r['finite'] else 'NO'} ({r['err']:.1e}) |")
        sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
