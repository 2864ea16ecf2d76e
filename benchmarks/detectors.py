"""Real detectors through graphslim: correctness of round trip, subset and extend, and what subset buys.

    python benchmarks/detectors.py [--only tfm_retinanet,keras_cv_yolov8] [--steps extend2] [--rounds 9]
                                   [--json out.json]

Every detector of fixtures/detectors.py (keras-hub RetinaNet; tf-models-official RetinaNet with its
'v2', 'v1' and 'batched' NMS and Mask R-CNN, written by its own export_inference_graph; keras-cv
YOLOv8), built with random weights and fixed seeds, on its own seeded inputs (inputs.npz):

  roundtrip   load + save: the same detections (raw heads: max abs difference)
  subset20    subset{keep=0..19} (background=true where class 0 is the background): kept-class
              detections of the original missing from the output (same id, box and score; id and box
              for Mask R-CNN, whose softmax renormalizes over the kept classes), ids outside the kept
              set; raw heads: max abs difference of the kept logits
  extend2     extend{classes=2}: old classes' detections lost to anything but a higher-scoring new
              class (and how many of the original detections are in the output), max abs difference of the old classes' logits (the graph cut down to them: no
              post-processing), the gradient norm on the new classes' weights of one step on their
              logits and the largest move of an old logit it causes, how the post-processing grew;
              or the refusal
  prune30     prune{ratio=0.3}: loads, runs, keeps every output shape
  params, MACs before/after subset20, and its latency speedup, post-processing included: the original
  and the subset model timed by `graphslim bench` (batch of inputs.npz, 2 threads, the models taking
  turns in every round, medians). Latency is a ratio measured side by side in one run: this machine
  is shared and noisy.

Each detector runs in its own subprocess (a crash cannot take the report down).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("roundtrip", "subset20", "extend2", "prune30")
BACKGROUND = {"tfm_retinanet", "tfm_retinanet_batched", "tfm_retinanet_nms_v1", "tfm_maskrcnn"}
# second-stage softmax over the classes: subset renormalizes the kept classes' scores (the contract),
# so their detections are compared by class id and box only
SOFTMAX = {"tfm_maskrcnn"}


def _detectors():
    spec = importlib.util.spec_from_file_location("detectors", ROOT / "fixtures" / "detectors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def child(name: str, rounds: int, steps=STEPS) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    import graphslim
    from graphslim.errors import GraphslimError
    from graphslim.testing import detections

    det = _detectors()
    src = det.build(name)
    feed = det.load_inputs(src)
    tmp = Path(tempfile.mkdtemp(prefix=f"det_{name}_"))
    row = {"name": name}

    def run(path):
        fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feed.items()}).items()}

    raw = None
    try:
        before = run(src)
        raw = "cls_logits" in before
        images = len(next(iter(feed.values())))
        bg = " background=true" if name in BACKGROUND else ""
        # --- round trip
        if "roundtrip" in steps:
            t = time.perf_counter()
            g = graphslim.load(src)
            out = graphslim.save(g, tmp / "rt")
            after = run(out)
            if raw:
                row["roundtrip"] = {"max_abs_diff": max(float(np.abs(after[k] - before[k]).max()) for k in before)}
            else:
                row["roundtrip"] = {"same_detections": all(detections(after, i) == detections(before, i) for i in range(images)),
                                    "detections": sum(len(detections(before, i)) for i in range(images))}
            row["roundtrip"]["seconds"] = round(time.perf_counter() - t, 1)
        # --- subset to 20 classes
        if "subset20" in steps:
            keep = list(range(20))
            g = graphslim.load(src)
            c0 = g.cost()
            rep = graphslim.run_pipeline(g, f"subset{{keep={','.join(map(str, keep))}{bg}}},dce")
            c1 = g.cost()
            sub = graphslim.save(g, tmp / "subset")
            after = run(sub)
            st = rep.passes[0]["stats"]
            row["subset20"] = {"params": [c0.params, c1.params], "macs": [c0.macs, c1.macs],
                               "postprocess": st.get("postprocess") or "followed"}
            if raw:
                row["subset20"]["kept_logits_max_abs_diff"] = float(np.abs(after["cls_logits"] - before["cls_logits"][..., keep]).max())
            else:
                new = {k: j for j, k in enumerate(keep)}
                total = lost = outside = 0
                def key(d):
                    return {(c, b) for c, _, b in d} if name in SOFTMAX else d

                for i in range(images):
                    got = key(detections(after, i))
                    outside += sum(c not in new.values() for c, *_ in got)
                    kept = key({(new[c], s, b) for c, s, b in detections(before, i) if c in new and c != 0})
                    total += len(kept)
                    lost += len(kept - got)
                row["subset20"].update(kept_detections=total, lost=lost, ids_outside_kept=outside)
            # latency, post-processing included: graphslim bench, the models taking turns
            inputs = tmp / "inputs.npz"
            np.savez(inputs, **feed)
            bench = subprocess.run([str(Path(sys.executable).parent / "graphslim"), "bench", str(src), str(sub), "--inputs",
                                    str(inputs), "--threads", "2", "--rounds", str(rounds), "--calls", "1", "--json"],
                                   capture_output=True, text=True)
            if bench.returncode == 0:
                models = json.loads(bench.stdout)["models"]
                row["subset20"]["latency_ms"] = [round(m["median_ms"], 1) for m in models]
                row["subset20"]["speedup"] = round(models[1]["speedup"], 3)
            else:
                row["subset20"]["latency"] = f"bench failed: {bench.stderr.strip().splitlines()[-1:]}"
        # --- extend by 2
        if "extend2" in steps:
            g = graphslim.load(src)
            try:
                rep = graphslim.run_pipeline(g, f"extend{{classes=2{bg}}}")
                st = rep.passes[0]["stats"]
                after = run(graphslim.save(g, tmp / "extend"))
                row["extend2"] = {"postprocess": st.get("postprocess") or "followed"}
                if raw:
                    row["extend2"]["old_detections_lost"] = None
                else:
                    lost = kept = total = 0
                    for i in range(images):
                        got, old = detections(after, i), detections(before, i)
                        best_new = max([s for c, s, _ in got if c >= 91], default=0.0)
                        lost += len({d for d in old if d[1] > best_new} - got)
                        kept += len(old & got)
                        total += len(old)
                    row["extend2"].update(old_detections_lost=lost, old_detections_kept=f"{kept}/{total}",
                                          new_class_detections=sum(c >= 91 for i in range(images)
                                                                   for c, _, _ in detections(after, i)))
                row["extend2"].update(_extend_head_figures(graphslim.load(src), g, st, feed, tmp))
            except GraphslimError as exc:
                row["extend2"] = {"refused": str(exc).splitlines()[0][:240]}
        # --- prune
        if "prune30" in steps:
            g = graphslim.load(src)
            graphslim.run_pipeline(g, "prune{ratio=0.3},dce")
            after = run(graphslim.save(g, tmp / "prune"))
            row["prune30"] = {"loads_and_runs": True, "shapes_kept": all(after[k].shape == before[k].shape for k in before),
                              "macs_ratio": round(g.cost().macs / max(1, graphslim.load(src).cost().macs), 3)}
    except Exception as exc:  # noqa: BLE001 - the report records every failure
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def _extend_head_figures(original, extended, stats: dict, feed: dict, tmp: Path) -> dict:
    """The class logits extend grew, in both graphs cut down to them (NMS has no gradient): the old
    classes' max abs difference, then one gradient step on the new classes' logits (sigmoid
    cross-entropy towards 1): its norm on the grown scoring weights, and how far it moves an old
    logit (0 but for float32 round-off) and a new one."""
    import numpy as np
    import tensorflow as tf

    import graphslim
    from graphslim.ir.graph import SignatureArg, as_tensor

    t = stats["scores_tensor"]
    node = extended.producer(t)
    logits = str(extended.input(node, 0)) if node.op in ("Sigmoid", "Softmax") else t
    x = {k: tf.constant(v) for k, v in feed.items()}

    def head(g, name):
        g.outputs = [SignatureArg("logits", as_tensor(logits))]
        g.remove_dead_nodes()
        model = tf.saved_model.load(str(graphslim.save(g, tmp / name)))
        return model, model.signatures["serving_default"]

    _, fn0 = head(original, "head0")
    model, fn = head(extended, "head")
    old, new = fn0(**x)["logits"].numpy(), fn(**x)["logits"].numpy()
    scoring = set(stats["grown_weights"]) - set(stats["regression_weights"])
    variables = [v for v in model.trainable_variables if v.name.split(":")[0] in scoring]
    with tf.GradientTape() as tape:
        lg = fn(**x)["logits"][..., -2:]
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.ones_like(lg), lg))
    grads = tape.gradient(loss, variables)
    for v, gr in zip(variables, grads):
        if gr is not None:
            v.assign_sub(0.1 * gr)
    stepped = fn(**x)["logits"].numpy()
    return {"old_logits_max_abs_diff": float(np.abs(new[..., :-2] - old).max()),
            "new_rows_grad_norm": float(tf.linalg.global_norm([gr for gr in grads if gr is not None])),
            "step_moves_old_logits": float(np.abs(stepped[..., :-2] - new[..., :-2]).max()),
            "step_moves_new_logits": float(np.abs(stepped[..., -2:] - new[..., -2:]).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated detector names")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {','.join(STEPS)}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.rounds, args.steps.split(","))), flush=True)
        return 0
    names = [n for n in args.only.split(",") if n] or list(_detectors().NAMES)
    rows = []
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--rounds", str(args.rounds),
                               "--steps", args.steps],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"name": name, "error": f"exit {proc.returncode}: "
                                                   f"{(proc.stderr.strip().splitlines() or [''])[-1][:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'detector':24} {'round trip':18} {'subset 20: params':20} {'MACs':16} {'speedup':8} "
          f"{'kept lost':10} {'extend 2':34} prune")
    for r in rows:
        if "error" in r and not any(step in r for step in STEPS):
            print(f"{r['name']:24} ERROR {r['error']}")
            continue
        rt = r.get("roundtrip", {})
        rt_s = "-" if not rt else ("same" if rt.get("same_detections") else "DIFFERENT") if "same_detections" in rt \
            else f"diff {rt.get('max_abs_diff', float('nan')):.1e}"
        s = r.get("subset20", {})
        p0, p1 = s.get("params", [0, 1])
        m0, m1 = s.get("macs", [0, 1])
        params_s, macs_s = (f"{p1 / max(1, p0):.3f}x", f"{m1 / m0:.3f}x") if s else ("-", "-")
        kept_s = "-" if not s else f"{s['lost']}/{s['kept_detections']}" if "lost" in s \
            else f"{s.get('kept_logits_max_abs_diff', 0):.1e}"
        e = r.get("extend2", {})
        if "refused" in e or not e:
            e_s = "refused" if e else "-"
        else:
            lost_e = "" if e.get("old_detections_lost") is None else f"lost {e['old_detections_lost']}, "
            e_s = f"{lost_e}diff {e['old_logits_max_abs_diff']:.0e}, grad {e['new_rows_grad_norm']:.2g}"
        pr = r.get("prune30")
        pr_s = "-" if pr is None and "error" not in r else "ok" if pr and pr.get("shapes_kept") else r.get("error", "?")
        print(f"{r['name']:24} {rt_s:18} {params_s:20} {macs_s:16} {s.get('speedup', '-')!s:8} {kept_s:10} "
              f"{e_s:34} {pr_s}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
