"""Broken models (issue 6, item 2): every case of the corpus gives a clear, one-paragraph LoadError
naming the file (and node, where there is one), a non-zero exit without a traceback, in bounded time
and memory, and leaves no output directory. Bit-flipped models either fail that way or load and
compute what TensorFlow computes on them.

Complements tests/io/test_loader.py (missing model, garbage/empty pb, missing/truncated/foreign
variables), which these cases do not repeat.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ADDRESS_SPACE, HERE, assert_clean_cli_error, clean_env, leftovers, limits, run_cli

import corpus
from graphslim.errors import GraphslimError, LoadError
from graphslim.io.loader import describe, load
from graphslim.testing import fixture_io

BAD = {c.name: c for c in corpus.BAD_INPUTS}
# Cases whose regression would abort the process (a TensorFlow CHECK failure) run only in the driver.
IN_PROCESS = sorted(name for name, case in BAD.items() if case.in_process)
BIT_FLIP_SEEDS = range(16)


def check_error(exc: GraphslimError, model: Path, case) -> None:
    message = str(exc)
    assert not getattr(exc, "unexpected", False), f"caught only by the safety net: {message}"
    assert "\n" not in message.strip(), message
    assert str(model) in message or model.name in message, message
    for fragment in case.expect:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_bad_model_gives_a_clear_load_error(bad_models, name):
    case, model = BAD[name], bad_models[name]
    start = time.perf_counter()
    try:
        g = load(model)
    except LoadError as exc:
        check_error(exc, model, case)
    else:
        assert case.may_load, f"{name} loaded: {g}"
    assert time.perf_counter() - start < 30
    try:
        describe(model)
    except LoadError as exc:
        assert not getattr(exc, "unexpected", False), str(exc)


@pytest.mark.parametrize("seed", BIT_FLIP_SEEDS)
def test_bit_flipped_pb_errors_cleanly_or_loads(tmp_path, seed):
    case = corpus.bit_flipped(seed)
    model = case.build(tmp_path)
    try:
        load(model)
    except LoadError as exc:
        assert not getattr(exc, "unexpected", False), str(exc)
        assert "\n" not in str(exc).strip()


def test_every_bad_model_through_the_cli_in_one_bounded_process(bad_models, tmp_path):
    """All corpus cases and bit-flipped models through ``graphslim optimize`` in one subprocess
    under a 6 GiB address-space limit and a 60 s alarm per model (cli_driver.py)."""
    inputs, _ = fixture_io("vgg_digits")
    npy = {}
    for key, value in inputs.items():
        npy[key] = str(tmp_path / f"{key}.npy")
        np.save(npy[key], value)
    cases = []
    for name, model in sorted(bad_models.items()):
        cases.append({"name": name, "model": str(model), "out": str(tmp_path / "out" / name / "slim")})
    for seed in BIT_FLIP_SEEDS:
        case = corpus.bit_flipped(100 + seed)
        d = tmp_path / "flips" / case.name
        d.mkdir(parents=True)
        cases.append({"name": case.name, "model": str(case.build(d)), "inputs": npy,
                      "out": str(tmp_path / "out" / case.name / "slim")})
    for c in cases:
        Path(c["out"]).parent.mkdir(parents=True)
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(HERE / "cli_driver.py"), str(spec)], capture_output=True,
                          text=True, timeout=600, env=clean_env(), preexec_fn=limits(ADDRESS_SPACE))
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = {r["name"]: r for r in records if "code" in r}
    started = [r["start"] for r in records if "start" in r]
    assert proc.returncode == 0, (f"the driver died (exit {proc.returncode}) during "
                                  f"{started[-1] if started else '?'}: {proc.stderr[-2000:]}")
    assert len(done) == len(cases)
    flips_loaded = 0
    for c in cases:
        r = done[c["name"]]
        out = Path(c["out"])
        assert "Traceback" not in r["stderr"], (c["name"], r["stderr"])
        assert r["seconds"] < 60, (c["name"], r["seconds"])
        assert not r["leftovers"], (c["name"], r["leftovers"])
        if r["code"] == 0:
            assert c["name"].startswith("bit_flip") or BAD[c["name"]].may_load, (c["name"], r)
            assert r["verify"] in ("match", "output-runs"), (c["name"], r["verify"])
            flips_loaded += 1
            continue
        assert r["code"] == 2, (c["name"], r)
        assert not out.exists(), c["name"]
        errors = [ln for ln in r["stderr"].splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, (c["name"], r["stderr"])
        assert "graphslim bug" not in errors[0], (c["name"], errors[0])  # not the safety net
        if c["name"] in BAD:
            for fragment in BAD[c["name"]].expect:
                assert fragment in errors[0], (c["name"], fragment, errors[0])


def test_huge_checkpoint_claim_is_refused_without_allocating(bad_models, tmp_path):
    """An 8 GB checkpoint claim under a 6 GiB address-space limit, through the real console script:
    refused cleanly instead of allocating (which would die with MemoryError or abort). The driver
    test above runs every case (the 4 TB constant too) under the same limit."""
    name = "forged_huge_checkpoint"
    out = tmp_path / "out"
    result = run_cli("optimize", bad_models[name], "-o", out, timeout=120)
    assert_clean_cli_error(result, *BAD[name].expect)
    assert not leftovers(out)
