"""The user the binaries run as: the ``kaiju-tasks`` system user for root, what it can reach.

PostgreSQL refuses to run as root, so a root caller runs ``initdb``, ``pg_ctl`` and the server
as :data:`~settings.SERVICE_USER` (created on first use); ``run`` runs a program as that user,
and ``reachable`` tells whether the user can get at a path, so that nothing is chmodded that
this package did not create.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import subprocess
from pathlib import Path

from kaiju_tasks import errors
from kaiju_tasks.store.embedded import settings

# One logger name for the whole embedded server, as users and tests filter on it.
logger = logging.getLogger("kaiju_tasks.store.embedded")

EXECUTE = 0o1
"""Permission bit to traverse a directory or run a file (of one rwx triple)."""
READ = 0o4
"""Permission bit to read (of one rwx triple)."""


@dataclasses.dataclass(frozen=True)
class RunAs:
    """The system user (and its primary group) a program runs as."""

    name: str
    uid: int
    gid: int
    home: str


def run(args: list[str], run_as: RunAs | None) -> tuple[int, str]:
    """Run a PostgreSQL program as ``run_as``; return its exit code and output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGPORT, PGDATA...
    env["LC_ALL"] = "C"  # always installed, unlike whatever LANG names
    if run_as is not None:
        env.update(HOME=run_as.home, USER=run_as.name, LOGNAME=run_as.name)
    try:
        # pg_ctl -l redirects the server's stdio, so the pipes close when pg_ctl exits.
        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None,
            timeout=settings.PG_CTL_TIMEOUT.total_seconds() + 30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise errors.StoreError(f"Could not run {args[0]}: {exc}") from exc
    return result.returncode, (result.stdout + result.stderr).strip()


def service_user() -> RunAs:
    """The ``kaiju-tasks`` system user, created if it does not exist yet."""
    name = settings.SERVICE_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
        command = ["useradd", "--system", "--no-create-home", "--shell", shell, name]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            failure = result.stderr.strip()
        except OSError as exc:
            failure = str(exc)
        try:
            entry = pwd.getpwnam(name)  # also covers losing a race to another process
        except KeyError:
            raise errors.StoreError(
                f"PostgreSQL cannot run as root and the system user {name} could not "
                f"be created ({failure}); create it, or run as another user."
            ) from None
        logger.info(
            "System user created for embedded PostgreSQL",
            extra={"event": "embedded_postgres_user_created", "user": name},
        )
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def reachable(path: Path, run_as: RunAs, want: int) -> bool:
    """Whether ``run_as`` (primary group only, as we run it) can reach ``path`` for ``want``."""
    path = path.resolve()
    try:
        return all(_permits(p.stat(), run_as, EXECUTE) for p in path.parents) and _permits(
            path.stat(), run_as, want
        )
    except OSError:
        return False


def _permits(st: os.stat_result, run_as: RunAs, want: int) -> bool:
    if st.st_uid == run_as.uid:
        shift = 6
    elif st.st_gid == run_as.gid:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & want == want


def makedirs_traversable(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0755 whatever the umask."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # created concurrently: not ours to chmod
        directory.chmod(0o755)
