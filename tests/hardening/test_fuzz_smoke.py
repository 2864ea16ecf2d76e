"""A short smoke run of the fuzz harnesses in benchmarks/fuzz.py (issue 6, item 3): a few hundred
seeded random executions over the loader (raw bytes, structured mutations of fixtures, frozen graphs)
and the pipeline parser, in this process. Any exception other than a GraphslimError, or a
GraphslimError only the loader's last-resort net caught, fails the test with its traceback. The long
run (100,000+ executions, atheris when installed) is ``python benchmarks/fuzz.py``."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("graphslim_fuzz", ROOT / "benchmarks" / "fuzz.py")
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)

SMOKE = {"pipeline": 400, "raw": 150, "mutate": 100, "frozen": 50}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("harness", sorted(SMOKE))
def test_fuzz_smoke(work, tmp_path, harness):
    rec = fuzz.run_random(harness, runs=SMOKE[harness], seconds=25, seed=1234, out=tmp_path / "found",
                          work=work / harness)
    assert rec.runs >= min(SMOKE[harness], 20)
    failures = "\n\n".join(f"{key} x{info['count']}:\n{info['example']}" for key, info in rec.kinds.items())
    assert rec.failures == 0, failures
