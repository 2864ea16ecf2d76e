"""Model-zoo report: every Keras Applications architecture (weights=None) through graphslim.

    python benchmarks/zoo_report.py [--out docs/ZOO.md] [--only ResNet50,VGG16] [--timeout 900]

Per architecture, in its own subprocess (a crash or hang cannot take the report down): export the
model, then for each pipeline load → pass → save → tf.saved_model.load → run on a seeded batch and
compare with the original:
  roundtrip  (empty pipeline)              must match (1e-5)
  subset     subset{keep=0,1,2,3,4}        kept logits must equal the original's (1e-5); output has 5 classes
  prune      prune{ratio=0.3}              must load and run with the original output shape
  separable  separable{rank=1000 ...}      full rank: the logits must match to 1e-4 of their scale, or
                                           to twice the model's own float32 noise when that is larger

The noise is how much the original's logits move when the input moves by a relative 1e-6: some
random-weight models are chaotic (EfficientNetV2M's activations reach 1e6, and a 1e-6 input change
moves its logits by 70%), so any exact rewrite that reorders float32 arithmetic (fold-batchnorm too)
changes them by as much; such a cell says "at noise".
A cell says ok with the measured max abs error, 'refused: <reason>' (a clear graphslim error), or
FAIL (anything else: a crash, a wrong result, a model that does not load: every written model is
loaded with tf.saved_model.load, and the row records "loads").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINES = {
    "roundtrip": "",
    "subset": "subset{keep=0,1,2,3,4}",
    "prune": "prune{ratio=0.3}",
    "separable": "separable{rank=1000 min_macs_saving=none}",
}


def architectures() -> list[str]:
    import keras

    names = []
    for name in dir(keras.applications):
        obj = getattr(keras.applications, name)
        if name[:1].isupper() and callable(obj):
            names.append(name)
    return sorted(names)


def child(arch: str) -> None:
    """Runs in a subprocess: prints one JSON line per pipeline. Its temporary models (several GB for
    the large architectures) are deleted as it goes and at the end."""
    tmp = Path(tempfile.mkdtemp(prefix=f"zoo_{arch}_"))
    try:
        _child(arch, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _child(arch: str, tmp: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    import graphslim
    from graphslim.errors import GraphslimError
    from graphslim.pipeline import registered_passes, load_builtin_passes

    load_builtin_passes()
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None)
    src = tmp / "orig"
    model.export(str(src), verbose=False)
    shape = tuple(d or 224 for d in model.input_shape[1:])  # MobileNetV3: dynamic spatial dims
    del model
    ref_obj = tf.saved_model.load(str(src))
    fn = ref_obj.signatures["serving_default"]
    (name, _), = fn.structured_input_signature[1].items()
    x = np.random.RandomState(0).rand(1, *shape).astype("float32") * 255.0
    ref = {k: v.numpy() for k, v in fn(**{name: tf.constant(x)}).items()}
    noise = None  # the original's logit change under a relative 1e-6 input change (computed once)
    for label, pipeline in PIPELINES.items():
        row = {"arch": arch, "pass": label}
        if pipeline and pipeline.split("{")[0] not in registered_passes():
            row.update(status="n/a", detail="pass not available")
            print(json.dumps(row), flush=True)
            continue
        t = time.perf_counter()
        try:
            g = graphslim.load(src)
            rep = graphslim.run_pipeline(g, pipeline)
            out = graphslim.save(g, tmp / label, force=True)
            try:  # what graphslim wrote must load (the emitter checks it too): a row never hides that
                got_obj = tf.saved_model.load(str(out))
            except Exception as exc:  # noqa: BLE001
                raise RuntimeError(f"the written model does not load: {exc}") from exc
            row["loads"] = True
            got = {k: v.numpy() for k, v in got_obj.signatures["serving_default"](**{name: tf.constant(x)}).items()}
            (k, r), = ref.items()
            y = got[k]
            if label in ("subset", "separable"):
                # compare pre-softmax logits: random-weight models saturate their softmax (logits in the
                # thousands), so a 1e-7 relative change of two near-tied logits flips a one-hot output
                # (and renormalized probabilities can be 0/0); the emitted model must run as well
                from graphslim.runtime import run

                g0 = graphslim.load(src)
                sm = g0.producer(g0.outputs[0].tensor)
                lt = str(g0.input(sm, 0)) if sm.op == "Softmax" else str(g0.outputs[0].tensor)
                want = run(g0, {name: x}, fetch=[lt])[lt]
                got_l = run(g, {name: x}, fetch=[lt])[lt]
                scale = max(1.0, float(np.abs(want).max()))
                if label == "subset":
                    want = want[..., :5]
                    ok = (y.shape[-1] == 5 and bool(np.isfinite(y).all()) and got_l.shape == want.shape
                          and bool(np.allclose(got_l, want, rtol=1e-5, atol=1e-5 * scale)))
                else:
                    if noise is None:
                        x2 = x * (1 + 1e-6 * np.random.RandomState(1).randn(*x.shape)).astype("float32")
                        noise = float(np.abs(run(g0, {name: x2}, fetch=[lt])[lt] - want).max())
                        row["noise"] = noise
                    err_l = float(np.abs(got_l - want).max())
                    ok = (y.shape == r.shape and bool(np.isfinite(y).all()) and got_l.shape == want.shape
                          and err_l <= max(1e-4 * scale, 2 * noise))
                    if ok and err_l > 1e-4 * scale:
                        row["at_noise"] = True
                err = float(np.abs(got_l - want).max())
            elif label == "prune":
                err = float(np.abs(y - r).max())
                ok = y.shape == r.shape and bool(np.isfinite(y).all())
                st = rep.passes[0]["stats"]
                row["macs_ratio"] = g.cost().macs / max(1, graphslim.load(src).cost().macs)
                row["groups"] = st.get("pruned_groups", st.get("groups_pruned"))
            else:
                err = float(np.abs(y - r).max())
                tol = 1e-5 if label == "roundtrip" else 1e-4 * max(1.0, float(np.abs(r).max()))
                ok = y.shape == r.shape and bool(np.abs(y - r).max() <= tol)
            row.update(status="ok" if ok else "FAIL", err=err, seconds=time.perf_counter() - t)
        except GraphslimError as exc:
            row.update(status="refused", detail=str(exc).splitlines()[0][:300])
        except Exception as exc:  # noqa: BLE001 - the report records every failure
            row.update(status="FAIL", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        shutil.rmtree(tmp / label, ignore_errors=True)
        print(json.dumps(row), flush=True)


def render(rows: dict, archs: list[str]) -> str:
    lines = ["# Model zoo", "",
             "Every Keras Applications architecture (`weights=None`, default input size, batch 1, seeded "
             "input) through graphslim; produced by `benchmarks/zoo_report.py` (see its docstring for the "
             "criteria). Cells: status and max abs output error against the original SavedModel (of the "
             "pre-softmax logits for subset and separable: random-weight models saturate their softmax).", ""]
    header = "| architecture | " + " | ".join(PIPELINES) + " |"
    lines += [header, "|" + "---|" * (len(PIPELINES) + 1)]
    counts = {p: 0 for p in PIPELINES}
    for arch in archs:
        cells = []
        for p in PIPELINES:
            r = rows.get((arch, p))
            if r is None:
                cells.append("not run yet")
                continue
            if r["status"] == "ok":
                counts[p] += 1
                extra = f", MACs {r['macs_ratio']:.2f}x" if "macs_ratio" in r else ""
                if r.get("at_noise"):
                    extra += f", at noise {r['noise']:.2g}"
                cells.append(f"ok ({r['err']:.2g}{extra})")
            else:
                cells.append(f"{r['status']}: {r.get('detail', '')}".replace("|", "/") if r.get("detail")
                             else f"{r['status']} ({r.get('err', float('nan')):.2g})")
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    lines += ["", "Passing: " + ", ".join(f"{p} {counts[p]}/{len(archs)}" for p in PIPELINES), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/ZOO.md")
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--child", default="")
    ap.add_argument("--render", action="store_true", help="only rebuild the table from the stored results")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    archs = args.only.split(",") if args.only else architectures()
    rows: dict = {}
    store = Path(args.out).with_suffix(".json")
    if args.only and store.exists():  # a partial re-run updates the full report
        for r in json.loads(store.read_text()):
            rows[(r["arch"], r["pass"])] = r
        archs = architectures()  # the table always lists every architecture
    if args.render:
        for r in json.loads(store.read_text()):
            rows[(r["arch"], r["pass"])] = r
        Path(args.out).write_text(render(rows, architectures()))
        return 0
    for arch in (args.only.split(",") if args.only else archs):
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", arch], capture_output=True, text=True,
                                  timeout=args.timeout)
            out, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out, code = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
        for left in Path(tempfile.gettempdir()).glob(f"zoo_{arch}_*"):  # a killed child cannot clean up
            shutil.rmtree(left, ignore_errors=True)
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                rows[(r["arch"], r["pass"])] = r
        for p in PIPELINES:
            if (arch, p) not in rows:
                rows[(arch, p)] = {"status": "FAIL", "detail": f"process ended ({code}) before this ran"}
        print(f"{arch:24s} {time.perf_counter() - t:6.0f}s  " +
              "  ".join(f"{p}={rows[(arch, p)]['status']}" for p in PIPELINES), flush=True)
        Path(args.out).write_text(render(rows, archs))
        store.write_text(json.dumps([dict(r, arch=a, **{"pass": p}) for (a, p), r in sorted(rows.items())], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
