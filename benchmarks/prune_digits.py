"""Held-out accuracy against kept MACs for ``prune`` on the trained digits fixtures (no fine-tuning).

For each model (vgg_digits, resnet_digits; batch norms folded first), each method and each MACs target
(100% → 30%), run ``prune{macs=T ...}`` and measure top-1 accuracy on the 497 held-out digits (no
fine-tuning). Calibration data (inputs only, no labels): ``--calib`` training digits. With ``--draws N``
(default 5) each cell is run on N calibration sets drawn at random from the training digits (seeds
0..N-1) and shows the mean accuracy with the range: on 497 test digits one digit is 0.2 points, and
the calibration draw alone moves a cell by about a point, so a single draw says little.

Methods (``METHODS``): ``l1`` (data-free, global allocation by normalized importance per MAC);
``thinet`` and ``thinet+rec`` (ThiNet selection, without / with least-squares reconstruction) and
``lsq+rec`` (selection with least-squares rescaling, reconstruction), these three with
``allocation=sensitivity`` (per-group output error measured on the calibration data);
``thinet+rec(global)`` uses the importance-per-MAC allocation instead.

    .venv/bin/python benchmarks/prune_digits.py                     # the full curve
    .venv/bin/python benchmarks/prune_digits.py --targets 0.5 --models resnet_digits
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
from graphslim.testing import digits, fixture_path  # noqa: E402

METHODS = {
    "l1": "criterion=l1",
    "thinet": "criterion=thinet calib={calib} allocation=sensitivity",
    "thinet+rec": "criterion=thinet calib={calib} reconstruct=true allocation=sensitivity",
    "lsq+rec": "criterion=lsq calib={calib} reconstruct=true allocation=sensitivity",
    "thinet+rec(global)": "criterion=thinet calib={calib} reconstruct=true",
}
DEFAULT_METHODS = "l1,thinet,thinet+rec,lsq+rec"


def accuracy(g, x, y) -> float:
    out = run(g, {g.inputs[0].name: x})
    return float((next(iter(out.values())).argmax(1) == y).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg_digits,resnet_digits")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"from {', '.join(METHODS)}")
    ap.add_argument("--targets", default="1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3")
    ap.add_argument("--calib", type=int, default=512, help="training digits used for calibration")
    ap.add_argument("--draws", type=int, default=5, help="calibration sets drawn per cell (mean, range)")
    ap.add_argument("--extra", default="", help="extra prune options, e.g. 'allocation=uniform'")
    args = ap.parse_args(argv)
    d = digits()
    tmp = tempfile.mkdtemp(prefix="prune_digits_")
    calibs = []
    for seed in range(args.draws):
        idx = np.random.RandomState(seed).permutation(len(d["x_train"]))[:args.calib]
        calibs.append(os.path.join(tmp, f"calib{seed}.npz"))
        np.savez(calibs[-1], image=d["x_train"][idx])
    targets = [float(t) for t in args.targets.split(",")]
    methods = args.methods.split(",")
    for name in args.models.split(","):
        base = graphslim.load(fixture_path(name))
        graphslim.run_pipeline(base, "fold-batchnorm,dce")
        acc0 = accuracy(base, d["x_test"], d["y_test"])
        print(f"\n## {name}: original accuracy {100 * acc0:.2f}% on {len(d['y_test'])} held-out digits, "
              f"{base.cost().macs:,} MACs (calibration: {args.calib} training digits, {args.draws} draws: "
              f"mean accuracy (min..max){', ' + args.extra if args.extra else ''})")
        header = "| kept MACs (target) | " + " | ".join(f"{m} acc | {m} MACs" for m in methods) + " |"
        print("methods: " + "; ".join(f"{m} = prune{{macs=T {METHODS[m].format(calib='calib.npz')}}}"
                                      for m in methods))
        print(header)
        print("|" + "---|" * (1 + 2 * len(methods)))
        times = {m: [] for m in methods}
        for t in targets:
            cells = []
            for m in methods:
                if t >= 1.0:
                    cells += [f"{100 * acc0:.2f}", "1.000"]
                    continue
                accs, ratios = [], []
                draws = calibs if "{calib}" in METHODS[m] else calibs[:1]  # data-free: one run
                for calib in draws:
                    g = base.copy()
                    opts = METHODS[m].format(calib=calib) + (" " + args.extra if args.extra else "")
                    t0 = time.perf_counter()
                    rep = graphslim.run_pipeline(g, f"prune{{macs={t} {opts}}}")
                    times[m].append(time.perf_counter() - t0)
                    ratios.append(rep.passes[-1]["stats"]["macs"]["ratio"])
                    accs.append(100 * accuracy(g, d["x_test"], d["y_test"]))
                cell = f"{np.mean(accs):.2f}" + (f" ({min(accs):.2f}..{max(accs):.2f})" if len(accs) > 1 else "")
                cells += [cell, f"{np.mean(ratios):.3f}"]
            print(f"| {t:.0%} | " + " | ".join(cells) + " |")
            sys.stdout.flush()
        print("mean pass seconds: " + ", ".join(f"{m} {np.mean(v):.2f}" for m, v in times.items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
