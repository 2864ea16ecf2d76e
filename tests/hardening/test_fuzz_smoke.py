"""A short smoke run of the fuzz harnesses in benchmarks/fuzz.py (issue 6, item 3; issue 13, item 7): a
few hundred seeded random executions over the loader (raw bytes, structured mutations of fixtures,
frozen graphs) and the pipeline parser, in this process; and a few dozen over the object graph, the
checkpoint index and the function library, in a child process (TensorFlow's checkpoint reader and
graph importer can abort a process on a malformed input: that must fail this test, not end pytest).
Any exception other than a GraphslimError, a GraphslimError only the loader's last-resort net caught,
a crash or a hang fails the test with its traceback or stack dump. The long run (100,000+ executions,
atheris when installed) is ``python benchmarks/fuzz.py``."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("graphslim_fuzz", ROOT / "benchmarks" / "fuzz.py")
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)

SMOKE = {"pipeline": 400, "raw": 150, "mutate": 100, "frozen": 50}
SMOKE_IN_CHILD = {"objgraph": 40, "ckptindex": 60, "funclib": 40}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _failures(kinds) -> str:
    return "\n\n".join(f"{key} x{info['count']}:\n{info['example']}" for key, info in kinds.items())


@pytest.mark.parametrize("harness", sorted(SMOKE))
def test_fuzz_smoke(work, tmp_path, harness):
    rec = fuzz.run_random(harness, runs=SMOKE[harness], seconds=25, seed=1234, out=tmp_path / "found",
                          work=work / harness)
    assert rec.runs >= min(SMOKE[harness], 20)
    assert rec.failures == 0, _failures(rec.kinds)


@pytest.mark.parametrize("harness", sorted(SMOKE_IN_CHILD))
def test_fuzz_smoke_in_a_child(tmp_path, harness):
    """Known crashes (found, reported, not fixed yet: ``fuzz.index_known_crash``) are skipped and
    counted apart, as in the long run."""
    total = fuzz.run_harness_in_children(harness, SMOKE_IN_CHILD[harness], 150, "random", tmp_path, seed=1234)
    assert total["runs"] >= SMOKE_IN_CHILD[harness], total
    assert total["failures"] == 0, _failures(total["kinds"])
