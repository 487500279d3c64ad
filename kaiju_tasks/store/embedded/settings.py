"""The embedded server's settings: where it lives, how it listens, what it runs with.

These are fixed: the only choice a caller makes is the data directory (``default_data_dir``).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import platformdirs

ENV_DATA_DIR = "KAIJU_TASKS_EMBEDDED_DIR"
"""Environment variable naming the data directory; the caller reads it and passes it on."""

SERVICE_USER = "kaiju-tasks"
"""System user the server runs as when the caller is root (PostgreSQL refuses to run as root)."""

ROOT_STATE_DIR = Path("/var/lib/kaiju-tasks")
"""Root's state directory: default data directory parent and the copied binaries."""

SOCKET_FALLBACK_PARENT = Path("/tmp")
"""Parent of the socket directory used when the data directory path is too long for a socket."""

PORT = 5432
"""Port number in the socket file name (``.s.PGSQL.5432``); nothing listens on TCP."""

SUPERUSER = "postgres"
"""Database superuser created by ``initdb`` and used in the DSN."""

DATABASE = "postgres"
"""Database named in the DSN."""

PG_CTL_TIMEOUT = timedelta(seconds=60)
"""Longest wait for the server to start or stop (``pg_ctl -t``) or to become ready."""

SERVER_SETTINGS: dict[str, str] = {
    # Room for several executors' pools plus tests creating databases in parallel.
    "max_connections": "200",
    # The socket directory is private already; this keeps the socket private if it is not.
    "unix_socket_permissions": "0700",
}
"""Settings passed to the server as ``-c name=value`` on every start. Durability defaults
(``fsync``, ``synchronous_commit``, ``full_page_writes``) are deliberately left on."""

POLL_S = 0.05
"""Seconds between two looks at a server that is starting or stopping."""


def default_data_dir(override: str | None = None) -> Path:
    """Return the embedded server's data directory.

    Args:
        override: the value of ``KAIJU_TASKS_EMBEDDED_DIR`` if set; the caller reads the
            environment so that this module reads none.

    Returns:
        ``override`` if given; ``/var/lib/kaiju-tasks/postgres`` for root (``/root`` must stay
        private and the server's user could not reach it); otherwise the user's data
        directory, e.g. ``~/.local/share/kaiju-tasks/postgres``.
    """
    if override:
        return Path(override).expanduser()
    if os.geteuid() == 0:
        return ROOT_STATE_DIR / "postgres"
    return platformdirs.user_data_path("kaiju-tasks") / "postgres"
