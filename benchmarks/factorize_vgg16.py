"""Factorization on Keras Applications (issue 5): full-rank exactness on ResNet50 and VGG16, and VGG16
with ``energy=`` chosen to halve the conv MACs: MACs ratio and measured latency ratio of the SavedModels.

    python benchmarks/factorize_vgg16.py exact  [--size 224]          # ResNet50 + VGG16, weights=None
    python benchmarks/factorize_vgg16.py speed  [--size 224] [--runs 15]
    python benchmarks/factorize_vgg16.py        # both

``exact``: ``separable`` and ``lowrank`` (``spatial=true``: every conv and dense layer) at full rank,
with ``min_macs_saving=none``; compares the logits (the Softmax input) and the probabilities of the
rewritten IR with the original's on two random images (rtol 1e-4, atol 1e-4).

``speed``: the energy is the largest whose per-layer ranks keep at most half of VGG16's conv MACs
(computed from the per-channel singular values, exactly as the pass chooses ranks). SavedModels
written by the same emitter: the original, ``separable{energy=E}`` (cost=macs) and
``separable{energy=E cost=latency}``, ``tucker{macs=0.5}`` with and without ``cost=latency``, and
``separable{energy=E cost=latency},shuffle{groups=4 cost=latency}``. Latency: batch 1, TensorFlow intra-op threads 2, inter-op 1,
median of interleaved runs after warm-up; ratios against the original are printed side by side. Every
``cost=latency`` model must never be slower than the original (allowing for timing noise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(2)
tf.config.threading.set_inter_op_parallelism_threads(1)

import graphslim  # noqa: E402
from graphslim.analysis.factorize import channel_svd, choose_rank, kept_energy  # noqa: E402
from graphslim.runtime import Runner  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-4)


def export(arch: str, where: Path, size: int) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None, input_shape=(size, size, 3))
    path = where / arch
    model.export(str(path), verbose=False)
    del model
    keras.backend.clear_session()
    return path


def logits_and_output(g) -> list[str]:
    out = g.outputs[0].tensor
    node = g.producer(out)
    fetch = [str(out)]
    if node.op == "Softmax":
        fetch.append(str(g.input(node, 0)))
    return fetch


def run_fetch(g, x, fetch) -> dict:
    r = Runner(g)
    try:
        return r.run({g.inputs[0].name: x}, fetch=fetch)
    finally:
        r.close()


def exact(size: int) -> bool:
    ok = True
    rng = np.random.default_rng(0)
    print(f"## full-rank exactness (rtol {TOL['rtol']}, atol {TOL['atol']}), weights=None, {size}x{size}, 2 images")
    print(f"{'model':9} {'pipeline':58} {'factorized':>10} {'skipped':>8} {'max|logits|':>11} "
          f"{'max|Δ| logits':>14} {'max|Δ| probs':>13} "
          f"{'MACs after/before':>18} {'pass s':>7}  result")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("VGG16", "ResNet50"):
            src = export(arch, Path(tmp), size)
            g0 = graphslim.load(src)
            x = rng.normal(size=(2, size, size, 3)).astype(np.float32) * 50
            fetch = logits_and_output(g0)
            ref = run_fetch(g0, x, fetch)
            for text in ("separable{rank=1000 min_macs_saving=none}",
                         "lowrank{rank=100000 min_macs_saving=none spatial=true}"):
                g = g0.copy()
                t = time.perf_counter()
                rep = graphslim.run_pipeline(g, text)
                secs = time.perf_counter() - t
                st = rep.passes[0]["stats"]
                got = run_fetch(g, x, fetch)
                diffs = [float(np.abs(got[k] - ref[k]).max()) for k in fetch]
                good = all(np.allclose(got[k], ref[k], **TOL) for k in fetch)
                ok &= good
                dl = diffs[1] if len(diffs) > 1 else float("nan")
                scale = float(np.abs(ref[fetch[-1]]).max())
                print(f"{arch:9} {text:58} {st['factorized']:10d} {st['skipped']:8d} {scale:11.3g} {dl:14.3g} "
                      f"{diffs[0]:13.3g} "
                      f"{st['macs_after'] / st['macs_before']:18.3f} {secs:7.1f}  {'exact' if good else 'NOT EXACT'}")
                reasons = sorted({r["reason"] for r in st["layers"] if r["action"] != "factorized"})
                if reasons:
                    print(f"{'':9} skipped because: {'; '.join(reasons)}")
                del g
            del g0
    return ok


def conv_layers(g):
    return [n for n in g.nodes(op="Conv2D") if g.weight_of(n, 1) is not None]


def energy_for_half_conv_macs(g) -> tuple[float, float]:
    """The largest energy whose ranks (chosen like the pass does) keep ≤ 50% of the conv MACs."""
    layers = []
    total = 0
    for n in conv_layers(g):
        w = g.weight_of(n, 1).value
        kh, kw, c, cout = w.shape
        pos = n.shapes[0][1] * n.shapes[0][2]
        kept = kept_energy(channel_svd(w)[1])
        layers.append((kept, pos, kh * kw, c, cout))
        total += pos * kh * kw * c * cout

    def macs(energy):
        out = 0
        for kept, pos, k2, c, cout in layers:
            m = choose_rank(kept, energy=energy)
            before, after = pos * k2 * c * cout, pos * (k2 * c * m + c * m * cout)
            out += after if after < before else before
        return out

    cands = sorted({float(k) for kept, *_ in layers for k in kept[1:]})
    best = max(e for e in cands if macs(e) <= total / 2)
    return best, macs(best) / total


def conv_macs(g) -> int:
    cost = g.cost().by_node()
    return sum(c.macs for c in cost.values() if c.op in ("Conv2D", "DepthwiseConv2dNative"))


def speed(size: int, runs: int) -> bool:
    print(f"\n## VGG16 (weights=None, {size}x{size}): energy= halving the conv MACs; latency batch 1, 2 threads, "
          f"median of {runs} interleaved runs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = export("VGG16", tmp, size)
        g0 = graphslim.load(src)
        energy, predicted = energy_for_half_conv_macs(g0)
        base_conv, base_all = conv_macs(g0), g0.cost().macs
        print(f"energy={energy:.6g} (predicted conv MACs kept {predicted:.3f})")
        models = {"original": (g0, None)}
        for label, text in (("separable cost=macs", f"separable{{energy={energy!r}}}"),
                            ("separable cost=latency", f"separable{{energy={energy!r} cost=latency}}"),
                            ("tucker cost=macs", "tucker{macs=0.5}"),
                            ("tucker cost=latency", "tucker{macs=0.5 cost=latency}"),
                            ("separable+shuffle cost=latency",
                             f"separable{{energy={energy!r} cost=latency}},shuffle{{groups=4 cost=latency}}")):
            g = g0.copy()
            t = time.perf_counter()
            rep = graphslim.run_pipeline(g, text)
            st = rep.passes[-1]["stats"]
            print(f"{label}: pass took {time.perf_counter() - t:.1f} s; {st['factorized']} of "
                  f"{len(st['layers'])} candidate layers rewritten")
            for r in st["layers"]:
                times = f" {r['ms_before']:.2f} ms -> {r['ms_after']:.2f} ms" if "ms_before" in r else ""
                what = (f"rank {r.get('rank', r.get('groups'))}/{r.get('full_rank', '-')}" if r["action"] == "factorized"
                        else r["reason"])
                print(f"    {r['kernel']:24} {what:70.70}{times}")
            models[label] = (g, st)
        paths = {}
        for label, (g, _) in models.items():
            paths[label] = graphslim.save(g, tmp / label.replace(" ", "_").replace("=", "_"))
        fns = {label: tf.saved_model.load(str(p)).signatures["serving_default"] for label, p in paths.items()}
        x = tf.constant(np.random.default_rng(1).normal(size=(1, size, size, 3)).astype(np.float32) * 50)
        name = g0.inputs[0].name
        outs = {label: next(iter(f(**{name: x}).values())).numpy() for label, f in fns.items()}
        for _ in range(2):
            for f in fns.values():
                f(**{name: x})
        times = {label: [] for label in fns}
        for _ in range(runs):
            for label, f in fns.items():
                t = time.perf_counter()
                f(**{name: x})
                times[label].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{'model':24} {'conv MACs':>14} {'ratio':>6} {'all MACs':>14} {'ratio':>6} {'latency ms':>11} "
              f"{'ratio':>6} {'top-1 = orig':>12}")
        ok = True
        for label, (g, _) in models.items():
            cm, am = conv_macs(g), g.cost().macs
            same = bool(outs[label].argmax() == outs["original"].argmax())
            print(f"{label:24} {cm:14d} {cm / base_conv:6.3f} {am:14d} {am / base_all:6.3f} {med[label] * 1e3:11.1f} "
                  f"{med[label] / med['original']:6.3f} {str(same):>12}")
        for label in [k for k in models if k.endswith("cost=latency")]:
            ratio = med[label] / med["original"]
            never_slower = ratio <= 1.03
            print(f"{label} vs original: {ratio:.3f}x -> "
                  f"{'not slower (within 3% timing noise)' if never_slower else 'SLOWER'}")
            ok &= never_slower
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=["exact", "speed", "all"], default="all")
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--runs", type=int, default=15, help="timed runs per model (interleaved)")
    args = ap.parse_args()
    ok = True
    if args.what in ("exact", "all"):
        ok &= exact(args.size)
    if args.what in ("speed", "all"):
        ok &= speed(args.size, args.runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
