"""graphslim.io.ckpt_index: the checkpoint index is checked in Python before TensorFlow's reader,
which aborts the process on a hostile one (found by benchmarks/fuzz.py's ckptindex harness). Only
check_index runs here, never TensorFlow's reader (a regression would abort pytest): the attack
tests (tests/hardening/test_attacks.py) run the whole load in child processes."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from graphslim.errors import LoadError
from graphslim.io.ckpt_index import check_index
from graphslim.testing import fixture_path
from tests.hardening import attacks
from tests.hardening.corpus import read_table, write_table

ROOT = Path(__file__).resolve().parents[2]


def test_every_fixture_index_passes():
    indexes = glob.glob(str(ROOT / "fixtures/models/*/variables/variables.index"))
    assert len(indexes) >= 8
    for index in indexes:
        check_index(Path(index))


@pytest.mark.parametrize("defect, expected", [
    ("not_a_proto", "is not a valid record"),
    ("negative_dim", "has a dimension of size -2147483648"),
    ("negative_slice", "has a slice from 1 without a length"),
    ("ref_dtype", "has dtype 101"),
])
def test_hostile_entries_are_refused_naming_the_entry(tmp_path, defect, expected):
    model = attacks.checkpoint_entry(defect)(tmp_path)
    index = model / "variables" / "variables.index"
    with pytest.raises(LoadError, match=expected) as info:
        check_index(index)
    assert str(index) in str(info.value) and "checkpoint entry '" in str(info.value)


def _rewrite(tmp_path, change) -> Path:
    index = tmp_path / "variables.index"
    entries, _ = read_table((fixture_path("vgg_digits") / "variables" / "variables.index").read_bytes())
    index.write_bytes(write_table(change(entries)))
    return index


def test_a_key_listed_twice_is_refused(tmp_path):
    index = _rewrite(tmp_path, lambda e: e[:2] + [e[1]] + e[2:])
    with pytest.raises(LoadError, match="twice"):
        check_index(index)


def test_the_same_slice_listed_twice_is_refused(tmp_path):
    from tensorflow.core.framework import tensor_slice_pb2
    from tensorflow.core.protobuf import tensor_bundle_pb2

    def twice(entries):
        key = b"variables/0/.ATTRIBUTES/VARIABLE_VALUE"
        i = next(i for i, (k, _) in enumerate(entries) if k == key)
        e = tensor_bundle_pb2.BundleEntryProto()
        e.ParseFromString(entries[i][1])
        for _ in range(2):
            e.slices.add().extent.extend([tensor_slice_pb2.TensorSliceProto.Extent() for _ in e.shape.dim])
        entries[i] = (key, e.SerializeToString())
        return entries

    with pytest.raises(LoadError, match="the same slice twice"):
        check_index(_rewrite(tmp_path, twice))


def test_a_truncated_index_is_refused(tmp_path):
    index = tmp_path / "variables.index"
    index.write_bytes((fixture_path("vgg_digits") / "variables" / "variables.index").read_bytes()[:-10])
    with pytest.raises(LoadError, match="corrupt"):
        check_index(index)
