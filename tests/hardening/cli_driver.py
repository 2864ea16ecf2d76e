"""Run ``graphslim optimize`` on many models in one process (TensorFlow is imported once), each under a
time limit, and print one JSON line per model: exit code, the stderr text, seconds, what was left
behind, and for models that load, whether the output computes what TensorFlow computes on the input.

    python cli_driver.py CASES.json      # [{"name", "model", "out", "inputs": {name: .npy path}}]

Run by test_bad_inputs.py in a subprocess under an address-space limit: a crash, a hang or a memory
blow-up shows as the subprocess failing (and the last line printed names the model in progress).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PER_CASE_SECONDS = 60


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _tf_outputs(path: Path, inputs: dict):
    import numpy as np
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: np.asarray(v) for k, v in out.items()}


def _verify(model: Path, out: Path, inputs: dict) -> str:
    """"match" when the written model computes what TensorFlow computes on the input model;
    "output-runs" when TensorFlow cannot run the (damaged) input but runs the output."""
    import numpy as np

    try:
        got = _tf_outputs(out, inputs)
    except Exception as exc:  # noqa: BLE001
        return f"OUTPUT-BROKEN: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        want = _tf_outputs(model, inputs)
    except Exception:  # noqa: BLE001 - TensorFlow itself cannot run the damaged input
        return "output-runs"
    for key, value in want.items():
        if key not in got or got[key].shape != value.shape or not np.allclose(
                got[key], value, rtol=1e-5, atol=1e-5, equal_nan=True):
            return f"MISMATCH on {key}"
    return "match"


def main(spec_file: str) -> None:
    import numpy as np

    from graphslim.cli import cli

    cases = json.loads(Path(spec_file).read_text())
    signal.signal(signal.SIGALRM, _alarm)
    for case in cases:
        model, out = Path(case["model"]), Path(case["out"])
        print(json.dumps({"start": case["name"]}), flush=True)
        err = io.StringIO()
        start = time.perf_counter()
        signal.alarm(PER_CASE_SECONDS)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(["-q", "optimize", str(model), "-o", str(out)], prog_name="graphslim",
                                standalone_mode=False)
        except _Timeout:
            code = "timeout"
        except BaseException as exc:  # noqa: BLE001 - anything escaping the CLI is a finding
            code = "escaped"
            err.write(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        finally:
            signal.alarm(0)
        seconds = time.perf_counter() - start
        record = {"name": case["name"], "code": code if code is not None else 0,
                  "stderr": err.getvalue(), "seconds": round(seconds, 3)}
        left = [str(p) for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.graphslim-")]
        record["leftovers"] = left
        if record["code"] == 0 and out.exists():
            inputs = {k: np.load(v) for k, v in case.get("inputs", {}).items()}
            signal.alarm(PER_CASE_SECONDS)
            try:
                record["verify"] = _verify(model, out, inputs)
            except _Timeout:
                record["verify"] = "TIMEOUT"
            finally:
                signal.alarm(0)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
