"""Held-out accuracy against MACs kept for ``separable``, ``lowrank``, ``tucker`` and ``shuffle`` (after
``separable``) on the trained digits fixtures (issues 5 and 17), without fine-tuning.

    python benchmarks/factorize_digits.py [--calib 256] [--quick]

For vgg_digits and resnet_digits (``fold-batchnorm`` first, so that its convs carry a bias), every
setting is run weight-based and data-aware (``calib=``: the first N x_train images of the fixed digits
split), and the test split's accuracy is printed with the fraction of the model's MACs kept. The last
lines give, per method, the best accuracy at ≤ 50% (and ≤ 55%) of the MACs against the target:
within 1 point of the original. ``macs=F`` settings let the pass allocate ranks across layers to keep
a fraction F of the model's MACs; ``rank=`` / ``energy=`` / ``max_error=`` choose per layer; ``lowrank``
without ``spatial=true`` touches only the dense and 1×1 layers (about 1-2% of these models' MACs).
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

import graphslim  # noqa: E402
from graphslim.runtime import Runner  # noqa: E402
from graphslim.testing import digits, fixture_path  # noqa: E402

SEPARABLE = ["rank=1", "rank=2", "rank=3", "rank=4", "energy=0.8", "energy=0.9", "max_error=0.5",
             "macs=0.3", "macs=0.4", "macs=0.5", "macs=0.6"]
LOWRANK = ["rank=4 spatial=true", "rank=8 spatial=true", "rank=12 spatial=true", "energy=0.95 spatial=true",
           "macs=0.4 spatial=true", "macs=0.5 spatial=true", "macs=0.6 spatial=true", "macs=0.7 spatial=true",
           "energy=0.9", "rank=4"]
TUCKER = ["rank=4", "rank=8", "energy=0.8", "energy=0.9", "macs=0.4", "macs=0.5", "macs=0.6"]
# shuffle takes 1×1 convs, which these models lack: the pointwise halves that separable leaves
SHUFFLE = ["separable{rank=2},shuffle{groups=2}", "separable{rank=3},shuffle{groups=2}",
           "separable{rank=4},shuffle{groups=4}", "separable{macs=0.6},shuffle{groups=2}"]
QUICK = {"separable": ["rank=3", "macs=0.5"], "lowrank": ["macs=0.5 spatial=true", "energy=0.9"],
         "tucker": ["macs=0.5"], "shuffle": ["separable{rank=3},shuffle{groups=2}"]}
METHODS = (("separable", SEPARABLE), ("lowrank", LOWRANK), ("tucker", TUCKER), ("shuffle", SHUFFLE))


def pipeline(pass_name: str, opt: str, calib) -> str:
    """The pipeline text of one setting; ``calib`` (a path or None) goes to every pass in it."""
    extra = f" calib={calib}" if calib else ""
    text = opt if "{" in opt else f"{pass_name}{{{opt}}}"  # a setting may be a whole pipeline
    return text.replace("}", extra + "}")


def accuracy(g, x, y) -> float:
    r = Runner(g)
    try:
        out = r.run({"image": x})
    finally:
        r.close()
    return float((np.asarray(out["output_0"]).argmax(1) == y).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=256, help="calibration images (first N of x_train)")
    ap.add_argument("--quick", action="store_true", help="a few settings only")
    args = ap.parse_args()
    d = digits()
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, image=d["x_train"][: args.calib])
        summary = []
        for name, pre in (("vgg_digits", ""), ("resnet_digits", "fold-batchnorm,dce")):
            g0 = graphslim.load(fixture_path(name))
            if pre:
                graphslim.run_pipeline(g0, pre)
            base_macs = g0.cost().macs
            base_acc = accuracy(g0, d["x_test"], d["y_test"])
            print(f"\n## {name}{' (after ' + pre + ')' if pre else ''}: test accuracy {base_acc:.4f}, "
                  f"{base_macs} MACs/example, {len(d['y_test'])} test images, calibration {args.calib} x_train images")
            print(f"{'pass':10} {'options':36} {'data':8} {'MACs kept':>9} {'accuracy':>9} {'Δ pts':>6} "
                  f"{'ranks':<22} {'s':>5}")
            for pass_name, settings in METHODS:
                if args.quick:
                    settings = QUICK[pass_name]
                for opt in settings:
                    for data in ("weights", "calib"):
                        g = g0.copy()
                        text = pipeline(pass_name, opt, calib if data == "calib" else None)
                        t = time.perf_counter()
                        rep = graphslim.run_pipeline(g, text)
                        secs = time.perf_counter() - t
                        kept = g.cost().macs / base_macs
                        acc = accuracy(g, d["x_test"], d["y_test"])
                        ranks = ",".join(str(r.get("rank", r.get("groups"))).replace(" ", "")
                                         if r["action"] == "factorized" else "-"
                                         for r in rep.passes[-1]["stats"]["layers"])
                        print(f"{pass_name:10} {opt:36} {data:8} {kept:9.3f} {acc:9.4f} {100 * (acc - base_acc):+6.1f} "
                              f"{ranks:<22} {secs:5.1f}")
                        summary.append((name, pass_name, data, kept, acc, base_acc, opt))
        print("\n## best accuracy at <= 50% / <= 55% of the MACs (target: within 1 point of the original)")
        for name in ("vgg_digits", "resnet_digits"):
            for pass_name, _ in METHODS:
                for data in ("weights", "calib"):
                    rows = [r for r in summary if r[:3] == (name, pass_name, data)]
                    if not rows:
                        continue
                    base = rows[0][5]
                    parts = []
                    for cap in (0.50, 0.55):
                        ok = [r for r in rows if r[3] <= cap]
                        if ok:
                            best = max(ok, key=lambda r: r[4])
                            met = "MET" if best[4] >= base - 0.01 else "not met"
                            parts.append(f"<= {cap:.0%}: {best[4]:.4f} ({100 * (best[4] - base):+.1f} pts, "
                                         f"{best[3]:.3f} MACs, {best[6]}) {met}")
                        else:
                            parts.append(f"<= {cap:.0%}: no setting")
                    print(f"{name:14} {pass_name:10} {data:8} " + " | ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
