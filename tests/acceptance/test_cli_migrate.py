"""The ``kaiju-tasks migrate`` command run as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kaiju_tasks.store import migrate


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "kaiju_tasks.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


async def test_migrate_command_applies_migrations_then_reports_up_to_date(empty_dsn):
    first = _cli("migrate", env={"KAIJU_TASKS_DATABASE_DSN": empty_dsn})
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"applied": [m.version for m in migrate.available()]}
    again = _cli("--dsn", empty_dsn, "migrate")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "database is up to date"


async def test_migrate_command_reports_an_unreachable_database_without_traceback():
    result = _cli("--dsn", "postgresql://postgres@127.0.0.1:1/nowhere", "migrate")
    assert result.returncode == 1
    assert "cannot connect to the database" in result.stderr
    assert "Traceback" not in result.stderr
