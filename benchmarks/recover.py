"""Recovering accuracy without a training pipeline: ``thinet+rec`` alone against ``+distill``.

On the trained digits fixtures (batch norms folded first) and the ConvNeXt-like layer-norm net
(``graphslim.testing.layernorm_net``, trained here), at each MACs target: held-out accuracy on the 497
test digits after

* ``thinet+rec``: ``prune{macs=T criterion=thinet reconstruct=true calib=C}`` (the closed-form refit);
* ``+distill``: then ``distill{calib=C steps=1000 lr=3e-3 batch=64}`` (unlabeled: output and feature
  matching against the original);
* ``+distill(labels)``: the same with ``labels=labels`` (the task loss added);
* ``+distill(blockwise)``: unlabeled, part by part from input to output (``blockwise=true``).

Each cell is the mean over ``--draws`` calibration sets of 512 training digits (min..max in brackets);
the distill columns also give the mean steps and seconds. Then imprinting (``extend{examples=}``, with
and without ``calib=``) from k = 1, 5, 20 examples per new class; and distill's wall time per 100 steps on
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
    "+distill(blockwise)": ",distill{{calib={calib} steps={steps} lr=3e-3 batch=64 blockwise=true}}",
}
OLD = 8  # imprinting: the fixture knows the digits 0..7; extend adds 8 and 9


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


def imprinting(tmp: str, d: dict, draws: int, ks=(1, 5, 20)) -> None:
    """A CNN trained on the digits 0..7 (``graphslim.testing.digits_subset_model``) extended with 8 and 9
    from k training examples each, no gradient step: Qi's rule (``examples= imprint=qi``) and the
    discriminant on unlabeled old-class digits (``examples= calib=``, 256 of them). Accuracy on the held-out old and new
    digits, mean over draws of the examples (and calibration digits)."""
    from graphslim.testing import digits_subset_model

    base = graphslim.load(digits_subset_model(os.path.join(tmp, "eight"), OLD))
    old = d["y_test"] < OLD
    acc0 = float((next(iter(run(base, {"image": d["x_test"]}).values())).argmax(1)[old] == d["y_test"][old]).mean())
    print(f"\n## imprinting: 0..7 model, original accuracy {100 * acc0:.2f}% on the {old.sum()} held-out old "
          f"digits; 8 and 9 added from k examples each ({draws} draws; old: accuracy on the old digits over all "
          "10 classes, new: on the held-out 8s and 9s)")
    print("| k | Qi's rule: old | Qi's rule: new | calib= (256 old digits): old | calib=: new |")
    print("|---|---|---|---|---|")
    for k in ks:
        cells = {"qi": [], "calib": []}
        for seed in range(draws):
            rng = np.random.default_rng(seed)
            idx = np.concatenate([rng.choice(np.flatnonzero(d["y_train"] == c), k, replace=False) for c in (8, 9)])
            ex = os.path.join(tmp, f"ex{k}_{seed}.npz")
            np.savez(ex, image=d["x_train"][idx], labels=d["y_train"][idx].astype(np.int64))
            cal = os.path.join(tmp, f"old{seed}.npz")
            np.savez(cal, image=d["x_train"][rng.choice(np.flatnonzero(d["y_train"] < OLD), 256, replace=False)])
            for kind, extra in (("qi", " imprint=qi"), ("calib", f" calib={cal}")):
                g = base.copy()
                graphslim.run_pipeline(g, f"extend{{classes=2 examples={ex}{extra}}}")
                pred = next(iter(run(g, {"image": d["x_test"]}).values())).argmax(1)
                cells[kind].append((100 * (pred[old] == d["y_test"][old]).mean(),
                                    100 * (pred[~old] == d["y_test"][~old]).mean()))
        q, c = np.mean(cells["qi"], axis=0), np.mean(cells["calib"], axis=0)
        print(f"| {k} | {q[0]:.2f} | {q[1]:.2f} | {c[0]:.2f} | {c[1]:.2f} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet_digits,vgg_digits,layernorm_net")
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--mobilenet", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--imprint", action=argparse.BooleanOptionalAction, default=True)
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
    if args.imprint:
        imprinting(tmp, d, args.draws)
    if args.mobilenet:
        t0 = time.perf_counter()
        print(f"\nMobileNetV2 distill: {mobilenet_rate(tmp)} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
