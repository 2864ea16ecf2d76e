"""prune plans (graphslim/analysis/prune_plan.py and prune's plan=/save_plan=).

Structure: the plan in the stats and in the file (JSON round trip, keep lists, options, fingerprint), the
report as a plan file, the option conflicts, save_plan refusing inputs. Numeric: a plan recorded on
resnet_digits keeps the same channels on a second checkpoint of the same architecture (weights perturbed,
written and re-loaded: "after more training") where scoring would pick others, and replayed on the original
gives bit-identical outputs; with calibration and reconstruction too. Refusals: a plan from resnet_digits on
mobilenet_tiny, a plan edited to another channel count, a missing layer, another kernel shape, a fingerprint
that does not match, each naming the file and the layer.
"""

import json
import re

import numpy as np
import pytest

import graphslim
from graphslim.analysis.prune_plan import PLAN_FORMAT, PrunePlan
from graphslim.errors import GraphslimError, OptionError
from graphslim.pipeline import PassManager, parse_pipeline
from graphslim.runtime import run
from graphslim.testing import conv_chain, digits, fixture_io, fixture_path

import tensorflow as tf

F = tf.float32


def prune(g, text):
    """Run one prune pass; returns its stats."""
    return PassManager(text).run(g).passes[-1]["stats"]


_chain = conv_chain


def _kept(stats) -> dict:
    """{sources of the group: kept group channels}, from a prune's stats."""
    return {tuple(r["sources"]): sorted(set(range(r["channels"][0])) - set(r["removed"])) for r in stats["groups"]}


@pytest.fixture(scope="module")
def resnet():
    return graphslim.load(fixture_path("resnet_digits"))


@pytest.fixture(scope="module")
def recorded(resnet, tmp_path_factory):
    """resnet_digits pruned with ratio=0.3 l1 (data-free): the plan file, the stats, the pruned graph's
    outputs on the fixture inputs."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    g = resnet.copy()
    st = prune(g, f"prune{{ratio=0.3 criterion=l1 save_plan={path}}}")
    return path, st, run(g, fixture_io("resnet_digits")[0]), g


@pytest.fixture(scope="module")
def retrained(resnet, tmp_path_factory):
    """A second checkpoint of resnet_digits: every float weight scaled by exp(0.3·N(0,1)) (signs and
    positive variances kept), written as a SavedModel and loaded again."""
    g = resnet.copy()
    rng = np.random.RandomState(1)
    for name, w in sorted(g.weights.items()):
        if w.value.dtype.kind == "f":
            g.set_weight(name, (w.value * np.exp(0.3 * rng.randn(*w.value.shape))).astype(w.value.dtype))
    out = tmp_path_factory.mktemp("ckpt") / "resnet_digits_more_training"
    graphslim.save(g, out)
    return graphslim.load(out)


# ------------------------------------------------------------------------------------------ structure
def test_plan_is_in_the_stats_and_round_trips():
    g = _chain((16, 8))
    st = prune(g.copy(), "prune{ratio=0.5 round_to=2}")
    plan = st["plan"]
    assert plan["format"] == PLAN_FORMAT and plan["version"] == 1 and plan["criterion"] == "l1"
    assert plan["options"] == {"ratio": 0.5, "round_to": 2}
    assert plan["fingerprint"].startswith("sha256:")
    assert [(p["layer"], p["axis"], p["channels"], len(p["keep"])) for p in plan["groups"]] == \
        [("c0/kernel", 3, 16, 8), ("c1/kernel", 3, 8, 4)]
    (p0, p1) = plan["groups"]
    assert p0["keep"] == sorted(set(range(16)) - set(st["groups"][0]["removed"]))
    assert p0["members"] == [
        {"weight": "c0/kernel", "axis": 3, "role": "source", "ops": ["Conv2D"], "shape": [3, 3, 3, 16]},
        {"weight": "c1/kernel", "axis": 2, "role": "sink", "ops": ["Conv2D"], "shape": [3, 3, 16, 8]}]
    again = PrunePlan.from_json(json.loads(json.dumps(plan)))
    assert again.to_json() == plan


def test_explicit_keep_list_is_recorded_as_given():
    g = _chain((16, 8))
    st = prune(g, 'prune{layer="c0:keep=1,4,9"}')
    (p,) = st["plan"]["groups"]
    assert (p["layer"], p["keep"]) == ("c0/kernel", [1, 4, 9])
    assert st["plan"]["options"] == {"layer": ["c0:keep=1,4,9"]}


def test_replay_on_an_inline_graph_and_save_plan(tmp_path):
    g = _chain((16, 8))
    path = tmp_path / "p.json"
    h = g.copy()
    st = prune(h, f"prune{{ratio=0.4 save_plan={path}}}")
    assert json.loads(path.read_text()) == st["plan"]
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left beside it
    other = _chain((16, 8), seed=5)  # same architecture, other weights: l1 would keep others
    st2 = prune(other, f"prune{{plan={path}}}")
    assert _kept(st2) == _kept(st) and st2["target"] == {"plan": str(path), "fingerprint": st["plan"]["fingerprint"]}
    assert st2["plan"] == st["plan"]  # the same architecture gives the same plan back
    keep0 = st["plan"]["groups"][0]["keep"]
    np.testing.assert_array_equal(other.weight("c0/kernel").value,
                                  _chain((16, 8), seed=5).weight("c0/kernel").value[..., keep0])
    assert _kept(prune(_chain((16, 8), seed=5), "prune{ratio=0.4}")) != _kept(st)


def test_report_is_a_plan_file(tmp_path):
    g = _chain((16, 8))
    rep = PassManager("prune{ratio=0.25}").run(g.copy()).to_dict()
    path = tmp_path / "report.json"
    path.write_text(json.dumps(rep))
    st = prune(g.copy(), f"prune{{plan={path}}}")
    assert st["plan"] == rep["passes"][0]["stats"]["plan"]
    rep2 = PassManager("prune{ratio=0.25},prune{ratio=0.25}").run(g.copy()).to_dict()
    path.write_text(json.dumps(rep2))
    with pytest.raises(GraphslimError, match=r"report with 2 prune plans; extract one"):
        prune(g.copy(), f"prune{{plan={path}}}")


@pytest.mark.parametrize("text,msg", [
    ("prune{plan=p.json ratio=0.3}", r"plan= applies the channels recorded in the plan; drop ratio="),
    ("prune{plan=p.json layer=conv1:3 exclude=c*}", r"drop layer=, exclude="),
    ("prune{plan=p.json criterion=thinet calib=c.npz}", r"drop criterion="),
    ("prune{plan=p.json round_to=8 allocation=uniform}", r"drop round_to=, allocation="),
])
def test_plan_option_conflicts(text, msg):
    with pytest.raises(OptionError, match=msg):
        parse_pipeline(text)


def test_plan_options_round_trip():
    text = "prune{calib=c.npz reconstruct=true plan=/tmp/a-b/plan.json save_plan=out/plan2.json}"
    assert str(parse_pipeline(text)) == text


def test_save_plan_refuses_inputs_and_directories(tmp_path, recorded):
    path = recorded[0]
    g = _chain((16, 8))
    with pytest.raises(GraphslimError, match=r"save_plan=.*plan.json is .*an input of this run"):
        prune(g.copy(), f"prune{{plan={path} save_plan={path}}}")
    m = graphslim.load(fixture_path("vgg_digits"))
    inside = fixture_path("vgg_digits") / "plan.json"
    with pytest.raises(GraphslimError, match=r"is inside .*vgg_digits, an input of this run"):
        prune(m, f"prune{{ratio=0.3 save_plan={inside}}}")
    assert not inside.exists()
    with pytest.raises(GraphslimError, match=r"is a directory"):
        prune(g.copy(), f"prune{{ratio=0.3 save_plan={tmp_path}}}")
    with pytest.raises(GraphslimError, match=r"directory .*nowhere does not exist"):
        prune(g.copy(), f"prune{{ratio=0.3 save_plan={tmp_path / 'nowhere' / 'p.json'}}}")


# ------------------------------------------------------------------------------------------ replay
def test_replay_on_a_second_checkpoint_keeps_the_same_channels(recorded, retrained):
    path, st, _, pruned = recorded
    fresh = prune(retrained.copy(), "prune{ratio=0.3 criterion=l1}")
    assert _kept(fresh) != _kept(st), "the perturbation should change what l1 keeps"
    h = retrained.copy()
    st2 = prune(h, f"prune{{plan={path}}}")
    assert _kept(st2) == _kept(st) and st2["pruned_groups"] == st["pruned_groups"] >= 3
    assert [(p["group"], p["layer"], p["keep"]) for p in st2["plan"]["groups"]] == \
        [(p["group"], p["layer"], p["keep"]) for p in st["plan"]["groups"]]
    assert st2["plan"] == st["plan"] and st2["criterion"] == "l1"
    for name, w in pruned.weights.items():
        assert h.weight(name).shape == w.shape, name
    # the retrained weights, sliced at the recorded channels along every axis a group shrinks (all of
    # resnet_digits' member axes map group channel c to position c)
    axes: dict = {}
    for p in st["plan"]["groups"]:
        for m in p["members"]:
            assert m["shape"][m["axis"]] == p["channels"]
            axes.setdefault(m["weight"], []).append((m["axis"], p["keep"]))
    assert len(axes) > 10
    for name, cuts in axes.items():
        want = retrained.weight(name).value
        for axis, keep in cuts:
            want = np.take(want, keep, axis=axis)
        np.testing.assert_array_equal(h.weight(name).value, want, err_msg=name)
    assert run(h, fixture_io("resnet_digits")[0])["output_0"].shape == (4, 10)


def test_replay_on_the_original_is_bit_identical(recorded, resnet):
    path, st, outputs, pruned = recorded
    g = resnet.copy()
    st2 = prune(g, f"prune{{plan={path}}}")
    assert _kept(st2) == _kept(st)
    for name, w in pruned.weights.items():
        assert np.array_equal(g.weight(name).value, w.value), name
    got = run(g, fixture_io("resnet_digits")[0])
    assert got.keys() == outputs.keys()
    assert all(np.array_equal(got[k], outputs[k]) for k in outputs)


def test_replay_with_calibration_and_reconstruction(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=digits()["x_train"][:128])
    base = graphslim.load(fixture_path("vgg_digits"))
    PassManager("fold-batchnorm,dce").run(base)
    g = base.copy()
    plan = tmp_path / "plan.json"
    st = prune(g, f"prune{{macs=0.5 criterion=thinet calib={calib} reconstruct=true calib_samples=128 "
                  f"save_plan={plan}}}")
    h = base.copy()
    st2 = prune(h, f"prune{{plan={plan} calib={calib} reconstruct=true calib_samples=128}}")
    assert _kept(st2) == _kept(st) and st2["reconstructed"]
    assert [r.get("error_after") for r in st2["layers"]] == [r.get("error_after") for r in st["layers"]]
    for name, w in g.weights.items():
        assert np.array_equal(h.weight(name).value, w.value), name
    x = {"image": digits()["x_test"][:64]}
    assert np.array_equal(run(h, x)["output_0"], run(g, x)["output_0"])


# ------------------------------------------------------------------------------------------ refusals
def _plan_error(path, layer_pattern=r"[^)]+"):
    return rf"plan {re.escape(str(path))} does not fit this model: group g\d+ \(layer {layer_pattern}\): "


def test_plan_of_another_architecture_is_refused(recorded):
    path = recorded[0]
    g = graphslim.load(fixture_path("mobilenet_tiny"))
    with pytest.raises(GraphslimError, match=_plan_error(path)) as err:
        prune(g, f"prune{{plan={path}}}")
    assert "same architecture" in str(err.value)


def _edited(src, dst, edit):
    data = json.loads(src.read_text())
    edit(data)
    dst.write_text(json.dumps(data))
    return dst


def test_plan_edited_to_another_channel_count_is_refused(recorded, resnet, tmp_path):
    path, st = recorded[:2]
    p0 = st["plan"]["groups"][0]
    bad = _edited(path, tmp_path / "bad.json", lambda d: d["groups"][0].update(channels=p0["channels"] + 8))
    with pytest.raises(GraphslimError, match=_plan_error(bad, re.escape(p0["layer"])) + rf"the plan's group has "
                       rf"{p0['channels'] + 8} channels, the model's \(g\d+\) has {p0['channels']}"):
        prune(resnet.copy(), f"prune{{plan={bad}}}")


def test_pruned_model_is_refused(recorded):
    path, st, _, pruned = recorded
    with pytest.raises(GraphslimError, match=_plan_error(path) + r"the plan's group has \d+ channels, the model's"):
        prune(pruned.copy(), f"prune{{plan={path}}}")


@pytest.mark.parametrize("what", ["missing", "shape", "op", "fingerprint", "keep"])
def test_inline_mismatches_name_the_layer(tmp_path, what):
    path = tmp_path / "p.json"
    prune(_chain((16, 8)), f"prune{{ratio=0.5 save_plan={path}}}")
    target = _chain((16, 8), k=5) if what == "shape" else _chain((16, 8))
    if what == "missing":
        path = _edited(path, tmp_path / "e.json", lambda d: d["groups"][0].update(layer="c9/kernel"))
        msg = _plan_error(path, "c9/kernel") + "the model has no layer c9/kernel"
    elif what == "shape":
        msg = _plan_error(path, "c0/kernel") + r"c0/kernel has shape \[3, 3, 3, 16\] in the plan, \[5, 5, 3, 16\]"
    elif what == "op":
        path = _edited(path, tmp_path / "e.json",
                       lambda d: d["groups"][0]["members"][0].update(ops=["DepthwiseConv2dNative"]))
        msg = _plan_error(path, "c0/kernel") + "c0/kernel is read by DepthwiseConv2dNative in the plan, by Conv2D"
    elif what == "fingerprint":
        path = _edited(path, tmp_path / "e.json", lambda d: d.update(fingerprint="sha256:0"))
        msg = rf"plan {re.escape(str(path))}: its fingerprint sha256:0 does not match the layers it lists"
    else:
        path = _edited(path, tmp_path / "e.json", lambda d: d["groups"][1].update(keep=[0, 99]))
        msg = _plan_error(path, "c1/kernel") + r"keep: channel 99 is out of range"
    with pytest.raises(GraphslimError, match=msg):
        prune(target, f"prune{{plan={path}}}")


@pytest.mark.parametrize("content,msg", [
    ("{nope", "is not JSON"),
    ('{"format": "something"}', "is not a prune plan"),
    ('{"format": "graphslim.prune_plan", "version": 7}', "has version 7"),
    ('{"format": "graphslim.prune_plan", "version": 1, "fingerprint": "x", "groups": [{"group": "g0"}]}',
     "is damaged: KeyError"),
])
def test_unreadable_plan_files(tmp_path, content, msg):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(GraphslimError, match=rf"plan file {re.escape(str(path))} {msg}"):
        prune(_chain(), f"prune{{plan={path}}}")
    with pytest.raises(GraphslimError, match=r"cannot read plan file .*missing.json"):
        prune(_chain(), f"prune{{plan={tmp_path / 'missing.json'}}}")
