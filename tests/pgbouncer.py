"""Debian's PgBouncer in transaction mode on loopback, in front of a test database.

Few server connections (``default_pool_size``) for many clients, so that transactions of
different clients really share server connections, as in production.

Without pgbouncer the tests that use it are skipped; with ``KAIJU_TASKS_REQUIRE_PGBOUNCER=1``
(CI) they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote, urlsplit, urlunsplit

import pytest

SERVER_USER = "postgres"
REQUIRE = "KAIJU_TASKS_REQUIRE_PGBOUNCER"
"""Set to 1 to fail, not skip, a test that cannot run PgBouncer."""


def unavailable(why: str) -> NoReturn:
    """Skip the test for ``why``, or fail it when :data:`REQUIRE` is set to 1."""
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{why}, and {REQUIRE}=1 requires pgbouncer")
    pytest.skip(why)


def find() -> str | None:
    """The pgbouncer binary, or None."""
    return (
        os.environ.get("KAIJU_TASKS_PGBOUNCER")
        or shutil.which("pgbouncer")
        or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def pgbouncer(dsn: str, *, pool_size: int = 3) -> Iterator[str]:
    """Run PgBouncer (``pool_mode = transaction``) in front of ``dsn``; yield its DSN."""
    binary = find()
    if binary is None:
        unavailable("no pgbouncer: apt-get install pgbouncer (or set KAIJU_TASKS_PGBOUNCER)")
    parts = urlsplit(dsn)
    database = parts.path.lstrip("/") or "postgres"
    user = unquote(parts.username or "postgres")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 5432
    if parts.query:  # e.g. ?host=/socket/dir for a Unix socket
        for item in parts.query.split("&"):
            key, _, value = item.partition("=")
            if key == "host":
                host = unquote(value)
            if key == "port":
                port = int(value)
    if host.startswith("/") and os.geteuid() == 0:
        # PgBouncer runs as SERVER_USER: it must be able to reach a Unix socket's directory
        # (the embedded server's may sit under a home directory only root can enter).
        reachable = subprocess.run(
            ["runuser", "-u", SERVER_USER, "--", "test", "-x", host],
            capture_output=True,
            check=False,
            timeout=30,
        )
        if reachable.returncode != 0:
            unavailable(f"pgbouncer (as {SERVER_USER}) cannot enter the socket directory {host}")
    root = Path(tempfile.mkdtemp(prefix="kaiju-tasks-pgbouncer-"))
    listen = _free_port()
    (root / "users.txt").write_text(f'"{user}" ""\n')
    (root / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"{database} = host={host} port={port} dbname={database}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {listen}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {root / 'users.txt'}",
                "pool_mode = transaction",
                f"default_pool_size = {pool_size}",
                "max_client_conn = 500",
                "ignore_startup_parameters = extra_float_digits",
                f"logfile = {root / 'pgbouncer.log'}",
                f"pidfile = {root / 'pgbouncer.pid'}",
                "",
            ]
        )
    )
    command = [binary, str(root / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        account = pwd.getpwnam(SERVER_USER)
        os.chown(root, account.pw_uid, account.pw_gid)
        for name in ("users.txt", "pgbouncer.ini"):
            os.chown(root / name, account.pw_uid, account.pw_gid)
        command = [binary, "-u", SERVER_USER, str(root / "pgbouncer.ini")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", listen), 1):
                break
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                log = root / "pgbouncer.log"
                raise AssertionError(
                    f"pgbouncer exited: {err}\n{log.read_text() if log.exists() else ''}"
                )
            assert time.monotonic() < deadline, "pgbouncer did not start listening"
            time.sleep(0.05)
        netloc = f"{parts.username or 'postgres'}@127.0.0.1:{listen}"
        yield urlunsplit(("postgresql", netloc, f"/{database}", "", ""))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
        shutil.rmtree(root, ignore_errors=True)
