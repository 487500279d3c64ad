"""Who uses a data directory: the inter-process lock and the registry of attached processes.

Every start and stop runs under ``file_lock`` (``<data_dir>.lock``, an ``flock`` the kernel
releases when its holder dies). Each attached process has an entry in
``<data_dir>/kaiju_tasks_attached.json``; entries of dead processes are dropped whenever the
registry is read, so the last live process to detach is the one that stops the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import psutil

from kaiju_tasks.store.embedded import user

# One logger name for the whole embedded server, as users and tests filter on it.
logger = logging.getLogger("kaiju_tasks.store.embedded")

NAME = "kaiju_tasks_attached.json"
"""The registry's file name, in the data directory."""

Entry = dict[str, str | int | float]
"""One attached process: its ``pid``, ``create_time`` and the ``token`` of its attachment."""


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold the inter-process lock ``lock_path`` (created if missing) for the block."""
    # flock is released by the kernel if we die, and the descriptor is not inherited by
    # pg_ctl or the server (Python opens files non-inheritable).
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def register(path: Path, token: str, run_as: user.RunAs | None) -> None:
    """Record this process as attached under ``token``."""
    me = psutil.Process()
    entries = [*_live_entries(path)]
    entries.append({"pid": me.pid, "create_time": me.create_time(), "token": token})
    _write(path, entries, run_as)


def unregister(path: Path, token: str, run_as: user.RunAs | None) -> int:
    """Remove ``token``; return how many live attachments remain."""
    if not path.exists():
        return 0
    entries = [e for e in _live_entries(path) if e["token"] != token]
    _write(path, entries, run_as)
    return len(entries)


def _live_entries(path: Path) -> Iterator[Entry]:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except ValueError:
        logger.warning(
            "Unreadable attachment registry ignored",
            extra={"event": "embedded_postgres_registry_reset", "path": str(path)},
        )
        return
    for entry in entries:
        try:
            proc = psutil.Process(int(entry["pid"]))
            # create_time tells a live attached process from a later one reusing its pid.
            if (
                proc.status() != psutil.STATUS_ZOMBIE
                and abs(proc.create_time() - float(entry["create_time"])) < 0.5
            ):
                yield entry
        except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
            continue


def _write(path: Path, entries: list[Entry], run_as: user.RunAs | None) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries))
    if run_as is not None:
        # Keep every file in the data directory readable by the server (base backups).
        os.chown(tmp, run_as.uid, run_as.gid)
    tmp.replace(path)
