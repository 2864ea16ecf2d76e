"""Pruning through layer norms: a small ConvNeXt-like net trained on the digits, pruned without fine-tuning.

The net (``graphslim.testing.layernorm_net``, seeded): a 2×2/2 stem conv → LayerNorm → 2 × [depthwise 3×3
→ LayerNorm → Dense(128) → GELU → Dense(32)] + residual → global pool → LayerNorm → softmax Dense. Its residual stream (32
channels, read by every LayerNorm) is one channel group; ``prune`` shrinks it with the layer norms'
mean and variance corrected to average over the original channels (removed ones counted as zero).

For each method and each MACs target, prints held-out accuracy (497 digits) and kept MACs, as the mean
over ``--draws`` calibration sets (range in brackets) for the data-aware methods, and, as an ablation,
the same with the layer-norm correction switched off (the statistics then average over the kept
channels only).

    .venv/bin/python benchmarks/prune_layernorm_digits.py [--targets 0.7,0.5] [--draws 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import graphslim  # noqa: E402
import graphslim.analysis.channel_apply as channel_apply  # noqa: E402
from graphslim.runtime import run  # noqa: E402
from graphslim.testing import digits, layernorm_net  # noqa: E402

METHODS = {
    "l1": "criterion=l1",
    "thinet": "criterion=thinet calib={calib} allocation=sensitivity",
    "thinet+rec": "criterion=thinet calib={calib} reconstruct=true allocation=sensitivity",
}


def train(path: str, d: dict, epochs: int) -> None:
    import keras

    model = layernorm_net((8, 8, 1), width=32, hidden=128, stem=2, activation="softmax")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(d["x_train"], d["y_train"], batch_size=32, epochs=epochs, verbose=0)
    model.export(path, verbose=False)
    keras.backend.clear_session()


@contextlib.contextmanager
def correction(on: bool):
    """The ablation: with ``on=False`` the layer-norm statistics are left averaging over the kept
    channels only."""
    if on:
        yield
        return
    saved = channel_apply._correct_stats
    channel_apply._correct_stats = lambda graph, entries, undo: None
    try:
        yield
    finally:
        channel_apply._correct_stats = saved


def accuracy(g, d) -> float:
    out = run(g, {"image": d["x_test"]})
    return float((next(iter(out.values())).argmax(1) == d["y_test"]).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.7,0.5")
    ap.add_argument("--draws", type=int, default=3, help="calibration sets (512 training digits each)")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)
    d = digits()
    tmp = tempfile.mkdtemp(prefix="prune_ln_digits_")
    model = os.path.join(tmp, "net")
    train(model, d, args.epochs)
    base = graphslim.load(model)
    acc0 = accuracy(base, d)
    calibs = []
    for seed in range(args.draws):
        idx = np.random.RandomState(seed).permutation(len(d["x_train"]))[:512]
        calibs.append(os.path.join(tmp, f"calib{seed}.npz"))
        np.savez(calibs[-1], image=d["x_train"][idx])
    print(f"## ConvNeXt-like digits net: {100 * acc0:.2f}% held out, {base.cost().macs:,} MACs, "
          f"residual stream {base.weight('stem/kernel').value.shape[-1]} channels")
    print("| method | kept MACs (target) | residual channels | accuracy | without the layer-norm correction |")
    print("|---|---|---|---|---|")
    for method, opts in METHODS.items():
        for target in [float(t) for t in args.targets.split(",")]:
            cells = {}
            for on in (True, False):
                accs, macs, width = [], [], []
                for calib in (calibs if "{calib}" in opts else calibs[:1]):
                    g = graphslim.load(model)
                    with correction(on):
                        graphslim.run_pipeline(g, f"prune{{macs={target} {opts.format(calib=calib)}}}")
                    accs.append(100 * accuracy(g, d))
                    macs.append(g.cost().macs / base.cost().macs)
                    width.append(g.weight("stem/kernel").value.shape[-1])
                text = f"{np.mean(accs):.2f}" + (f" ({min(accs):.2f}..{max(accs):.2f})" if len(accs) > 1 else "")
                cells[on] = (text, np.mean(macs), sorted(set(width)))
            print(f"| {method} | {cells[True][1]:.3f} ({target}) | {cells[True][2]} | {cells[True][0]} | "
                  f"{cells[False][0]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
