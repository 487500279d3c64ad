"""The postmaster's lock file: reading ``postmaster.pid``, telling a live server from a stale file.

A server counts as running in a data directory only when the pid in its ``postmaster.pid`` is
a live ``postgres`` process whose working directory is that data directory, so a pid reused by
another process is never taken for it. ``clear_stale`` removes the file a killed postmaster
left behind when PostgreSQL's own check would mistake it for a live one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import psutil

from kaiju_tasks import errors
from kaiju_tasks.store.embedded import settings

# One logger name for the whole embedded server, as users and tests filter on it.
logger = logging.getLogger("kaiju_tasks.store.embedded")

READY_STATUSES = frozenset({"ready", "standby"})
"""The ``postmaster.pid`` statuses of a server that accepts connections."""

_ORPHAN_WAIT = timedelta(seconds=10)


@dataclasses.dataclass(frozen=True)
class PidFile:
    """The parts of ``postmaster.pid`` we use (one value per line, see pidfile.h)."""

    pid: int
    port: int
    socket_dir: Path | None
    status: str  # "starting", "ready", "standby", "stopping"; empty while still written


def read(data_dir: Path) -> PidFile | None:
    """The ``postmaster.pid`` of ``data_dir``, or None if there is none or it is incomplete."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None  # being written by a starting postmaster, or empty after a crash
    line = [*lines[1:8], *[""] * 7]
    port = int(line[2]) if line[2].strip().isdigit() else settings.PORT
    socket_dir = Path(line[3].strip()) if line[3].strip() else None
    return PidFile(pid=pid, port=port, socket_dir=socket_dir, status=line[6].strip())


def is_postmaster_of(pid: int, data_dir: Path) -> bool | None:
    """Whether ``pid`` is a live postgres working in ``data_dir``; None if we may not look."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # The postmaster chdirs into its data directory, so a reused pid cannot pass this.
        return proc.name() == "postgres" and Path(proc.cwd()) == data_dir
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return None


def processes_in(data_dir: Path) -> list[int]:
    """The pids of the live postgres processes working in ``data_dir``."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (
                proc.name() == "postgres"
                and proc.status() != psutil.STATUS_ZOMBIE
                and Path(proc.cwd()) == data_dir
            ):
                found.append(proc.pid)
    return found


def clear_stale(data_dir: Path, info: PidFile) -> None:
    """Make way for a start after the postmaster of ``info`` died without cleaning up."""
    # The postmaster died without removing its lock file (SIGKILL, OOM killer, host
    # crash). Its backends notice and exit within moments; starting while any is still
    # attached to the old shared memory would fail, so wait for them first.
    deadline = time.monotonic() + _ORPHAN_WAIT.total_seconds()
    while orphans := processes_in(data_dir):
        if time.monotonic() > deadline:
            raise errors.StoreError(
                f"postgres processes {orphans} still run in {data_dir} although "
                f"their postmaster (pid {info.pid}) is gone; stop them and retry."
            )
        time.sleep(settings.POLL_S)
    if not psutil.pid_exists(info.pid):
        return  # a dead pid: PostgreSQL removes the stale lock file itself
    # The pid is a zombie (pid 1 in many containers never reaps) or was reused by an
    # unrelated process: PostgreSQL's kill(pid, 0) check would take it for a live server
    # and refuse to start. With no postgres process left in the directory (checked just
    # above, standing in for the shared-memory check the file enables), removing it is safe.
    stale = [data_dir / "postmaster.pid"]
    if info.socket_dir is not None:
        # The socket's lock file names the dead postmaster too and is checked the same way.
        socket_lock = info.socket_dir / f".s.PGSQL.{info.port}.lock"
        with contextlib.suppress(OSError, IndexError):
            if socket_lock.read_text().splitlines()[0].strip() == str(info.pid):
                stale.append(socket_lock)
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    logger.warning(
        "Stale postmaster.pid removed",
        extra={
            "event": "embedded_postgres_stale_pid_removed",
            "data_dir": str(data_dir),
            "pid": info.pid,
        },
    )


def dsn(info: PidFile) -> str:
    """The DSN of the server ``info`` describes: its Unix socket, as the superuser."""
    if info.socket_dir is None:
        raise errors.StoreError(
            f"The running server (pid {info.pid}) has no Unix socket; it was not started here."
        )
    host = quote(str(info.socket_dir), safe="/")
    found = f"postgresql://{settings.SUPERUSER}@/{settings.DATABASE}?host={host}"
    if info.port != settings.PORT:
        found += f"&port={info.port}"
    return found
