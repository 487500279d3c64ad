"""A private PostgreSQL cluster a test starts, stops and restarts at will.

The shared test server is never restarted by a test: faults that take the whole server down
(stop, ``pg_ctl restart``, an outage) run against a cluster of the test's own, made with the
system's ``initdb`` in a temporary directory, listening on a free loopback port, and removed
afterwards. As root, the server runs as the ``postgres`` operating-system user.

Where a cluster cannot be made (no server binaries, no ``postgres`` user as root), the test is
skipped, unless ``KAIJU_TASKS_REQUIRE_CHAOS=1`` (as CI should set): then it fails, so a run
cannot go green without these tests having run. :func:`unavailable` does either.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

BIN_DIRS = tuple(
    Path(p)
    for p in (
        os.environ.get("KAIJU_TASKS_PG_BIN", ""),
        "/usr/lib/postgresql/18/bin",
        "/usr/lib/postgresql/17/bin",
        "/usr/lib/postgresql/16/bin",
        "/usr/lib/postgresql/15/bin",
        "/usr/lib/postgresql/14/bin",
    )
    if p
)
SERVER_USER = "postgres"
REQUIRE_ENV = "KAIJU_TASKS_REQUIRE_CHAOS"


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``; fail it instead under ``KAIJU_TASKS_REQUIRE_CHAOS=1``."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the chaos tests must run here)")
    pytest.skip(reason)


def find_bin_dir() -> Path | None:
    """The first directory holding ``initdb`` and ``pg_ctl``, or None."""
    for directory in BIN_DIRS:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def skip_reason() -> str | None:
    """Why a private cluster cannot be made here, or None when it can."""
    if find_bin_dir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) found"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root without a {SERVER_USER!r} user to run the server"
    return None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """One private cluster: ``start()``, ``stop()``, ``restart()``, ``dsn(database)``."""

    def __init__(
        self, root: Path, *, port: int | None = None, settings: dict[str, str] | None = None
    ):
        bin_dir = find_bin_dir()
        assert bin_dir is not None
        self.bin = bin_dir
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = port or free_port()
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{root}'",
            "max_connections": "200",
            "fsync": "off",  # a test cluster: a crash of the machine loses nothing of value
            **(settings or {}),
        }

    def _run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(a) for a in args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise AssertionError(f"{command} failed:\n{done.stdout}{done.stderr}\n{log[-2000:]}")
        return done

    def _own_root(self) -> None:
        """Create the cluster's directory, private to the server's user."""
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self.root.chmod(0o700)

    def _write_settings(self) -> None:
        """Append this cluster's settings to the data directory's (they win over earlier ones)."""
        lines = [f"{key} = {value}" for key, value in self.settings.items()]
        with (self.data / "postgresql.auto.conf").open("a") as conf:
            conf.write("\n".join(lines) + "\n")

    def init(self) -> None:
        """Create the data directory (``initdb``) and write the settings."""
        self._own_root()
        self._run(
            self.bin / "initdb",
            "-D",
            self.data,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._write_settings()

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m mode``)."""
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m mode``."""
        self._run(
            self.bin / "pg_ctl",
            "-D",
            self.data,
            "-l",
            self.log,
            "-m",
            mode,
            "-w",
            "-t",
            "60",
            "restart",
        )

    def init_standby(self, primary: Cluster) -> None:
        """Make this cluster a streaming-replication standby of ``primary`` (``pg_basebackup -R``).

        ``primary`` must run with ``wal_level`` replica or logical (the default) and accept
        replication connections from loopback (initdb's trust setup does).
        """
        self._own_root()
        self._run(
            self.bin / "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            self.data,
            "-R",  # standby.signal and primary_conninfo
            "-X",
            "stream",
            "--no-sync",
        )
        # The copy carries the primary's own settings: this cluster's port and socket win.
        self._write_settings()

    def promote(self) -> None:
        """Promote a standby to primary and wait until it accepts writes."""
        self._run(self.bin / "pg_ctl", "-D", self.data, "-w", "-t", "60", "promote")

    def running(self) -> bool:
        """Whether a postmaster runs on the data directory."""
        return (
            self._run(self.bin / "pg_ctl", "-D", self.data, "status", check=False).returncode == 0
        )

    def dsn(self, database: str = "postgres") -> str:
        """A DSN of ``database`` on this cluster over TCP."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def remove(self) -> None:
        """Stop the server if it runs (immediate) and delete its files."""
        if self.data.exists() and self.running():
            self._run(
                self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", check=False
            )
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_cluster(settings: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A started private cluster, removed on exit; skips the test when none can be made."""
    reason = skip_reason()
    if reason is not None:
        unavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="kaiju-tasks-pg-"))
    cluster = Cluster(root, settings=settings)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
