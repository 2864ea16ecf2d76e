"""Latency-targeted against MACs-targeted pruning, measured on the runtime the model is pruned for.

For each model (Keras MobileNetV2 and ResNet50 built with ``weights=None``, batch norms folded first; the
trained digits fixtures) and each runtime (``tf``: TensorFlow's graph executor; ``litert``: the TFLite
flatbuffer on XNNPACK; ``xla``), prune the same model twice with the same criterion and ``round_to``:
``prune{macs=T}`` and ``prune{latency=T runtime=R}``, then time the original and both pruned models side
by side in one contained child process (interleaved rounds, medians, batch 1, ``--threads``) and print
the measured speedups and the kept MACs. The latency pass's own figures (rounds, predicted and measured
ratios, seconds with a cold or warm table cache) are printed too.

For the digits fixtures (where accuracy is real) the MACs target is then searched (bisection on the
measured latency) until the MACs-pruned model is as fast as the latency-pruned one, and both are scored on
the 497 held-out digits: equal measured latency, compared accuracy.

    .venv/bin/python benchmarks/latency.py                                  # everything
    .venv/bin/python benchmarks/latency.py --models mobilenetv2 --runtimes tf,litert
    .venv/bin/python benchmarks/latency.py --models resnet_digits --target 0.8 --cold
    .venv/bin/python benchmarks/latency.py --models vgg_digits,resnet_digits --calib   # thinet + reconstruction

``--cold`` points the table cache at an empty directory first (the "cold cache" figure). ``--calib``
prunes the digits fixtures with ``criterion=thinet reconstruct=true`` on 512 training digits (both
targets, same data), the way graphslim is meant to be used when data is at hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import graphslim  # noqa: E402

DIGITS = ("vgg_digits", "resnet_digits")
KERAS = {"mobilenetv2": "MobileNetV2", "resnet50": "ResNet50"}


def build(name: str, tmp: str):
    from graphslim.testing import fixture_path

    if name in DIGITS:
        g = graphslim.load(fixture_path(name))
    else:
        import keras

        path = os.path.join(tmp, name)
        getattr(keras.applications, KERAS[name])(weights=None).export(path, verbose=False)
        g = graphslim.load(path)
    graphslim.run_pipeline(g, "fold-batchnorm,dce")
    return g


def accuracy(g, x, y) -> float:
    from graphslim.runtime import run

    out = run(g, {g.inputs[0].name: x})
    return float((next(iter(out.values())).argmax(1) == y).mean())


def side_by_side(graphs: list, runtime: str, threads: int, rounds: int = 15) -> list:
    """Each graph's latency as a ratio of the first's: medians of per-round ratios, interleaved."""
    from dataclasses import replace

    from graphslim.analysis.latency import RUNTIMES, load_timed, time_ratios
    from graphslim.sandbox import Child, default_limits

    with Child(replace(default_limits(), threads=threads), label="benchmark models") as child:
        loaded = [load_timed(child, g, RUNTIMES[runtime]) for g in graphs]
        return time_ratios(child, loaded, rounds)[1]


def pruned(base, text: str):
    g = base.copy()
    t0 = time.perf_counter()
    rep = graphslim.run_pipeline(g, text)
    return g, rep.passes[-1]["stats"], time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2,resnet50,vgg_digits,resnet_digits")
    ap.add_argument("--runtimes", default="tf,litert")
    ap.add_argument("--target", type=float, default=0.5, help="macs= and latency= of the big models")
    ap.add_argument("--digits-target", type=float, default=0.8,
                    help="latency= of the digits fixtures (their per-op overhead caps the speedup)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--digits-threads", type=int, default=1,
                    help="threads for the digits fixtures: a 5 µs model runs faster on one, and two threads' "
                         "wake-ups made the same model time 0.87..1.16 of itself on a loaded machine")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--criterion", default="l1")
    ap.add_argument("--cold", action="store_true", help="start with an empty latency-table cache")
    ap.add_argument("--calib", action="store_true",
                    help="digits fixtures: criterion=thinet reconstruct=true on 512 training digits")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="latency_bench_")
    calib = None
    if args.calib:
        import numpy as np

        from graphslim.testing import digits

        calib = os.path.join(tmp, "calib.npz")
        x = digits()["x_train"][:512]
    if args.cold:
        os.environ["GRAPHSLIM_CACHE"] = os.path.join(tmp, "cache")
    d = None
    print(f"threads {args.threads} (digits fixtures: {args.digits_threads}), round_to {args.round_to}, criterion {args.criterion}"
          f"{' (digits: thinet + reconstruction, 512 calibration digits)' if calib else ''}, batch 1; speedups are "
          f"medians of interleaved rounds in one child process\n")
    print("| model | runtime | target | macs= speedup | macs= MACs kept | latency= speedup | latency= MACs kept "
          "| latency pass: rounds, predicted, measured, seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        base = build(name, tmp)
        target = args.digits_target if name in DIGITS else args.target
        threads = args.digits_threads if name in DIGITS else args.threads
        common = f"criterion={args.criterion} round_to={args.round_to}"
        if calib is not None and name in DIGITS:
            np.savez(calib, **{base.inputs[0].name: x})
            common = f"criterion=thinet reconstruct=true calib={calib} round_to={args.round_to}"
        for runtime in args.runtimes.split(","):
            by_macs, mstats, _ = pruned(base, f"prune{{macs={target} {common}}}")
            by_lat, lstats, seconds = pruned(
                base, f"prune{{latency={target} runtime={runtime} threads={threads} {common}}}")
            _, rm, rl = side_by_side([base, by_macs, by_lat], runtime, threads)
            lt = lstats["target"]
            print(f"| {name} | {runtime} | {target} | {1 / rm:.2f}x | {mstats['macs']['ratio']:.3f} | "
                  f"{1 / rl:.2f}x | {lstats['macs']['ratio']:.3f} | {len(lt['rounds'])}, {lt['predicted']:.3f}, "
                  f"{lt['measured']:.3f}{'' if lt['met'] else ' (short)'}{', by MACs' if lt['allocator'] == 'macs' else ''}"
                  f"{', unpruned' if lt['unpruned'] else ''}, {seconds:.0f} s "
                  f"({lt['tables']['measured_points']} points measured) |")
            sys.stdout.flush()
            if name in DIGITS:
                if d is None:
                    from graphslim.testing import digits

                    d = digits()
                lo, hi, match = 0.02, 1.0, None
                for _ in range(7):  # the MACs target whose measured latency equals the latency prune's
                    mid = (lo + hi) / 2
                    g, st, _ = pruned(base, f"prune{{macs={mid:.4f} {common}}}")
                    # the latency-pruned model timed again beside it: both ratios from the same rounds
                    _, rl2, r = side_by_side([base, by_lat, g], runtime, threads, rounds=9)
                    if match is None or abs(r - rl2) < abs(match[1] - match[4]):
                        match = (mid, r, g, st, rl2)
                    if r > rl2:
                        hi = mid
                    else:
                        lo = mid
                acc0 = accuracy(base, d["x_test"], d["y_test"])
                acc_l = accuracy(by_lat, d["x_test"], d["y_test"])
                acc_m = accuracy(match[2], d["x_test"], d["y_test"])
                print(f"|   equal latency ({runtime}) | | | macs={match[0]:.3f}: latency {match[1]:.3f}, "
                      f"accuracy {100 * acc_m:.2f}% | {match[3]['macs']['ratio']:.3f} | latency {match[4]:.3f}, "
                      f"accuracy {100 * acc_l:.2f}% | {lstats['macs']['ratio']:.3f} | original accuracy "
                      f"{100 * acc0:.2f}% |")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
