"""Recovering accuracy without a training pipeline: ``thinet+rec`` alone against ``+distill``.

On the trained digits fixtures (batch norms folded first) and the ConvNeXt-like layer-norm net
(``graphslim.testing.layernorm_net``, trained here), at each MACs target: held-out accuracy on the 497
test digits after

* ``thinet+rec``: ``prune{macs=T criterion=thinet reconstruct=true calib=C}`` (the closed-form refit);
* ``+distill``: then ``distill{calib=C steps=1000 lr=3e-3 batch=64}`` (unlabeled: output and feature
  matching against the original);
* ``+distill(labels)``: the same with ``labels=labels`` (the task loss added).

Each cell is the mean over ``--draws`` calibration sets of 512 training digits (min..max in brackets);
the distill columns also give the mean steps and seconds. Then distill's wall time per 100 steps on
Keras MobileNetV2 (``weights=None``, 224×224, batch 16, random calibration images).

    .venv/bin/python benchmarks/recover.py                                   # everything
    .venv/bin/python benchmarks/recover.py --models resnet_digits --targets 0.5 --draws 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import graphslim  # noqa: E402
from graphslim.runtime import run  # noqa: E402
from graphslim.testing import digits, fixture_path, layernorm_net  # noqa: E402

METHODS = {
    "thinet+rec": "",
    "+distill": ",distill{{calib={calib} steps={steps} lr=3e-3 batch=64}}",
    "+distill(labels)": ",distill{{calib={calib} steps={steps} lr=3e-3 batch=64 labels=labels}}",
}


def accuracy(g, d) -> float:
    out = run(g, {g.inputs[0].name: d["x_test"]})
    return float((next(iter(out.values())).argmax(1) == d["y_test"]).mean())


def layernorm_model(tmp: str, d: dict, epochs: int = 30) -> str:
    import keras

    path = os.path.join(tmp, "layernorm_net")
    model = layernorm_net((8, 8, 1), width=32, hidden=128, stem=2, activation="softmax")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(d["x_train"], d["y_train"], batch_size=32, epochs=epochs, verbose=0)
    model.export(path, verbose=False)
    keras.backend.clear_session()
    return path


def mobilenet_rate(tmp: str, steps: int = 40) -> str:
    """Seconds per 100 distill steps on MobileNetV2 (after a light prune, against the original)."""
    import keras

    path = os.path.join(tmp, "mobilenetv2")
    keras.applications.MobileNetV2(weights=None).export(path, verbose=False)
    g = graphslim.load(path)
    calib = os.path.join(tmp, "mnv2_calib.npz")
    rng = np.random.default_rng(0)
    np.savez(calib, **{g.inputs[0].name: rng.uniform(-1, 1, (96, 224, 224, 3)).astype(np.float32)})
    rep = graphslim.run_pipeline(g, f"fold-batchnorm,prune{{ratio=0.25 round_to=8}},distill{{calib={calib} "
                                    f"steps={steps} batch=16 eval_every={steps} patience=1000 features=4}}")
    st = rep.passes[-1]["stats"]
    return f"{100 * st['seconds'] / max(1, st['steps']):.0f} s per 100 steps (batch 16, {st['steps']} steps timed)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet_digits,vgg_digits,layernorm_net")
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--mobilenet", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)
    d = digits()
    tmp = tempfile.mkdtemp(prefix="recover_")
    calibs = []
    for seed in range(args.draws):
        idx = np.random.RandomState(seed).permutation(len(d["x_train"]))[:512]
        calibs.append(os.path.join(tmp, f"calib{seed}.npz"))
        np.savez(calibs[-1], image=d["x_train"][idx], labels=d["y_train"][idx].astype(np.int64))
    methods = args.methods.split(",")
    for name in args.models.split(","):
        path = layernorm_model(tmp, d) if name == "layernorm_net" else str(fixture_path(name))
        base = graphslim.load(path)
        graphslim.run_pipeline(base, "fold-batchnorm,dce")
        acc0 = accuracy(base, d)
        print(f"\n## {name}: original accuracy {100 * acc0:.2f}% on {len(d['y_test'])} held-out digits "
              f"({args.draws} calibration draws of 512 training digits; distill steps={args.steps})")
        print("| kept MACs (target) | " + " | ".join(methods) + " |")
        print("|" + "---|" * (1 + len(methods)))
        for target in [float(t) for t in args.targets.split(",")]:
            cells = []
            for m in methods:
                accs, secs, steps, macs = [], [], [], []
                for calib in calibs:
                    g = base.copy()
                    text = (f"prune{{macs={target} criterion=thinet reconstruct=true calib={calib}}}"
                            + METHODS[m].format(calib=calib, steps=args.steps))
                    rep = graphslim.run_pipeline(g, text)
                    accs.append(100 * accuracy(g, d))
                    macs.append(g.cost().macs / base.cost().macs)
                    if m != "thinet+rec":
                        st = rep.passes[-1]["stats"]
                        secs.append(st["seconds"])
                        steps.append(st["steps"])
                cell = f"{np.mean(accs):.2f} ({min(accs):.2f}..{max(accs):.2f})"
                if steps:
                    cell += f", {np.mean(steps):.0f} steps, {np.mean(secs):.0f} s"
                cells.append(cell)
            print(f"| {np.mean(macs):.3f} ({target}) | " + " | ".join(cells) + " |", flush=True)
    if args.mobilenet:
        t0 = time.perf_counter()
        print(f"\nMobileNetV2 distill: {mobilenet_rate(tmp)} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
