"""The wheel a user installs holds every package, the migrations and the queries."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def test_wheel_contains_every_package_migration_and_query_file(tmp_path):
    source = tmp_path / "source"  # a clean copy: no build/ leftovers can fill the gaps
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("kaiju_tasks", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("kaiju_tasks-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {
        str(p.parent.relative_to(ROOT)).replace("/", ".")
        for p in (ROOT / "kaiju_tasks").rglob("__init__.py")
    }
    for package in packages:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    for migration in (ROOT / "migrations").glob("*.sql"):
        assert f"kaiju_tasks/migrations/{migration.name}" in names
    assert "kaiju_tasks/store/queries.sql" in names
    dashboard = ROOT / "kaiju_tasks" / "dashboard"
    for asset in [*(dashboard / "templates").iterdir(), *(dashboard / "static").iterdir()]:
        assert str(asset.relative_to(ROOT)) in names, asset.name
    assert "kaiju_tasks/py.typed" in names
