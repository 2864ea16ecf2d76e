"""Shared helpers of the hardening tests: the corpus (built once per session) and subprocess runs of
the real ``graphslim`` console script under time and address-space limits."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRIPT = ROOT / ".venv" / "bin" / "graphslim"
if not SCRIPT.exists():  # another virtualenv layout: the script next to the running interpreter
    SCRIPT = Path(sys.executable).parent / "graphslim"
sys.path.insert(0, str(HERE))

import corpus  # noqa: E402

#: files whose tests check refusals, containment and messages (what a hostile model can make graphslim do),
#: not numerics or fused op names: TensorFlow's oneDNN setting changes nothing they look at, so .ci/run
#: runs them once, in its oneDNN-on pass (test_sandbox.py, which compares run outputs, runs in both)
ONEDNN_NEUTRAL = {"test_attacks.py", "test_bad_inputs.py", "test_bounded.py", "test_faults.py",
                  "test_fuzz_smoke.py", "test_scan.py", "test_terminal.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in ONEDNN_NEUTRAL and item.path.parent == HERE:
            item.add_marker(pytest.mark.onednn_neutral)

ADDRESS_SPACE = 6 * 2**30  # TensorFlow's CPU runtime maps ~1.6 GiB of address space; 8 GB claims must fail


def limits(address_space: int | None = ADDRESS_SPACE, file_size: int | None = None):
    """A preexec_fn: address-space and file-size limits, SIGXFSZ ignored (writes fail with EFBIG), and
    SIGINT/SIGQUIT at their defaults, as in a terminal's foreground job (a suite started as a background
    job of a non-interactive shell inherits them ignored, and the tests that press Ctrl-C would wait)."""
    def apply():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        os.setsid()  # its own process group: signals aimed at it reach no one else
    return apply


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GRAPHSLIM_DEBUG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def run_cli(*args, timeout=180, address_space=ADDRESS_SPACE, file_size=None):
    """The console script in a subprocess, bounded in time and memory."""
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=clean_env(),
                          timeout=timeout, cwd=ROOT, preexec_fn=limits(address_space, file_size))


def assert_clean_cli_error(result, *fragments, code=2):
    """Exit ``code``, one ``error:`` line naming every fragment, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def leftovers(out: Path) -> list[str]:
    """The output, and graphslim temporary directories beside it, that exist."""
    found = [str(out)] if out.exists() or out.is_symlink() else []
    if out.parent.exists():
        found += [str(p) for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.graphslim-")]
    return found


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="session")
def bad_models(corpus_dir) -> dict:
    return corpus.build_all(corpus_dir / "bad", corpus.BAD_INPUTS)


@pytest.fixture(scope="session")
def dangerous_models(corpus_dir) -> dict:
    return corpus.build_all(corpus_dir / "dangerous", corpus.DANGEROUS)
