"""The Makefile's test targets do what the README says they do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _recipe(target: str) -> str:
    """The commands ``make TARGET`` would run, with this test's virtualenv as VENV."""
    done = subprocess.run(
        ["make", "-n", "-s", target, f"VENV={sys.prefix}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_make_test_runs_pytest_as_it_is_and_the_others_pick_their_server():
    readme = (ROOT / "README.md").read_text()
    assert "`make test` runs the tests exactly as `pytest` does" in readme
    # As pytest does: whatever KAIJU_TASKS_TEST_DSN says, untouched.
    assert _recipe("test") == f"{sys.prefix}/bin/pytest -n 2 -q"
    server = _recipe("test-server")
    assert server.startswith("KAIJU_TASKS_TEST_DSN='postgresql://postgres@127.0.0.1:5432/postgres'")
    assert "`make test-server` runs them on a PostgreSQL server you run" in readme
    assert _recipe("test-embedded").startswith("env -u KAIJU_TASKS_TEST_DSN ")
    assert "`make test-embedded` runs them on the embedded PostgreSQL" in readme
