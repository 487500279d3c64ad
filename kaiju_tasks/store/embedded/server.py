"""The embedded server's lifecycle: :class:`EmbeddedPostgres` starts, reuses and stops it.

``start()`` prepares the data directory (``initdb`` when it is empty), then reuses the server
already running there or starts one with ``pg_ctl``, and records the caller as attached;
``stop()`` detaches it and stops the server when no live process is attached any more. Both
run under the data directory's inter-process lock (``registry``).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import shlex
import stat
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

from kaiju_tasks import errors
from kaiju_tasks.store.embedded import binaries, pidfile, registry, settings, user

# One logger name for the whole embedded server, as users and tests filter on it.
logger = logging.getLogger("kaiju_tasks.store.embedded")

_MAX_SOCKET_PATH = 100  # bytes; sun_path is 108 on Linux and 104 on macOS
_LOG_NAME = "postmaster.log"
_LOG_ROTATE_BYTES = 10 * 1024 * 1024  # the previous log is kept as postmaster.log.1


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir``, started or reused by ``start()``.

    Use as ``with EmbeddedPostgres() as pg: connect(pg.dsn)`` or call ``start()`` and
    ``stop()``; a started instance also stops at interpreter exit. Several instances and
    processes may share a data directory: they share one server, which the last of them to
    stop shuts down.
    """

    def __init__(self, data_dir: Path | None = None) -> None:
        self._data_dir = (data_dir or settings.default_data_dir()).expanduser().resolve()
        self._lock_path = self._data_dir.parent / (self._data_dir.name + ".lock")
        self._registry_path = self._data_dir / registry.NAME
        self._log_path = self._data_dir / _LOG_NAME
        self._thread_lock = threading.Lock()
        self._run_as: user.RunAs | None = None
        self._install: binaries.Install | None = None
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
            run_as = user.service_user() if os.geteuid() == 0 else None
            self._prepare_parent(run_as)
            with registry.file_lock(self._lock_path):
                install = binaries.for_user(binaries.locate(), run_as, settings.ROOT_STATE_DIR)
                self._prepare_data_dir(run_as)
                if not (self._data_dir / "PG_VERSION").exists():
                    self._initdb(install, run_as)
                info, reused = self._attach_or_start(install, run_as)
                dsn = pidfile.dsn(info)
                token = uuid.uuid4().hex
                registry.register(self._registry_path, token, run_as)
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
            with registry.file_lock(self._lock_path):
                others = registry.unregister(self._registry_path, token, self._run_as)
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

    def _prepare_parent(self, run_as: user.RunAs | None) -> None:
        if run_as is None:
            self._data_dir.parent.mkdir(parents=True, exist_ok=True)
            return
        parent = self._data_dir.parent
        existing = next(p for p in (parent, *parent.parents) if p.exists())
        if not user.reachable(existing, run_as, user.EXECUTE):
            # Chmodding someone else's directories (e.g. /root) would open them to everyone.
            raise errors.StoreError(
                f"The {run_as.name} user cannot reach {existing}; choose a data "
                f"directory it can traverse, e.g. {settings.ROOT_STATE_DIR / 'postgres'}."
            )
        user.makedirs_traversable(parent)

    def _prepare_data_dir(self, run_as: user.RunAs | None) -> None:
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

    def _initdb(self, install: binaries.Install, run_as: user.RunAs | None) -> None:
        started_at = time.monotonic()
        rc, output = user.run(
            [
                install.exe("initdb"),
                "-D",
                str(self._data_dir),
                "--auth=trust",
                "--encoding=UTF8",
                "-U",
                settings.SUPERUSER,
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

    def _attach_or_start(
        self, install: binaries.Install, run_as: user.RunAs | None
    ) -> tuple[pidfile.PidFile, bool]:
        deadline = time.monotonic() + settings.PG_CTL_TIMEOUT.total_seconds()
        while True:
            info = pidfile.read(self._data_dir)
            if info is None:
                break
            ours = pidfile.is_postmaster_of(info.pid, self._data_dir)
            if ours is None:
                break  # not ours to inspect: PostgreSQL's own lock-file check decides
            if not ours:
                pidfile.clear_stale(self._data_dir, info)
                break
            if info.status in pidfile.READY_STATUSES:
                return info, True
            if time.monotonic() > deadline:
                raise errors.StoreError(
                    f"The server in {self._data_dir} (pid {info.pid}) stayed "
                    f"{info.status or 'starting'!r} for {settings.PG_CTL_TIMEOUT}."
                    f"{self._log_tail()}"
                )
            time.sleep(settings.POLL_S)  # starting up, or shutting down after someone's pg_ctl stop
        return self._start_server(install, run_as), False

    def _start_server(
        self, install: binaries.Install, run_as: user.RunAs | None
    ) -> pidfile.PidFile:
        socket_dir = self._socket_dir(run_as)
        self._rotate_log()
        options = ["-c", "listen_addresses=", "-c", f"port={settings.PORT}", "-k", str(socket_dir)]
        for name, value in settings.SERVER_SETTINGS.items():
            options += ["-c", f"{name}={value}"]
        timeout_s = int(settings.PG_CTL_TIMEOUT.total_seconds())
        rc, output = user.run(
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
        info = pidfile.read(self._data_dir)
        if rc != 0 or info is None or info.status not in pidfile.READY_STATUSES:
            raise errors.StoreError(
                f"PostgreSQL failed to start in {self._data_dir} (pg_ctl exit {rc}):\n"
                f"{output}{self._log_tail()}"
            )
        return info

    def _socket_dir(self, run_as: user.RunAs | None) -> Path:
        if len(os.fsencode(self._data_dir / f".s.PGSQL.{settings.PORT}")) < _MAX_SOCKET_PATH:
            return self._data_dir
        digest = hashlib.sha256(os.fsencode(self._data_dir)).hexdigest()[:12]
        path = settings.SOCKET_FALLBACK_PARENT / f"kaiju-tasks-{digest}"
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
        info = pidfile.read(self._data_dir)
        if info is None or not pidfile.is_postmaster_of(info.pid, self._data_dir):
            return
        assert self._install is not None
        rc, output = user.run(
            [
                self._install.exe("pg_ctl"),
                "-D",
                str(self._data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(settings.PG_CTL_TIMEOUT.total_seconds())),
                "stop",
            ],
            self._run_as,
        )
        if rc != 0 and pidfile.is_postmaster_of(info.pid, self._data_dir):
            raise errors.StoreError(
                f"PostgreSQL failed to stop in {self._data_dir} (pg_ctl exit {rc}):\n"
                f"{output}{self._log_tail()}"
            )
        # pg_ctl returns once postmaster.pid is gone, a moment before the process exits.
        deadline = time.monotonic() + settings.PG_CTL_TIMEOUT.total_seconds()
        while pidfile.is_postmaster_of(info.pid, self._data_dir) and time.monotonic() < deadline:
            time.sleep(settings.POLL_S / 5)
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

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\n--- last lines of {self._log_path} ---\n{tail}"
