"""Channel-dependency analysis (graphslim/analysis/channels.py).

Three layers: tiny graphs built inline (members, axes and index maps per rule family, blockers);
the fixtures (residual coupling, Concat offsets, depthwise, and the numeric proof: removing channels
whose contribution is zero leaves the outputs unchanged, reordering all channels too); Keras
Applications MobileNetV2 and ResNet50 (no blockers).
"""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

import graphslim
from graphslim.testing import zero_produced_channels, zero_slices
from graphslim.analysis.channels import (CHANNEL_RULES, ChannelError, IndexMap, apply_keep, apply_keeps,
                                         channel_groups, format_groups, group_for)
from graphslim.ir.graph import Graph, SignatureArg, Tensor, as_tensor
from graphslim.pipeline import PassManager
from graphslim.runtime import run
from graphslim.testing import assert_close, fixture_index, fixture_io, fixture_path
from graphslim.testing import layernorm_net as build_layernorm_net

F = tf.float32


# ------------------------------------------------------------------------------------------ helpers
class Net:
    """Builds small graphs with the IR API."""

    def __init__(self, shape, name="x"):
        self.g = Graph()
        self.rng = np.random.RandomState(0)
        self.g.add_node(name, "Placeholder", attrs={"dtype": F, "shape": tuple(shape)})
        self.g.inputs.append(SignatureArg(name, Tensor(name, 0)))
        self.x = Tensor(name, 0)
        self.shape = tuple(shape)

    def w(self, name, shape):
        return self.g.add_weight(name, self.rng.randn(*shape).astype("f")).output(0)

    def c(self, name, value, dtype=np.int32):
        return self.g.add_node(name, "Const", attrs={"dtype": tf.as_dtype(dtype),
                                                     "value": np.asarray(value, dtype)}).output(0)

    def op(self, name, op, *inputs, **attrs):
        if "T" not in attrs and not attrs.pop("no_t", False):
            attrs["T"] = F
        return self.g.add_node(name, op, inputs=list(inputs), attrs=attrs).output(0)

    def conv(self, name, x, cin, cout, k=1, bias=True):
        y = self.op(f"{name}/Conv2D", "Conv2D", x, self.w(f"{name}/kernel", (k, k, cin, cout)),
                    strides=[1, 1, 1, 1], padding="SAME")
        return self.op(f"{name}/BiasAdd", "BiasAdd", y, self.w(f"{name}/bias", (cout,))) if bias else y

    def dense(self, name, x, cin, cout, transpose_b=False):
        kshape = (cout, cin) if transpose_b else (cin, cout)
        y = self.op(f"{name}/MatMul", "MatMul", x, self.w(f"{name}/kernel", kshape), transpose_b=transpose_b)
        return self.op(f"{name}/BiasAdd", "BiasAdd", y, self.w(f"{name}/bias", (cout,)))

    def relu(self, name, x):
        return self.op(name, "Relu", x)

    def reshape(self, name, x, shape):
        return self.op(name, "Reshape", x, self.c(f"{name}/shape", shape), Tshape=tf.int32)

    def done(self, *outs):
        for i, t in enumerate(outs):
            self.g.outputs.append(SignatureArg(f"y{i}", as_tensor(t)))
        self.g.infer_shapes()
        return self.g

    def feed(self, batch=2, seed=1):
        shape = tuple(batch if d is None else d for d in self.shape)
        return {"x": np.random.RandomState(seed).randn(*shape).astype("f")}


def _member_tensors(g, grp):
    """Activation members whose kept channels must keep their values (not after a renormalization)."""
    renorm = set(grp.renormalized_by)
    return [m for m in grp.members_of("tensor") if not renorm & g.ancestors([m.tensor.node])]


def check_keep(g, grp, keep, feed):
    """apply_keep on a copy of ``g`` whose sinks ignore the removed channels (their slices zeroed, so
    that a conv reading the group and writing into it, like a residual branch, keeps its values):
    afterwards every activation member equals the original's value at the member's positions (the index
    maps are right), and the graph verifies. Returns the changed copy."""
    members = _member_tensors(g, grp)
    fetch = [m.name for m in members]
    z = g.copy()
    removed = sorted(set(range(grp.size)) - set(keep))
    if removed:
        for m in grp.sinks:
            zero_slices(z, m, removed)
    before = run(z, feed, fetch=fetch)
    h = z.copy()
    apply_keep(h, grp, keep)
    h.verify()
    after = run(h, feed, fetch=fetch)
    for m in members:
        want = np.take(before[m.name], m.positions(keep), axis=m.axis)
        np.testing.assert_allclose(after[m.name], want, rtol=1e-5, atol=1e-5, err_msg=f"{m.name} axis {m.axis}")
    return h


def rows(grp, name, axis=None):
    return grp.member(name, axis).index_map.tolist()


# ------------------------------------------------------------------------------------------ structure
def test_conv_bias_relu_conv():
    n = Net((None, 5, 5, 3))
    y = n.relu("r1", n.conv("c1", n.x, 3, 4))
    g = n.done(n.conv("c2", y, 4, 2))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert grp.size == 4 and grp.prunable and not grp.blockers
    assert [(m.name, m.axis) for m in grp.sources] == [("c1/kernel", 3)]
    assert [(m.name, m.axis) for m in grp.sinks] == [("c2/kernel", 2)]
    assert grp.member("c1/bias").axis == 0
    assert {m.name for m in grp.members_of("tensor")} == {"c1/Conv2D:0", "c1/BiasAdd:0", "r1:0"}
    assert all(m.index_map == IndexMap.identity(4) for m in grp.members if m.kind != "reshape")
    by_kernel = group_for(g, "c1/kernel", 3)  # seeding at the kernel's output axis: the same group
    assert {(m.name, m.axis) for m in by_kernel.members} == {(m.name, m.axis) for m in grp.members}
    groups = channel_groups(g)
    assert [m.name for grp_ in groups for m in grp_.sources] == ["c1/kernel", "c2/kernel"]
    assert groups[1].touches_outputs == [("y0", 3)] and not groups[1].prunable
    h = check_keep(g, grp, [3, 1], n.feed())
    assert h.weight("c1/kernel").shape == (1, 1, 3, 2) and h.weight("c2/kernel").shape == (1, 1, 2, 2)
    assert h.weight("c1/bias").shape == (2,)
    np.testing.assert_array_equal(h.weight("c2/kernel").value, g.weight("c2/kernel").value[:, :, [3, 1]])


def test_depthwise_follows_its_input_with_multiplier():
    n = Net((None, 4, 4, 2))
    y = n.relu("r1", n.conv("c1", n.x, 2, 3))
    d = n.op("dw", "DepthwiseConv2dNative", y, n.w("dw/kernel", (3, 3, 3, 2)), strides=[1, 1, 1, 1], padding="SAME")
    d = n.op("dw/BiasAdd", "BiasAdd", d, n.w("dw/bias", (6,)))
    g = n.done(n.conv("c2", d, 6, 4))
    grp = group_for(g, "c1/BiasAdd:0", 3)
    assert [m.name for m in grp.sources] == ["c1/kernel"]
    assert rows(grp, "dw/kernel") == [[0], [1], [2]] and grp.member("dw/kernel").axis == 2
    assert rows(grp, "dw:0") == [[0, 1], [2, 3], [4, 5]]
    assert rows(grp, "dw/bias") == [[0, 1], [2, 3], [4, 5]]
    assert rows(grp, "c2/kernel", 2) == [[0, 1], [2, 3], [4, 5]]
    assert [m.name for m in grp.sinks] == ["c2/kernel"]
    h = check_keep(g, grp, [2, 0], n.feed())
    assert h.weight("dw/kernel").shape == (3, 3, 2, 2)
    np.testing.assert_array_equal(h.weight("c2/kernel").value, g.weight("c2/kernel").value[:, :, [4, 5, 0, 1]])
    # seeded on one output of a multiplier block, the depthwise conv cannot follow
    bad = group_for(g, "dw:0", 3)
    assert any(b.node == "dw" and "multiplier" in b.reason for b in bad.blockers)
    assert not channel_groups(g)[0].blockers  # the depthwise conv is no seed of its own


def _flatten(n, name, x, units):
    """Keras 3 Flatten: Reshape(x, Pack(StridedSlice(Shape(x), 0:1), units))."""
    shape = n.op(f"{name}/Shape", "Shape", x, out_type=tf.int32)
    b = n.op(f"{name}/strided_slice", "StridedSlice", shape, n.c(f"{name}/s0", [0]), n.c(f"{name}/s1", [1]),
             n.c(f"{name}/s2", [1]), T=tf.int32, Index=tf.int32, shrink_axis_mask=1)
    packed = n.op(f"{name}/shape", "Pack", b, n.c(f"{name}/units", units), T=tf.int32, N=2, axis=0)
    return n.op(name, "Reshape", x, packed, Tshape=tf.int32)


def test_flatten_into_dense_maps_every_spatial_position():
    n = Net((None, 2, 2, 1))
    y = n.relu("r1", n.conv("c1", n.x, 1, 3))
    g = n.done(n.dense("d", _flatten(n, "flat", y, 12), 12, 5))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert rows(grp, "flat:0") == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert rows(grp, "d/kernel", 0) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert [m.name for m in grp.sinks] == ["d/kernel"]
    assert [m.name for m in grp.members_of("reshape")] == ["flat"]
    assert grp.prunable  # the Shape read only takes the batch size
    assert grp.member("d/kernel").positions([2, 0]).tolist() == [2, 0, 5, 3, 8, 6, 11, 9]
    h = check_keep(g, grp, [2, 0], n.feed())
    assert h.shape("flat:0") == (None, 8)
    assert h.constant_value(h.input("flat", 1)).tolist() == [-1, 8]
    assert not any(h.has_node(f"flat/{x}") for x in ("Shape", "strided_slice", "units"))  # old shape: gone
    np.testing.assert_array_equal(h.weight("d/kernel").value, g.weight("d/kernel").value[[2, 0, 5, 3, 8, 6, 11, 9]])


def test_maps_compose_through_depthwise_concat_and_flatten():
    n = Net((None, 2, 2, 2))
    a = n.relu("ra", n.conv("a", n.x, 2, 2))
    b = n.conv("b", n.x, 2, 3)
    dw = n.op("dw", "DepthwiseConv2dNative", b, n.w("dw/kernel", (1, 1, 3, 2)), strides=[1, 1, 1, 1], padding="SAME")
    cat = n.op("cat", "ConcatV2", a, dw, n.c("cat/axis", 3), N=2, Tidx=tf.int32)  # [N, 2, 2, 2 + 6]
    g = n.done(n.dense("d", n.reshape("flat", cat, [-1, 32]), 32, 3))
    grp = group_for(g, "b/Conv2D:0", 3)
    # channel c of b → depthwise outputs 2c, 2c+1 → concat positions 2 + 2c + j → flat p·8 + 2 + 2c + j
    assert rows(grp, "cat:0") == [[2, 3], [4, 5], [6, 7]]
    assert rows(grp, "d/kernel", 0)[1] == [p * 8 + 4 + j for p in range(4) for j in range(2)]
    assert grp.member("d/kernel", 0).positions([2, 0]).tolist()[:6] == [0, 1, 6, 7, 2, 3]
    check_keep(g, grp, [2, 0], n.feed())
    check_keep(g, group_for(g, "a/Conv2D:0", 3), [1], n.feed())


def test_batch_matmul_dense_on_sequences():
    n = Net((None, 5, 6))
    y = n.op("d1", "BatchMatMulV2", n.x, n.w("d1/kernel", (6, 4)))
    y = n.relu("r", n.op("d1/BiasAdd", "BiasAdd", y, n.w("d1/bias", (4,))))
    g = n.done(n.op("d2", "BatchMatMulV2", y, n.w("d2/kernel", (4, 3))))
    grp = channel_groups(g)[0]
    assert [(m.name, m.axis) for m in grp.sources] == [("d1/kernel", 1)]
    assert [(m.name, m.axis) for m in grp.sinks] == [("d2/kernel", 0)]
    check_keep(g, grp, [3, 1], n.feed())


def test_concat_offsets_both_ways():
    n = Net((None, 3, 3, 2))
    a = n.relu("ra", n.conv("a", n.x, 2, 2))
    b = n.relu("rb", n.conv("b", n.x, 2, 3))
    cat = n.op("cat", "ConcatV2", a, b, n.c("cat/axis", -1), N=2, Tidx=tf.int32)
    g = n.done(n.conv("c", cat, 5, 4))
    gb = group_for(g, "b/Conv2D:0", 3)
    assert rows(gb, "cat:0") == [[2], [3], [4]] and rows(gb, "c/kernel", 2) == [[2], [3], [4]]
    assert "a/kernel" not in {m.name for m in gb.members}
    assert [m.name for m in gb.sources] == ["b/kernel"]
    # seeded on the concat output: each input covers part of the group
    gc = group_for(g, "cat:0", 3)
    assert gc.size == 5 and {m.name for m in gc.sources} == {"a/kernel", "b/kernel"}
    assert rows(gc, "a/kernel", 3) == [[0], [1], [], [], []]
    assert rows(gc, "rb:0") == [[], [], [0], [1], [2]]
    check_keep(g, gc, [0, 4, 2], n.feed())  # each input's channels stay together: realizable
    before = {k: w.value for k, w in g.weights.items()}
    with pytest.raises(ChannelError, match="take the place"):
        apply_keep(g, gc, [4, 0, 2])  # would move a channel of b into a's range
    assert all(g.weights[k].value is v for k, v in before.items())  # nothing changed
    # all branch groups at once: the shared members are combined
    ga = group_for(g, "a/Conv2D:0", 3)
    h = g.copy()
    apply_keeps(h, [(ga, [1]), (gb, [2, 0])])
    assert h.weight("c/kernel").shape == (1, 1, 3, 4)
    np.testing.assert_array_equal(h.weight("c/kernel").value, g.weight("c/kernel").value[:, :, [1, 4, 2]])


def test_residual_add_couples_both_convs():
    n = Net((None, 4, 4, 3))
    r = n.relu("r1", n.conv("c1", n.x, 3, 4))
    s = n.op("add", "AddV2", n.conv("c2", r, 4, 4), r)
    g = n.done(n.conv("c3", n.relu("r2", s), 4, 2))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert sorted(m.name for m in grp.sources) == ["c1/kernel", "c2/kernel"]
    assert sorted((m.name, m.axis) for m in grp.sinks) == [("c2/kernel", 2), ("c3/kernel", 2)]
    groups = channel_groups(g)
    assert len(groups) == 2  # c1 and c2 are one group; c3 the other
    check_keep(g, grp, [1, 3, 0], n.feed())


def _keras_bn(n, name, x, c, reshape):
    """Keras 3 inference batch norm arithmetic; with ``reshape`` the weights are Reshape'd to [1,1,1,C]
    first (as in Keras Applications ResNet50)."""
    def param(p, shift=0.0):
        w = n.g.add_weight(f"{name}/{p}", (n.rng.rand(c) + shift).astype("f")).output(0)
        return n.reshape(f"{name}/Reshape_{p}", w, [1, 1, 1, c]) if reshape else w
    gamma, beta, mean, var = param("gamma", 0.5), param("beta"), param("mean"), param("var", 0.5)
    eps = n.c(f"{name}/eps", 1e-3, np.float32)
    scale = n.op(f"{name}/mul", "Mul", n.op(f"{name}/Rsqrt", "Rsqrt", n.op(f"{name}/add", "AddV2", var, eps)), gamma)
    shift = n.op(f"{name}/sub", "Sub", beta, n.op(f"{name}/mul_2", "Mul", mean, scale))
    return n.op(f"{name}/add_1", "AddV2", n.op(f"{name}/mul_1", "Mul", x, scale), shift)


@pytest.mark.parametrize("reshape", [False, True])
def test_keras_batchnorm_arithmetic(reshape):
    n = Net((None, 4, 4, 3))
    y = n.relu("r1", _keras_bn(n, "bn", n.conv("c1", n.x, 3, 5, bias=False), 5, reshape))
    g = n.done(n.conv("c2", y, 5, 2))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert not grp.blockers and grp.prunable
    params = {m.name for m in grp.members_of("weight")} - {"c1/kernel", "c2/kernel"}
    assert params == {"bn/gamma", "bn/beta", "bn/mean", "bn/var"}
    assert all(grp.member(p).axis == 0 for p in params)
    assert "bn/eps" not in {m.name for m in grp.members}  # a scalar broadcasts
    reshapes = {m.name for m in grp.members_of("reshape")}
    assert reshapes == ({f"bn/Reshape_{p}" for p in ("gamma", "beta", "mean", "var")} if reshape else set())
    h = check_keep(g, grp, [4, 0, 2], n.feed())
    assert h.weight("bn/gamma").shape == (3,)


def test_per_channel_const_shared_with_another_group_is_cloned():
    n = Net((None, 3, 3, 2))
    s = n.c("scale", np.arange(1, 5), np.float32)
    a = n.op("ma", "Mul", n.conv("a", n.x, 2, 4), s)
    b = n.op("mb", "Mul", n.conv("b", n.x, 2, 4), s)
    g = n.done(n.conv("ca", a, 4, 2), n.conv("cb", b, 4, 2))
    ga = group_for(g, "a/Conv2D:0", 3)
    assert ga.member("scale").kind == "const" and ga.member("scale").users == (("ma", 1),)
    assert "b/kernel" not in {m.name for m in ga.members}  # a shared constant couples nothing
    feed = n.feed()
    before = run(g, feed)
    h = check_keep(g, ga, [3, 1], feed)
    assert h.node("scale").attr("value").tolist() == [1, 2, 3, 4]  # still read by mb
    assert h.constant_value(h.input("ma", 1)).tolist() == [4, 2]
    np.testing.assert_allclose(run(h, feed)["y1"], before["y1"], rtol=1e-6)  # the other branch is untouched


def test_fused_batchnorm_params():
    n = Net((None, 4, 4, 3))
    y = n.conv("c1", n.x, 3, 4, bias=False)
    ws = [n.g.add_weight(f"bn/{p}", (n.rng.rand(4) + 0.5).astype("f")).output(0)
          for p in ("gamma", "beta", "mean", "var")]
    bn = n.op("bn", "FusedBatchNormV3", y, *ws, U=F, epsilon=1e-3, is_training=False)
    g = n.done(n.conv("c2", n.relu("r", bn), 4, 2))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert not grp.blockers
    assert {m.name for m in grp.members_of("weight")} == {"c1/kernel", "c2/kernel", "bn/gamma", "bn/beta",
                                                          "bn/mean", "bn/var"}
    check_keep(g, grp, [2, 3], n.feed())


def test_matmul_transposed_kernels():
    n = Net((None, 6))
    y = n.relu("r", n.dense("d1", n.x, 6, 4, transpose_b=True))
    g = n.done(n.dense("d2", y, 4, 3, transpose_b=True))
    grp = group_for(g, "d1/MatMul:0", 1)
    assert [(m.name, m.axis) for m in grp.sources] == [("d1/kernel", 0)]
    assert [(m.name, m.axis) for m in grp.sinks] == [("d2/kernel", 1)]
    h = check_keep(g, grp, [0, 3], n.feed())
    assert h.weight("d1/kernel").shape == (2, 6) and h.weight("d2/kernel").shape == (3, 2)


def test_detection_reshape_class_axis():
    a, k1 = 3, 4  # anchors, classes + background
    n = Net((None, 2, 2, 3))
    scores = n.reshape("cls", n.conv("head", n.x, 3, a * k1), [-1, 4 * a, k1])
    g = n.done(n.op("softmax", "Softmax", scores))
    grp = group_for(g, "softmax:0", -1)
    assert grp.size == k1 and not grp.blockers
    assert rows(grp, "head/kernel", 3) == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    assert grp.touches_outputs == [("y0", 2)] and grp.renormalized_by == ["softmax"] and not grp.prunable
    feed = n.feed()
    before = run(g, feed, fetch=["cls:0", "softmax:0"])
    h = check_keep(g, grp, [0, 3, 1], feed)
    after = run(h, feed, fetch=["cls:0", "softmax:0"])
    logits = before["cls:0"][..., [0, 3, 1]]
    np.testing.assert_allclose(after["cls:0"], logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after["softmax:0"], tf.nn.softmax(logits).numpy(), rtol=1e-5, atol=1e-6)
    # seeded on the conv: the reshape splits its channels over two axes
    conv = group_for(g, "head/Conv2D:0", 3)
    assert any(b.node == "cls" for b in conv.blockers)


def test_per_class_box_reshape():
    n = Net((None, 5))
    boxes = n.reshape("boxes", n.dense("d", n.x, 5, 4 * 6), [-1, 6, 4])
    g = n.done(boxes)
    grp = group_for(g, "boxes:0", 1)
    assert rows(grp, "d/kernel", 1) == [list(range(4 * k, 4 * k + 4)) for k in range(6)]
    assert rows(grp, "d/bias") == rows(grp, "d/kernel", 1)
    feed = n.feed()
    h = check_keep(g, grp, [5, 2], feed)
    np.testing.assert_allclose(run(h, feed)["y0"], run(g, feed)["y0"][:, [5, 2]], rtol=1e-6)


def test_axis_moving_ops():
    n = Net((None, 4, 4, 2))
    y = n.conv("c1", n.x, 2, 6)
    y = n.op("pad", "Pad", y, n.c("pad/p", [[0, 0], [1, 1], [1, 1], [0, 0]]), Tpaddings=tf.int32)
    y = n.op("pool", "MaxPool", y, ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID")
    y = n.op("nchw", "Transpose", y, n.c("nchw/perm", [0, 3, 1, 2]), Tperm=tf.int32)
    y = n.op("gap", "Mean", y, n.c("gap/axes", [2, 3]), keep_dims=False, Tidx=tf.int32)
    y = n.op("expand", "ExpandDims", y, n.c("expand/dim", 1), Tdim=tf.int32)
    y = n.op("squeeze", "Squeeze", y, squeeze_dims=[1])
    g = n.done(n.dense("d", y, 6, 2))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert not grp.blockers
    axes = {m.name: m.axis for m in grp.members_of("tensor")}
    assert axes == {"c1/Conv2D:0": 3, "c1/BiasAdd:0": 3, "pad:0": 3, "pool:0": 3, "nchw:0": 1, "gap:0": 1,
                    "expand:0": 2, "squeeze:0": 1}
    assert [(m.name, m.axis) for m in grp.sinks] == [("d/kernel", 0)]
    check_keep(g, grp, [5, 1, 2], n.feed())


def test_elementwise_families():
    """Activations, x·sigmoid(x), GELU arithmetic, clipping, per-channel constants, coupled
    activations, and ops on other axes (spatial slices, splits, gathers, concats) pass channels on."""
    n = Net((None, 6, 6, 2))
    y = n.conv("c1", n.x, 2, 4)
    y = n.op("swish", "Mul", y, n.op("sig", "Sigmoid", y))
    half = n.c("half", 0.5, np.float32)
    erf = n.op("erf", "Erf", n.op("scaled", "Mul", y, n.c("rsqrt2", 0.7071, np.float32)))
    one_p = n.op("gelu/1p", "AddV2", erf, n.c("one", 1.0, np.float32))
    y = n.op("gelu", "Mul", n.op("gelu/half", "Mul", y, half), one_p)
    y = n.op("clip", "ClipByValue", y, n.c("lo", -3.0, np.float32), n.c("hi", 3.0, np.float32))
    y = n.op("lrelu", "LeakyRelu", y, alpha=0.1)
    y = n.op("mx", "Maximum", y, n.c("floor", [-1.0, -0.5, 0.0, -2.0], np.float32))
    y = n.op("sqd", "SquaredDifference", y, n.op("tanh", "Tanh", y))
    y = n.op("crop", "StridedSlice", y, n.c("b", [0, 1, 0, 0]), n.c("e", [0, 5, 0, 0]), n.c("s", [1, 1, 1, 1]),
             Index=tf.int32, begin_mask=1 | 4 | 8, end_mask=1 | 4 | 8)
    halves = n.g.add_node("halves", "Split", inputs=[n.c("split/axis", 1), y], attrs={"T": F, "num_split": 2})
    top, bottom = halves.output(0), halves.output(1)
    y = n.op("rows", "ConcatV2", bottom, top, n.c("rows/axis", 1), N=2, Tidx=tf.int32)
    y = n.op("pick", "GatherV2", y, n.c("idx", [3, 0, 1]), n.c("gax", 2), no_t=True, Tparams=F,
             Tindices=tf.int32, Taxis=tf.int32)
    y = n.op("gap", "Mean", y, n.c("gap/axes", [1, 2]), keep_dims=True, Tidx=tf.int32)
    g = n.done(n.conv("c2", y, 4, 3))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert not grp.blockers, format_groups([grp])
    assert {"half", "one", "lo", "hi", "rsqrt2"}.isdisjoint(m.name for m in grp.members)  # scalars broadcast
    assert grp.member("floor").kind == "const"
    assert {m.name for m in grp.members_of("tensor")} >= {"sig:0", "tanh:0", "halves:0", "halves:1", "gap:0"}
    assert [(m.name, m.axis) for m in grp.sinks] == [("c2/kernel", 2)]
    check_keep(g, grp, [3, 0], n.feed())


def test_conv2d_transpose():
    n = Net((None, 4, 4, 3))
    y = n.conv("c1", n.x, 3, 4)
    shape = n.op("sz/Shape", "Shape", y, out_type=tf.int32)
    batch = n.op("sz/batch", "StridedSlice", shape, n.c("sz/s0", [0]), n.c("sz/s1", [1]), n.c("sz/s2", [1]),
                 T=tf.int32, Index=tf.int32, shrink_axis_mask=1)
    sizes = n.op("sz", "Pack", batch, n.c("sz/h", 8), n.c("sz/w", 8), n.c("sz/c", 5), T=tf.int32, N=4, axis=0)
    up = n.op("up", "Conv2DBackpropInput", sizes, n.w("up/kernel", (3, 3, 5, 4)), y, strides=[1, 2, 2, 1],
              padding="SAME")
    g = n.done(n.conv("c2", n.relu("r", up), 5, 2))
    grp = group_for(g, "up:0", 3)
    assert [(m.name, m.axis) for m in grp.sources] == [("up/kernel", 2)]
    assert [(m.name, m.port) for m in grp.members_of("reshape")] == [("up", 0)]
    h = check_keep(g, grp, [4, 1], n.feed())
    assert h.shape("up:0") == (None, 8, 8, 2)
    # its input channels are the previous conv's group (sink: kernel axis 3)
    prev = group_for(g, "c1/Conv2D:0", 3)
    assert [(m.name, m.axis) for m in prev.sinks] == [("up/kernel", 3)]
    check_keep(g, prev, [0, 2], n.feed())


def _blocking_graph(kind):
    n = Net((None, 4, 4, 2))
    y = n.relu("r", n.conv("c1", n.x, 2, 4))
    if kind == "cumsum":
        z = n.op("odd", "Cumsum", y, n.c("odd/axis", 3), Tidx=tf.int32)
    elif kind == "split":
        z = n.op("odd", "Split", n.c("odd/axis", 3), y, num_split=2)
    elif kind == "slice":
        z = n.op("odd", "StridedSlice", y, n.c("b", [0, 0, 0, 0]), n.c("e", [0, 0, 0, 4]), n.c("s", [1, 1, 1, 2]),
                 Index=tf.int32, begin_mask=7, end_mask=7)
    elif kind == "gather":
        z = n.op("odd", "GatherV2", y, n.c("idx", [0, 2]), n.c("ax", 3), no_t=True, Tparams=F,
                 Tindices=tf.int32, Taxis=tf.int32)
    elif kind == "mean":
        z = n.op("odd", "Mean", y, n.c("ax", [3]), keep_dims=True, Tidx=tf.int32)
    elif kind == "shape":
        s = n.op("s", "Shape", y, out_type=tf.int32)
        last = n.op("odd", "StridedSlice", s, n.c("b", [3]), n.c("e", [4]), n.c("st", [1]), T=tf.int32,
                    Index=tf.int32, shrink_axis_mask=1)
        z = n.op("scaled", "Mul", y, n.op("f", "Cast", last, SrcT=tf.int32, DstT=F, no_t=True))
        return n.done(z), "s"
    return n.done(z), "odd"


@pytest.mark.parametrize("kind,reason", [
    ("cumsum", "no channel rule for op type Cumsum"),
    ("split", "splits along axis 3"),
    ("slice", "slices axis 3 (the channel axis) with stride 2"),
    ("gather", "gathers along axis 3"),
    ("mean", "reduces over axis 3"),
    ("shape", "the shape of a group tensor is read by odd"),
])
def test_ops_that_block_the_channel_axis(kind, reason):
    g, node = _blocking_graph(kind)
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert [b.node for b in grp.blockers] == [node], format_groups([grp])
    assert reason in grp.blockers[0].reason
    assert not grp.prunable and node in format_groups([grp])
    before = {k: w.value for k, w in g.weights.items()}
    with pytest.raises(ChannelError, match=node):
        apply_keep(g, grp, [0, 1])
    assert all(g.weights[k].value is v for k, v in before.items())


def test_inconsistent_mapping_blocks():
    n = Net((None, 3, 3, 2))
    y = n.relu("r", n.conv("c1", n.x, 2, 3))
    cat = n.op("cat", "ConcatV2", y, y, n.c("cat/axis", 3), N=2, Tidx=tf.int32)
    g = n.done(n.conv("c2", cat, 6, 2))
    grp = group_for(g, "cat:0", 3)  # channel c of y would be both group channel c and c + 3
    assert any("inconsistent channel mapping at r" in b.reason for b in grp.blockers)
    ok = group_for(g, "c1/Conv2D:0", 3)  # from y, the concat holds each channel twice: fine
    assert rows(ok, "cat:0") == [[0, 3], [1, 4], [2, 5]] and not ok.blockers
    check_keep(g, ok, [2, 0], n.feed())


def test_keep_validation_and_stale_groups():
    n = Net((None, 3, 3, 2))
    g = n.done(n.conv("c2", n.relu("r", n.conv("c1", n.x, 2, 4)), 4, 2))
    grp = group_for(g, "c1/Conv2D:0", 3)
    before = {k: w.value for k, w in g.weights.items()}
    for keep, msg in [([], "empty"), ([0, 4], "outside"), ([1, 1], "repeats"), ([0.5], "integer")]:
        with pytest.raises(ChannelError, match=msg):
            apply_keep(g, grp, keep)
    assert all(g.weights[k].value is v for k, v in before.items())
    apply_keep(g, grp, [0, 1])
    with pytest.raises(ChannelError, match="stale"):
        apply_keep(g, grp, [0])  # computed for 4 channels; the graph now has 2


def test_every_rule_names_a_real_tensorflow_op():
    for op in CHANNEL_RULES:
        assert op_def_registry.get(op) is not None, f"channel rule for unknown op type {op!r}"


def test_index_map_positions():
    m = IndexMap([[0, 3], [1, 4], [2, 5]])  # channel c at c and c + 3 (flatten of 2 positions)
    assert m.positions([0, 2], 6).tolist() == [0, 2, 3, 5]
    assert m.positions([2, 0], 6).tolist() == [2, 0, 5, 3]
    part = IndexMap([[-1], [0], [1]])  # channels 1, 2 on the first two of 4 positions; 2, 3 are others'
    assert part.positions([2], 4).tolist() == [1, 2, 3]
    assert part.positions([0, 2, 1], 4).tolist() == [1, 0, 2, 3]


# ------------------------------------------------------------------------------------------ fixtures
FIXTURES = [fx["name"] for fx in fixture_index()]


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = graphslim.load(fixture_path(name))
        return cache[name]

    return get


def _group_with_source(groups, kernel):
    return next(grp for grp in groups if kernel in {m.name for m in grp.sources})


def test_resnet_residual_stage_is_one_group(loaded):
    g = loaded("resnet_digits")
    groups = channel_groups(g)
    stem = _group_with_source(groups, "conv2d/kernel")
    assert sorted(m.name for m in stem.sources) == ["conv2d/kernel", "conv2d_2/kernel"]  # identity shortcut
    proj = _group_with_source(groups, "conv2d_5/kernel")
    assert sorted(m.name for m in proj.sources) == ["conv2d_3/kernel", "conv2d_5/kernel"]  # projection shortcut
    assert sum(len(grp.sources) for grp in groups) == len(g.nodes(op=("Conv2D", "MatMul")))  # each once
    bn = {m.name for m in proj.members_of("weight")}
    assert {"batch_normalization_3/gamma", "batch_normalization_5/beta"} <= bn


def test_inception_concat_offsets(loaded):
    g = loaded("inception_tiny")
    groups = channel_groups(g)
    for kernel, lo, width in [("conv2d_1/kernel", 0, 8), ("conv2d_3/kernel", 8, 8), ("conv2d_4/kernel", 16, 4)]:
        grp = _group_with_source(groups, kernel)
        want = [[lo + c] for c in range(width)]
        assert rows(grp, "conv2d_5/kernel", 2) == want
        assert rows(grp, "batch_normalization/gamma") == want
        assert grp.member("conv2d_5/kernel", 2).role == "sink" and grp.prunable


def test_mobilenet_depthwise_follows_input(loaded):
    g = loaded("mobilenet_tiny")
    groups = channel_groups(g)
    stem = _group_with_source(groups, "conv2d/kernel")
    assert rows(stem, "depthwise_conv2d/kernel", 2) == [[c] for c in range(8)]
    assert [(m.name, m.axis) for m in stem.sinks] == [("conv2d_1/kernel", 2)]
    mid = _group_with_source(groups, "conv2d_1/kernel")  # 16 channels into a depthwise with multiplier 2
    assert rows(mid, "depthwise_conv2d_1/kernel", 2) == [[c] for c in range(16)]
    assert rows(mid, "conv2d_2/kernel", 2) == [[2 * c, 2 * c + 1] for c in range(16)]
    assert rows(mid, "batch_normalization_3/gamma") == [[2 * c, 2 * c + 1] for c in range(16)]
    assert not any(grp.blockers for grp in groups)


def _removal(rng, size):
    removed = sorted(rng.choice(size, max(1, size // 3), replace=False).tolist())
    keep = [int(c) for c in rng.permutation(size) if c not in removed]
    return removed, keep


def _outputs_and_members(g, grp, inputs):
    members = _member_tensors(g, grp)
    fetch = [str(o.tensor) for o in g.outputs] + [m.name for m in members]
    return run(g, inputs, fetch=fetch), members


@pytest.mark.parametrize("name", FIXTURES)
def test_removing_channels_that_feed_nothing_is_exact(loaded, name):
    """For every prunable group: zero what the removed channels feed into (the sinks' slices), then
    remove them in a shuffled order: outputs are unchanged; and keeping all channels in a shuffled
    order reproduces the fixture's recorded outputs."""
    g = loaded(name)
    inputs, expected = fixture_io(name)
    groups = [grp for grp in channel_groups(g) if grp.prunable]
    assert groups, format_groups(channel_groups(g))
    rng = np.random.RandomState(0)
    for grp in groups:
        removed, keep = _removal(rng, grp.size)
        if grp.members_of("stat") or not grp.sinks:
            # the channels also feed a layer norm's statistics, or reach no kernel at all (a query/key
            # head size meets its pair in the attention scores): zeroed sinks do not silence them.
            # test_pruning_all_zero_channels_is_exact covers these groups.
            continue
        z = g.copy()
        for m in grp.sinks:
            zero_slices(z, m, removed)
        ref, members = _outputs_and_members(z, grp, inputs)
        h = z.copy()
        apply_keep(h, grp, keep)
        got = run(h, inputs, fetch=list(ref))
        for o in g.outputs:
            t = str(o.tensor)
            np.testing.assert_allclose(got[t], ref[t], rtol=1e-5, atol=1e-5, err_msg=f"{grp.name} output {o.name}")
        for m in members:
            np.testing.assert_allclose(got[m.name], np.take(ref[m.name], m.positions(keep), axis=m.axis),
                                       rtol=1e-5, atol=1e-5, err_msg=f"{grp.name} {m.name}")
        for m in grp.sources:
            assert h.weight(m.name).shape[m.axis] == len(keep)
        perm = g.copy()
        apply_keep(perm, grp, rng.permutation(grp.size).tolist())
        assert_close(run(perm, inputs), expected, rtol=1e-5, atol=1e-5)


# ops whose output is not 0 where their input is: per-element f(0) != 0, and a zeroed head's attention
# weights (uniform; they multiply the head's values, which are zero)
NONZERO_AT_ZERO = {"Erfc", "Exp", "Cos", "Sigmoid", "Softplus", "Softmax"}


@pytest.mark.parametrize("name", FIXTURES)
def test_pruning_all_zero_channels_is_exact(loaded, name):
    """The prune contract: on the batch-norm-folded graph, channels made exactly zero at their source
    (kernel slices, biases, shifts) are removed; outputs are identical. All groups at once, too."""
    g = loaded(name).copy()
    PassManager("fold-batchnorm,dce").run(g)
    inputs, _ = fixture_io(name)
    groups = [grp for grp in channel_groups(g) if grp.prunable]
    rng = np.random.RandomState(1)
    plan = []
    zeroed_all = g.copy()
    for grp in groups:
        removed, keep = _removal(rng, grp.size)
        keep = sorted(keep)
        plan.append((grp, keep))
        zero_produced_channels(zeroed_all, grp, removed)
        z = g.copy()
        zero_produced_channels(z, grp, removed)
        ref, members = _outputs_and_members(z, grp, inputs)
        placeholders = {a.tensor.node for a in g.inputs}
        for m in members:  # the premise: every activation of the group is zero on the removed channels
            # (but a factor such as GELU's erfc(-x/√2), which is 1 at 0 and multiplies x, the zero one;
            # and inside a layer norm, x - mean, before gamma zeroes it)
            if grp.members_of("stat"):
                break
            if g.ancestors([m.tensor.node]) & placeholders and g.node(m.tensor.node).op not in NONZERO_AT_ZERO:
                gone = np.take(ref[m.name], np.concatenate([m.index_map[c] for c in removed]), axis=m.axis)
                assert not gone.any(), f"{grp.name}: {m.name} ({g.node(m.tensor.node).op}) is not zero on the removed channels"
        h = z.copy()
        apply_keep(h, grp, keep)
        got = run(h, inputs, fetch=[str(o.tensor) for o in g.outputs])
        for o in g.outputs:
            t = str(o.tensor)
            np.testing.assert_allclose(got[t], ref[t], rtol=1e-5, atol=1e-5, err_msg=f"{grp.name} output {o.name}")
    if plan:
        ref = run(zeroed_all, inputs)
        apply_keeps(zeroed_all, plan)
        zeroed_all.verify()
        assert_close(run(zeroed_all, inputs), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ subset-style
def _softmax_np(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_subset_vgg_logits(loaded):
    g = loaded("vgg_digits").copy()
    inputs, expected = fixture_io("vgg_digits")
    out = g.outputs[0].tensor
    logits = g.input(out.node, 0)
    before = run(g, inputs, fetch=[logits])[str(logits)]
    grp = group_for(g, out, -1)
    assert [m.name for m in grp.sources] == ["dense_1/kernel"] and grp.touches_outputs == [("output_0", 1)]
    apply_keep(g, grp, [3, 7, 1])
    got = run(g, inputs, fetch=[logits, out])
    np.testing.assert_allclose(got[str(logits)], before[:, [3, 7, 1]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[str(out)], _softmax_np(before[:, [3, 7, 1]]), rtol=1e-5, atol=1e-6)
    assert g.weight("dense_1/kernel").shape == (32, 3) and g.weight("dense/kernel").shape == (32, 32)


def test_subset_ssd_class_scores_and_class_boxes(loaded):
    g0 = loaded("ssd_tiny")
    inputs, expected = fixture_io("ssd_tiny")
    outs = {o.name: o.tensor for o in g0.outputs}
    # class axis of class_scores: [N, 48, 7] through the Reshape back to the conv's anchors × (K+1)
    g = g0.copy()
    grp = group_for(g, outs["class_scores"], 2)
    assert not grp.blockers and [m.name for m in grp.sources] == ["conv2d_2/kernel"]
    assert rows(grp, "conv2d_2/kernel", 3) == [[a * 7 + k for a in range(3)] for k in range(7)]
    keep = [0, 5, 2]  # background first
    logits = g.input(outs["class_scores"].node, 0)
    before = run(g, inputs, fetch=[logits])[str(logits)]
    apply_keep(g, grp, keep)
    got = run(g, inputs)
    np.testing.assert_allclose(run(g, inputs, fetch=[logits])[str(logits)], before[..., keep], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["class_scores"], _softmax_np(before[..., keep]), rtol=1e-5, atol=1e-6)
    assert_close({k: got[k] for k in ("boxes", "class_boxes")},
                 {k: expected[k] for k in ("boxes", "class_boxes")}, rtol=1e-6, atol=1e-6)
    # per-class boxes [N, K, 4]: K is axis 1, 4 columns of the Dense per class
    g = g0.copy()
    grp = group_for(g, outs["class_boxes"], 1)
    assert rows(grp, "dense/kernel", 1) == [[4 * k + j for j in range(4)] for k in range(6)]
    apply_keep(g, grp, [4, 1])
    got = run(g, inputs)
    np.testing.assert_allclose(got["class_boxes"], expected["class_boxes"][:, [4, 1]], rtol=1e-6, atol=1e-6)
    assert_close({k: got[k] for k in ("boxes", "class_scores")},
                 {k: expected[k] for k in ("boxes", "class_scores")}, rtol=1e-6, atol=1e-6)


def test_subset_fcn_and_multi_output(loaded):
    g = loaded("fcn_tiny").copy()  # 1x1 conv head + GAP: the class axis is a conv channel axis
    inputs, expected = fixture_io("fcn_tiny")
    gap = g.input(g.outputs[0].tensor.node, 0)
    before = run(g, inputs, fetch=[gap])[str(gap)]
    grp = group_for(g, g.outputs[0].tensor, 1)
    assert [(m.name, m.axis) for m in grp.sources] == [("conv2d_2/kernel", 3)]
    apply_keep(g, grp, [6, 2, 5])
    np.testing.assert_allclose(run(g, inputs, fetch=[gap])[str(gap)], before[:, [6, 2, 5]], rtol=1e-6, atol=1e-6)
    g = loaded("multi_io").copy()  # only the chosen output's class axis shrinks
    inputs, expected = fixture_io("multi_io")
    classes = next(o.tensor for o in g.outputs if o.name == "classes")
    apply_keep(g, group_for(g, classes, 1), [9, 0])
    got = run(g, inputs)
    np.testing.assert_allclose(got["box"], expected["box"], rtol=1e-6, atol=1e-6)
    assert got["classes"].shape == (4, 2)


# ------------------------------------------------------------------------------------------ zoo
@pytest.fixture(scope="module", params=[("MobileNetV2", (96, 96, 3), 4), ("ResNet50", (64, 64, 3), 7)],
                ids=["MobileNetV2", "ResNet50"])
def keras_app(request, tmp_path_factory):
    import keras

    name, shape, coupled = request.param
    path = tmp_path_factory.mktemp(name)
    getattr(keras.applications, name)(weights=None, input_shape=shape).export(str(path), verbose=False)
    keras.backend.clear_session()
    return name, graphslim.load(path), shape, coupled


def test_keras_applications(keras_app):
    """No blockers; only the class head is not prunable; residual stages are single groups; removing
    channels whose sink slices are zero is exact on the real graph (Keras batch-norm arithmetic)."""
    name, g, shape, coupled = keras_app
    groups = channel_groups(g)
    assert not [str(b) for grp in groups for b in grp.blockers]
    assert all(grp.touches_outputs for grp in groups if not grp.prunable)
    assert sum(len(grp.sources) for grp in groups) == len(g.nodes(op=("Conv2D", "MatMul")))
    biggest = max(groups, key=lambda grp: len(grp.sources))
    assert len(biggest.sources) == coupled  # a residual stage is one group
    if name == "MobileNetV2":
        dw = {m.name for grp in groups for m in grp.members if m.kind == "weight" and m.axis == 2}
        assert len({w for w in dw if "depthwise" in w}) == len(g.nodes(op="DepthwiseConv2dNative"))
    # exact removal on the real graph (sinks zeroed), for the coupled stage
    x = {g.inputs[0].name: np.random.RandomState(0).rand(2, *shape).astype("f")}
    removed, keep = _removal(np.random.RandomState(2), biggest.size)
    z = g.copy()
    for m in biggest.sinks:
        zero_slices(z, m, removed)
    ref = run(z, x)
    apply_keep(z, biggest, keep)
    assert_close(run(z, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src,axis,dst,want", [
    ((8,), 0, (1, 1, 1, 8), 3),             # batch-norm parameter broadcast to NHWC
    ((None, 8), 1, (None, 1, 1, 8), 3),
    ((1, 1, 1, 8), 3, (8,), 0),
    ((None, 6, 6, 8), 3, (None, 8), None),  # merges axes: the general path decides
    ((1,), 0, (1, 1), None),                # a size-1 channel axis is ambiguous
])
def test_unsqueeze_fast_path(src, axis, dst, want, monkeypatch):
    import graphslim.analysis.channel_rules as ch

    assert ch._unsqueeze_axis(src, axis, dst) == want
    if want is not None:  # the general path (fast path off) agrees
        monkeypatch.setattr(ch, "_unsqueeze_axis", lambda *a: None)
        b, m = ch._reshape_map(src, axis, IndexMap.identity(src[axis]), dst)
        assert b == want and m == IndexMap.identity(src[axis])


def test_reshape_map_solves_the_unknown_dim_from_either_side():
    """tf.tensordot: [N, H, W, C] → [N·H·W, C] → [N, H, W, C']: the batch-like dim is unknown on both
    sides, and only one side can be filled (the other is solved)."""
    from graphslim.analysis.channel_rules import _concretize

    assert _concretize((None, 4, 4, 8), (None, 8), 2) == ([2, 4, 4, 8], [32, 8])
    assert _concretize((None, 8), (None, 4, 4, 8), 2) == ([32, 8], [2, 4, 4, 8])
    with pytest.raises(Exception, match="no static length on both sides"):
        _concretize((None, None, 8), (None, None, 8), 2)


# ------------------------------------------------------------------------------------------ layer norm
def _export_layernorm_net(path):
    """graphslim.testing.layernorm_net (16×16×3 input, 16 residual channels) with non-trivial
    LayerNorm parameters, exported."""
    import keras

    model = build_layernorm_net()
    rng = np.random.RandomState(1)
    for w in model.weights:
        if w.path.endswith("gamma"):
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
        elif w.path.endswith("beta"):
            w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    model.export(str(path), verbose=False)
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def layernorm_net(tmp_path_factory):
    path = tmp_path_factory.mktemp("layernorm") / "net"
    _export_layernorm_net(path)
    return path


def _residual_group(g):
    return _group_with_source(channel_groups(g), "stem/kernel")


def test_layernorm_statistics_join_the_residual_group(layernorm_net):
    g = graphslim.load(layernorm_net)
    grp = _residual_group(g)
    assert grp.prunable, grp.why_not()
    assert {m.name for m in grp.sources} == {"stem/kernel", "b0_pw2/kernel", "b1_pw2/kernel"}
    stats = grp.members_of("stat")
    assert sorted(grp.normalized_by) == sorted(m.name for m in stats)
    by_layer = {}
    for m in stats:
        layer = next(n for n in ("stem_ln", "b0_ln", "b1_ln", "head_ln") if f"/{n}_1/" in m.name)
        by_layer.setdefault(layer, set()).add(m.role)
        assert m.dim == 16 and g.node(m.name).op == "Mean"
    assert by_layer == {n: {"mean", "variance"} for n in ("stem_ln", "b0_ln", "b1_ln", "head_ln")}
    assert "[prunable; 4 layer norm(s) over it, corrected when pruned]" in format_groups([grp])


def test_pruning_zero_channels_through_layernorms_is_exact(layernorm_net, tmp_path):
    """Removed channels that are zero everywhere (their kernels, biases and LayerNorm scale and shift
    are zero) leave the outputs unchanged: each LayerNorm's mean and variance still average over all
    the original channels. The emitted SavedModel agrees."""
    g = graphslim.load(layernorm_net)
    grp = _residual_group(g)
    removed = [1, 4, 5, 11]
    for m in grp.members:
        if m.kind in ("weight", "const") and m.role != "sink":
            zero_slices(g, m, removed)
    x = {"image": np.random.RandomState(0).rand(3, 16, 16, 3).astype("float32")}
    ref, members = _outputs_and_members(g, grp, x)
    checked = 0
    for m in members:  # the premise: the group's activations are zero on the removed channels
        if g.node(m.tensor.node).op == "SquaredDifference":
            continue  # (x − mean)², the variance's input: mean² there, which the correction accounts for
        gone = np.take(ref[m.name], np.concatenate([m.index_map[c] for c in removed]), axis=m.axis)
        assert not gone.any(), m.name
        checked += 1
    assert checked > 20
    want = {o.name: ref[str(o.tensor)] for o in g.outputs}
    apply_keep(g, grp, [c for c in range(16) if c not in removed])
    assert g.weight("stem/kernel").value.shape == (4, 4, 3, 12)
    g.verify()
    got = run(g, x)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want["output_0"]).max() > 0.1  # not vacuous
    out = graphslim.save(g, tmp_path / "pruned")
    from graphslim.testing import run_saved_model

    assert_close(run_saved_model(out, x), want, rtol=1e-5, atol=1e-5)


def test_prune_pass_shrinks_the_residual_stream_through_layernorms(layernorm_net, tmp_path):
    """The prune pass (l1) removes the half of each group's channels that were made zero beforehand,
    so the outputs must not change: this covers the pass's bookkeeping around the corrected
    statistics, not only apply_keep."""
    g = graphslim.load(layernorm_net)
    groups = [grp for grp in channel_groups(g) if grp.prunable]
    assert len(groups) == 3
    for grp in groups:
        for m in grp.members:
            if m.kind in ("weight", "const") and m.role != "sink":
                zero_slices(g, m, list(range(1, grp.size, 2)))
    x = {"image": np.random.RandomState(1).rand(2, 16, 16, 3).astype("float32")}
    want = run(g, x)
    assert np.abs(want["output_0"]).max() > 0.1  # not vacuous
    report = PassManager("prune{ratio=0.5}").run(g)
    stats = report.passes[0]["stats"]
    assert stats["pruned_groups"] == 3  # the residual stream and both MLP hidden layers
    assert g.weight("stem/kernel").value.shape[-1] == 8
    assert g.weight("b0_pw1/kernel").value.shape == (8, 16)
    assert g.weight("head/kernel").value.shape == (8, 10)
    out = graphslim.save(g, tmp_path / "pruned")
    from graphslim.testing import run_saved_model

    assert_close(run(g, x), want, rtol=1e-5, atol=1e-5)
    assert_close(run_saved_model(out, x), want, rtol=1e-5, atol=1e-5)


def test_a_layernorm_over_the_classes_refuses_subset_and_extend(tmp_path):
    """Keeping or adding classes that a LayerNorm averages over would change the kept classes' scores."""
    import keras
    from keras import layers

    inp = keras.Input((5,), name="x")
    out = layers.LayerNormalization(name="ln")(layers.Dense(6, name="dense")(inp))
    keras.Model(inp, out).export(str(tmp_path / "m"), verbose=False)
    keras.backend.clear_session()
    from graphslim.errors import PipelineError

    for pipeline in ("subset{keep=0,1}", "extend{classes=2}"):
        g = graphslim.load(tmp_path / "m")
        with pytest.raises(PipelineError, match="normalized by layer norm .*would change the scores of the others"):
            PassManager(pipeline).run(g)
    from graphslim.analysis.channels import apply_grow

    g = graphslim.load(tmp_path / "m")
    grp = group_for(g, g.outputs[0].tensor, -1)
    assert len(grp.normalized_by) == 2
    with pytest.raises(ChannelError, match="cannot grow: layer norm"):
        apply_grow(g, grp, 2, lambda m, old: np.zeros((2,) + old.shape[1:], old.dtype))


def test_layernorm_written_with_tf_nn_moments(tmp_path):
    """A layer norm written by hand with tf.nn.moments (a StopGradient on the mean, Sub instead of
    Keras's arithmetic) is recognised too, and pruning its zero channels is exact."""
    rng = np.random.RandomState(0)

    class Net(tf.Module):
        def __init__(self):
            self.k1 = tf.Variable(rng.randn(3, 3, 3, 8).astype("f"), name="c1/kernel")
            self.gamma = tf.Variable(rng.uniform(0.5, 1.5, 8).astype("f"), name="ln/gamma")
            self.beta = tf.Variable(rng.normal(0, 0.3, 8).astype("f"), name="ln/beta")
            self.k2 = tf.Variable(rng.randn(1, 1, 8, 4).astype("f"), name="c2/kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")])
        def __call__(self, x):
            y = tf.nn.conv2d(x, self.k1, 1, "SAME")
            mean, var = tf.nn.moments(y, axes=[3], keepdims=True)
            y = (y - mean) * tf.math.rsqrt(var + 1e-5) * self.gamma + self.beta
            return {"out": tf.nn.conv2d(tf.nn.relu(y), self.k2, 1, "SAME")}

    net = Net()
    tf.saved_model.save(net, str(tmp_path / "m"), signatures=net.__call__)
    g = graphslim.load(tmp_path / "m")
    grp = _group_with_source(channel_groups(g), "c1/kernel")
    assert grp.prunable and len(grp.normalized_by) == 2
    removed = [2, 5]
    for m in grp.members:
        if m.kind in ("weight", "const") and m.role != "sink":
            zero_slices(g, m, removed)
    x = {"x": rng.rand(2, 8, 8, 3).astype("f")}
    want = run(g, x)
    apply_keep(g, grp, [c for c in range(8) if c not in removed])
    assert g.weight("c1/kernel").value.shape[-1] == 6
    assert_close(run(g, x), want, rtol=1e-5, atol=1e-5)


def test_pruning_a_pruned_layernorm_net_again_is_exact(layernorm_net, tmp_path):
    """The corrected statistics are layer-norm statistics still: a model pruned, saved and loaded
    prunes again through them (the corrections compose), exactly on zero channels."""
    g = graphslim.load(layernorm_net)
    for removed, path in (([0, 7], "once"), ([3, 9, 10], "twice")):  # positions in the current group
        grp = _residual_group(g)
        assert grp.prunable and len(grp.normalized_by) == 8, grp.why_not()
        for m in grp.members:
            if m.kind in ("weight", "const") and m.role != "sink":
                zero_slices(g, m, removed)
        x = {"image": np.random.RandomState(1).rand(2, 16, 16, 3).astype("float32")}
        want = run(g, x)
        apply_keep(g, grp, [c for c in range(grp.size) if c not in removed])
        assert_close(run(g, x), want, rtol=1e-5, atol=1e-5)
        g = graphslim.load(graphslim.save(g, tmp_path / path))
    assert g.weight("stem/kernel").value.shape[-1] == 16 - 5


def test_partial_slice_of_the_channel_axis_is_rebuilt():
    """x[..., 1:3] of a pruned axis: the slice member's begin/end follow the surviving channels."""
    n = Net((None, 4, 4, 2))
    y = n.relu("r", n.conv("c1", n.x, 2, 5))
    z = n.op("odd", "StridedSlice", y, n.c("b", [0, 1]), n.c("e", [0, 3]), n.c("s", [1, 1]),
             Index=tf.int32, begin_mask=1, end_mask=1, ellipsis_mask=1)
    g = n.done(n.op("sum", "AddV2", z, z))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert not grp.blockers and [m.name for m in grp.members_of("slice")] == ["odd"]
    x = np.random.RandomState(0).normal(size=(2, 4, 4, 2)).astype("float32")
    zero_produced_channels(g, grp, [0, 2])
    before = run(g, {"x": x})
    apply_keep(g, grp, [1, 3, 4])  # the slice [1, 3) keeps channel 1 only: [0, 1) of the new axis
    assert g.shape(g.outputs[0].tensor)[-1] == 1
    np.testing.assert_allclose(run(g, {"x": x})[g.outputs[0].name], before[g.outputs[0].name][..., [0]], rtol=1e-6)


def test_pack_and_unpack_carry_the_channels():
    """tf.stack of two levels' class scores, then tf.unstack: the channel axis follows (renumbered)."""
    n = Net((None, 4, 4, 2))
    a = n.relu("ra", n.conv("c1", n.x, 2, 5))
    b = n.op("neg", "Neg", a)
    packed = n.op("stack", "Pack", a, b, N=2, axis=1)  # [N, 2, 4, 4, 5]
    parts = n.op("unstack", "Unpack", packed, num=2, axis=1)
    g = n.done(n.op("sum", "AddV2", "unstack:0", "unstack:1"))
    grp = group_for(g, "c1/Conv2D:0", 3)
    assert not grp.blockers, format_groups([grp])
    assert grp.covers("stack:0", 4) and grp.covers("unstack:1", 3)
    x = np.random.RandomState(0).normal(size=(2, 4, 4, 2)).astype("float32")
    zero_produced_channels(g, grp, [1, 3])
    before = run(g, {"x": x})
    apply_keep(g, grp, [0, 2, 4])
    out = g.outputs[0].name
    np.testing.assert_allclose(run(g, {"x": x})[out], before[out][..., [0, 2, 4]], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ growing
def _grow(g, grp, n=2, **kw):
    from graphslim.analysis.channels import apply_grow

    apply_grow(g, grp, n, lambda m, old: np.full((n,) + old.shape[1:], 0.5, old.dtype), **kw)


def test_grow_the_last_part_of_a_concat_and_its_slices():
    """[boxes | classes]: the class conv is the last input of a Concat; the boxes' slice (ending before
    the classes) stays, the classes' slices up to the end of the axis (open, or an explicit end) take the
    new channels, the old ones keep their values."""
    n = Net((None, 4, 4, 3))
    box, cls = n.conv("box", n.x, 3, 4), n.conv("cls", n.x, 3, 5)
    both = n.op("cat", "ConcatV2", box, cls, n.c("ax", 3), N=2)
    ss = dict(Index=tf.int32, begin_mask=7, end_mask=7)
    boxes = n.op("boxes", "StridedSlice", both, n.c("b0", [0, 0, 0, 0]), n.c("e0", [0, 0, 0, 4]), n.c("s0", [1] * 4), **ss)
    open_ = n.op("open", "StridedSlice", both, n.c("b1", [0, 0, 0, 4]), n.c("e1", [0, 0, 0, 0]), n.c("s1", [1] * 4),
                 Index=tf.int32, begin_mask=7, end_mask=15)
    explicit = n.op("explicit", "StridedSlice", both, n.c("b2", [0, 0, 0, 4]), n.c("e2", [0, 0, 0, 9]),
                    n.c("s2", [1] * 4), **ss)
    g = n.done(boxes, open_, explicit)
    grp = group_for(g, "cls/BiasAdd:0", 3)
    assert not grp.blockers and {m.name for m in grp.members_of("slice")} == {"boxes", "open", "explicit"}
    feed = n.feed()
    before = run(g, feed)
    _grow(g, grp)
    g.verify()
    after = run(g, feed)
    np.testing.assert_allclose(after["y0"], before["y0"], rtol=1e-6)
    for key in ("y1", "y2"):
        assert after[key].shape[-1] == 7
        np.testing.assert_allclose(after[key][..., :5], before[key], rtol=1e-6)


def test_take_along_axis_parts_carry_the_channels():
    """Keras's take_along_axis over classes, unmerged: indices ``[N, 1, K]`` broadcast to every class
    (BroadcastTo to a Pack of the batch size and the class count), a gather with ``batch_dims=2``:
    params, indices and output share the class axis; the Pack's class count is rewritten on growth."""
    n = Net((None, 6))
    g = n.g
    scores = n.reshape("scores", n.dense("cls", n.x, 6, 8 * 5), [-1, 8, 5])  # [N, anchors, classes]
    params = n.op("params", "Transpose", scores, n.c("perm", [0, 2, 1]), Tperm=tf.int32)  # [N, C, anchors]
    g.add_node("idx", "Placeholder", attrs={"dtype": tf.int32, "shape": (None, 1, 3)})
    g.inputs.append(SignatureArg("idx", Tensor("idx", 0)))
    batch = n.op("batch", "StridedSlice", n.op("shape", "Shape", "idx:0", T=tf.int32, out_type=tf.int32),
                 n.c("b", [0]), n.c("e", [1]), n.c("s", [1]), T=tf.int32, Index=tf.int32, shrink_axis_mask=1)
    target = n.op("target", "Pack", batch, n.c("classes", 5), n.c("k", 3), T=tf.int32, N=3, axis=0)
    idx = n.op("bcast", "BroadcastTo", "idx:0", target, T=tf.int32, Tidx=tf.int32)
    got = n.op("take", "GatherV2", params, idx, n.c("axis", 2), Tparams=F, Tindices=tf.int32, Taxis=tf.int32,
               batch_dims=2, no_t=True)
    bits = n.op("bits", "Bitcast", got, type=tf.int32)
    g = n.done(got, bits)
    grp = group_for(g, "scores:0", 2)
    assert not grp.blockers, format_groups([grp])
    assert grp.covers("bcast:0", 1) and grp.covers("take:0", 1) and grp.covers("bits:0", 1)
    assert [m.name for m in grp.members_of("count")] == ["bcast"]
    feed = {"x": np.random.RandomState(0).randn(2, 6).astype("f"),
            "idx": np.random.RandomState(1).randint(0, 8, size=(2, 1, 3)).astype("int32")}
    before = run(g, feed)
    _grow(g, grp)
    after = run(g, feed)
    assert after["y0"].shape == (2, 7, 3)
    np.testing.assert_array_equal(after["y0"][:, :5], before["y0"])


def test_picks_of_single_channels_block_but_allow_growth():
    """x[..., j] (a post-processing unrolled per class) blocks a group and is recorded as a Pick; growth
    with allow_picks leaves it reading the same old channel."""
    n = Net((None, 6))
    scores = n.dense("cls", n.x, 6, 4)
    pick = n.op("pick", "StridedSlice", scores, n.c("b", [0, 2]), n.c("e", [0, 3]), n.c("s", [1, 1]),
                Index=tf.int32, begin_mask=1, end_mask=1, shrink_axis_mask=2)
    g = n.done(pick)
    grp = group_for(g, "cls/BiasAdd:0", 1)
    assert [b.node for b in grp.blockers] == ["pick"]
    assert [(p.node, p.axis, p.position) for p in grp.picks] == [("pick", 1, 2)]
    with pytest.raises(ChannelError, match="blocked at pick"):
        _grow(g, grp)
    feed = n.feed()
    before = run(g, feed)
    _grow(g, grp, allow_picks=True)
    assert g.weights["cls/kernel"].value.shape == (6, 6)
    np.testing.assert_array_equal(run(g, feed)["y0"], before["y0"])
