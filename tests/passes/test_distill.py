"""distill pass (passes/distill.py, graphslim/analysis/distill.py; issue 16, item 1).

On the trained digits fixtures: after a crude prune (L1, half the MACs, no reconstruction) distill on
unlabeled training digits lowers the held-out loss against the original and raises held-out accuracy on
the test digits; a learning rate that only diverges leaves the weights exactly as they were (the best
held-out checkpoint is the start); Ctrl-C ends training with the best weights so far and the pipeline
goes on; labels add the task loss; bad calibration data and labels are clear errors naming the key.
"""

import os
import signal

import numpy as np
import pytest

import graphslim
from graphslim.analysis.calibration import CalibrationError
from graphslim.analysis.distill import feature_points
from graphslim.errors import GraphslimError, PipelineError
from graphslim.pipeline import PassManager
from graphslim.pipeline.progress import listen
from graphslim.runtime import run
from graphslim.testing import digits, fixture_path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    d = digits()
    path = tmp_path_factory.mktemp("distill") / "digits.npz"
    np.savez(path, image=d["x_train"][:512], labels=d["y_train"][:512].astype(np.int64))
    return str(path)


@pytest.fixture(scope="module")
def original():
    g = graphslim.load(fixture_path("resnet_digits"))
    PassManager("fold-batchnorm,dce").run(g)
    return g


def accuracy(g) -> float:
    d = digits()
    return float((run(g, {"image": d["x_test"]})["output_0"].argmax(1) == d["y_test"]).mean())


def pruned(original):
    g = original.copy()
    PassManager("prune{macs=0.5 criterion=l1}").run(g)
    return g


def test_distill_recovers_a_crudely_pruned_resnet(original, calib):
    acc0 = accuracy(original)
    g = original.copy()
    report = PassManager(f"prune{{macs=0.5 criterion=l1}},distill{{calib={calib} steps=150 lr=2e-3}}").run(g)
    st = report.passes[-1]["stats"]
    before, after = st["heldout"]["before"], st["heldout"]["after"]
    assert st["best_step"] > 0 and after["loss"] < 0.7 * before["loss"], st["curve"]
    assert after["agreement"] >= before["agreement"]
    kinds = {t["kind"] for t in st["terms"]}
    assert "kl" in kinds  # the softmax output, matched on its logits
    crude = pruned(original)
    acc_crude, acc_distilled = accuracy(crude), accuracy(g)
    assert acc_distilled > acc_crude + 0.02, (acc0, acc_crude, acc_distilled)
    g.verify()


def test_blockwise_trains_part_by_part_and_never_ends_worse(original, calib):
    g = original.copy()
    report = PassManager(f"prune{{macs=0.5 criterion=l1}},distill{{calib={calib} steps=120 blockwise=true}}").run(g)
    st = report.passes[-1]["stats"]
    assert st["blockwise"] and len(st["phases"]) >= 3
    feature_parts = [p for p in st["phases"] if p["terms"] and p["terms"][0]["kind"] == "l2"]
    assert feature_parts and all(len(p["terms"]) == 1 for p in feature_parts)  # each part: its boundary
    assert st["heldout"]["after"]["loss"] <= st["heldout"]["before"]["loss"]
    g.verify()


def test_a_diverging_run_keeps_the_starting_weights(original, calib):
    g = pruned(original)
    start = {k: w.value.copy() for k, w in g.weights.items()}
    teacher = original.copy()
    from graphslim.analysis.distill import DistillConfig, distill
    from graphslim.analysis.calibration import load_calibration

    data = load_calibration(calib, g, max_examples=256)
    st = distill(g, teacher, data, None, DistillConfig(steps=20, lr=50.0, eval_every=5, patience=2))
    assert st["best_step"] == 0 and st["heldout"]["after"] == st["heldout"]["before"]
    assert all(np.array_equal(start[k], w.value) for k, w in g.weights.items())
    result = PassManager(f"distill{{calib={calib} steps=20 lr=50 eval_every=5 patience=2 teacher="
                         f"{fixture_path('resnet_digits')}}}").run(g)
    assert any("never improved" in w for w in result.passes[-1]["warnings"])


def test_ctrl_c_ends_training_with_the_best_weights_so_far(original, calib, tmp_path):
    """A real SIGINT to this process at step 12: training stops, the best weights so far stay, the
    pipeline goes on (dce runs after it) and the model is written (the interrupt was handled)."""
    from graphslim import signals

    signals.watch()
    g = original.copy()
    seen = []

    def on_progress(text):
        seen.append(text)
        if text.startswith("distill: step 12/"):
            os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C as a terminal delivers it: Python's handler (a suite run as a background job of a
    # non-interactive shell starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with listen(on_progress):
            report = PassManager(f"prune{{macs=0.5 criterion=l1}},distill{{calib={calib} steps=200 eval_every=4}},"
                                 "dce").run(g)
    finally:
        signal.signal(signal.SIGINT, previous)
    st = report.passes[1]["stats"]
    assert st["interrupted"] and 12 <= st["steps"] < 200 and st["best_step"] <= st["steps"]
    assert st["heldout"]["after"]["loss"] <= st["heldout"]["before"]["loss"]
    assert report.passes[2]["name"] == "dce"
    assert any("interrupted at step" in w for w in report.passes[1]["warnings"])
    graphslim.save(g, tmp_path / "out")  # not refused: distill handled the Ctrl-C
    assert (tmp_path / "out" / "saved_model.pb").exists()


def test_labels_add_the_task_loss(original, calib):
    g = pruned(original)
    st = graphslim.run_pipeline(g, f"distill{{calib={calib} labels=labels steps=30 features=0 teacher="
                                   f"{fixture_path('resnet_digits')}}}").passes[-1]["stats"]
    assert [(t["key"], t["kind"]) for t in st["terms"]] == [("output:output_0", "kl"), ("logits:output_0", "l2"),
                                                            ("labels", "label")]
    assert 0 <= st["heldout"]["after"]["accuracy"] <= 1 and "accuracy" in st["heldout"]["before"]


def test_feature_points_are_shared_tensors_on_every_path(original):
    points = feature_points(original, original, 50)
    assert points, "a ResNet has tensors every path goes through (the block outputs)"
    for t in points:
        assert original.shape(t) is not None and len(original.shape(t)) >= 2
    g = pruned(original)
    for t in feature_points(g, original, 50):
        assert g.shape(t)[1:] == original.shape(t)[1:]
    assert len(feature_points(original, original, 3)) <= 3


@pytest.mark.parametrize("passes", ["prune{macs=0.5 criterion=l1}",
                                    "prune{ratio=0.25 criterion=l1},prune{ratio=0.25 criterion=l2}"])
def test_pruned_tensors_are_matched_on_their_kept_channels(original, passes):
    """prune records which of the original's channels each shrunk activation still holds (composed over
    successive prunes); blockwise distill's feature points use them: the stem conv's output, whose
    input is the image, is exactly the original's kept channels."""
    from graphslim.analysis.distill import kept_selection

    g = original.copy()
    PassManager(passes).run(g)
    points = feature_points(g, original, 50, pruned=True)
    assert len(points) > len(feature_points(g, original, 50))
    x = {"image": digits()["x_test"][:32]}
    mine, theirs = run(g, x, fetch=points), run(original, x, fetch=points)
    exact = 0
    for t in points:
        sel = kept_selection(g, original, t)
        ref = theirs[t] if sel is None else np.take(theirs[t], sel[1], axis=sel[0])
        assert mine[t].shape == ref.shape
        exact += bool(np.allclose(mine[t], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()))
    assert exact >= 1


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("labels,match", [
    ("nolabels", r"labels='nolabels'.*no array 'nolabels' \(the file holds image, labels, floats, short, big\)"
                 r".*integer class indices of shape \[512\]"),
    ("floats", r"labels='floats'.*float32 \[512\]; it needs integer class indices of shape \[512\]"),
    ("short", r"labels='short'.*int64 \[10\]; it needs integer class indices of shape \[512\]"),
    ("big", r"labels='big'.*holds classes 0\.\.10; it needs .* in 0\.\.9 \(output 'output_0' has 10 classes\)"),
])
def test_bad_labels_name_the_key_and_the_expected_shape(original, tmp_path, labels, match):
    d = digits()
    path = tmp_path / "c.npz"
    big = d["y_train"][:512].astype(np.int64)
    big[0] = 10
    np.savez(path, image=d["x_train"][:512], labels=d["y_train"][:512].astype(np.int64),
             floats=d["y_train"][:512].astype(np.float32), short=np.zeros(10, np.int64), big=big)
    g = pruned(original)
    with pytest.raises(PipelineError, match=match) as info:
        PassManager(f"distill{{calib={path} labels={labels} teacher={fixture_path('resnet_digits')}}}").run(g)
    assert isinstance(info.value.__cause__, CalibrationError)


def test_bad_calibration_data_and_options(original, tmp_path):
    d = digits()
    g = pruned(original)
    teacher = f"teacher={fixture_path('resnet_digits')}"
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=d["x_train"][:64, :4])
    with pytest.raises(PipelineError, match=r"array 'image' has shape \[64, 4, 8, 1\], which does not fit"):
        PassManager(f"distill{{calib={wrong} {teacher}}}").run(g)
    one = tmp_path / "one.npz"
    np.savez(one, image=d["x_train"][:1])
    with pytest.raises(PipelineError, match="1 example\\(s\\) give"):
        PassManager(f"distill{{calib={one} {teacher}}}").run(g)
    with pytest.raises(PipelineError, match="distill needs calibration inputs: distill\\{calib=data.npz\\}"):
        PassManager(f"distill{{{teacher}}}").run(g)
    with pytest.raises(GraphslimError, match="holdout must be in \\(0, 1\\)"):
        PassManager("distill{holdout=1.5}")
    from graphslim.analysis.distill import DistillConfig, distill

    with pytest.raises(GraphslimError, match="nothing to match"):
        other = original.copy()
        other.outputs[0].name = "renamed"
        distill(g, other, {"image": d["x_train"][:64]}, None, DistillConfig(steps=1))
