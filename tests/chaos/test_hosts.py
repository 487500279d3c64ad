"""Many hosts: executors and managers in network namespaces, the database over veth links.

Each host is a namespace of its own (tests/chaos/netns.py) reaching the private cluster and
the stage service over its link. First the drain of the same batch is measured with 1, 2 and 4
executor hosts. Then, under a stream of tasks, the link of host 1 (an executor and the leading
manager) is cut while it runs stages, and healed later. Wanted:

- its tasks are rescued and finish elsewhere, every task finishes;
- host 1 makes no new call of a run taken from it: every call of such a run was made before
  the cut (the executor's clock reading sent with it, X-Deadline minus X-Timeout), none
  reaches the service after the heal, and it writes no result of such a run;
- a stage is called again only for a run host 1 held at the cut, called by host 1 before the
  cut; every other task makes exactly three calls;
- the standby manager (host 2) leads only after the cut-off leader has stopped acting: the
  server's own statement log shows every duty of host 1 before the first duty of host 2.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kaiju_tasks.service import TaskService
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually
from tests import rpc_fake
from tests.chaos import cluster as cluster_
from tests.chaos import harness, netns

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

HOSTS = 4
DRAIN = 1500  # three-stage tasks per throughput round
RECORD = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) \w+\|([^|]*)\|([^|]*)\|")
DUTY = "'SUSPENDED' LIMIT"  # a fragment of requeue_suspended, which every leader tick runs


class HostProc:
    """A kaiju-tasks CLI process inside host ``i``."""

    def __init__(self, hosts: netns.Hosts, i: int, dsn: str, args: list[str], log: Path) -> None:
        self.log = log
        argv = [sys.executable, "-m", "kaiju_tasks.cli", "--dsn", dsn, *args]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                hosts.command(i, argv), stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _duties(server_log: Path) -> list[tuple[datetime, str]]:
    """(server time, client address) of every leader duty statement the server logged."""
    found: list[tuple[datetime, str]] = []
    current: tuple[datetime, str] | None = None
    text: list[str] = []

    def close() -> None:
        if current is not None and DUTY in "".join(text):
            found.append(current)

    for line in server_log.read_text(errors="replace").splitlines():
        match = RECORD.match(line)
        if match:
            close()
            current = (datetime.fromisoformat(match.group(1)), match.group(3))
            text = [line]
        else:
            text.append(line)
    close()
    return found


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


async def test_hosts_share_the_work_and_a_cut_host_neither_calls_nor_writes_after(
    tmp_path: Path,
) -> None:
    reason = cluster_.skip_reason() or netns.skip_reason()
    if reason is not None:
        cluster_.unavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="kaiju-tasks-pg-hosts-"))
    cluster = cluster_.Cluster(
        root,
        settings={
            "listen_addresses": "'*'",
            "log_min_duration_statement": "0",  # the duty log: every statement, by client
            "log_line_prefix": "'%m|%a|%h|'",
        },
    )
    procs: list[HostProc] = []
    with netns.hosts(HOSTS) as hosts:
        try:
            cluster.init()
            with (cluster.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {netns.SUBNET}.0.0/16 trust\n")
            cluster.start()
            dsn = await harness.migrated_database(cluster.dsn())

            def host_dsn(i: int) -> str:
                return f"postgresql://postgres@{hosts.address(i)}:{cluster.port}/kaiju"

            async with harness.counting_target(delay=0.02, host="0.0.0.0") as target:
                pool = await postgres.create_pool(dsn, max_size=4, application_name="chaos-load")
                service = TaskService(postgres.PostgresTaskStore(pool))
                try:
                    async with harness.counting_target(host="0.0.0.0") as quick:
                        figures = await _throughput(hosts, host_dsn, quick, service, dsn, tmp_path)
                    harness.write_figures(
                        tmp_path,
                        "hosts-drain",
                        {f"{k}_hosts_tasks_per_s": round(rate) for k, rate in figures},
                    )
                    await _cut(hosts, host_dsn, target, service, dsn, cluster, tmp_path, procs)
                finally:
                    for proc in procs:
                        proc.stop()
                    await pool.close()
        finally:
            for proc in procs:
                proc.stop()
            cluster.remove()


def _executor(
    hosts: netns.Hosts, i: int, dsn: str, target: rpc_fake.RpcTarget, log: Path
) -> HostProc:
    url = f"http://{hosts.address(i)}:{target.port}/rpc"
    return HostProc(
        hosts,
        i,
        dsn,
        [
            "executor",
            "--app",
            f"{harness.APP}={url}",
            "--id",
            f"host{i}",
            "--heartbeat",
            "1",
            "--poll",
            "0.2",
            "--shutdown-grace",
            "1",
        ],
        log,
    )


async def _throughput(
    hosts: netns.Hosts,
    host_dsn: Any,
    target: rpc_fake.RpcTarget,
    service: TaskService,
    dsn: str,
    tmp: Path,
) -> list[tuple[int, float]]:
    """Tasks per second draining DRAIN tasks with 1, 2 and 4 executor hosts (already up)."""
    figures: list[tuple[int, float]] = []
    for count in (1, 2, 4):
        await _fetch(dsn, "DELETE FROM tasks")
        procs = [
            _executor(hosts, i, host_dsn(i), target, tmp / f"drain-{count}-{i}.log")
            for i in range(1, count + 1)
        ]
        try:

            async def all_up(count: int = count) -> bool:
                rows = await _fetch(
                    dsn,
                    "SELECT count(*) AS n FROM executors WHERE id = ANY($1)"
                    " AND stopped_at IS NULL AND heartbeat_at > now() - interval '3 seconds'",
                    [f"host{i}" for i in range(1, count + 1)],
                )
                return bool(rows[0]["n"] == count)

            await eventually(all_up, within=60, what=f"{count} executor hosts")
            started = time.monotonic()
            created = await service.create(
                [harness.three_stage_task(n) for n in range(DRAIN)], columns=["id"]
            )
            assert isinstance(created, list)
            await eventually(
                lambda: harness.all_finished(dsn, DRAIN),
                within=300,
                interval=0.05,
                what=f"{count} hosts' drain",
            )
            figures.append((count, DRAIN / (time.monotonic() - started)))
        finally:
            for proc in procs:
                proc.stop()
    await _fetch(dsn, "DELETE FROM tasks")
    return figures


async def _cut(
    hosts: netns.Hosts,
    host_dsn: Any,
    target: rpc_fake.RpcTarget,
    service: TaskService,
    dsn: str,
    cluster: cluster_.Cluster,
    tmp: Path,
    procs: list[HostProc],
) -> None:
    leader_args = [
        "manager",
        "--interval",
        "0.2",
        "--stale-after",
        "3",
        "--standby-interval",
        "0.5",
    ]
    procs.append(HostProc(hosts, 1, host_dsn(1), leader_args, tmp / "manager-1.log"))

    async def leader_on(i: int) -> bool:
        rows = await _fetch(
            dsn,
            "SELECT a.client_addr::text AS addr FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1 AND l.objid = $2",
            postgres.LEADER_LOCK_KEY >> 32,
            postgres.LEADER_LOCK_KEY & 0xFFFFFFFF,
        )
        return [r["addr"] for r in rows] == [f"{hosts.own_address(i)}/32"]

    await eventually(lambda: leader_on(1), within=60, what="host 1's manager to lead")
    procs.append(HostProc(hosts, 2, host_dsn(2), leader_args, tmp / "manager-2.log"))
    for i in range(1, HOSTS + 1):
        procs.append(_executor(hosts, i, host_dsn(i), target, tmp / f"executor-{i}.log"))
    ids: list[str] = []

    async def load() -> None:
        n = 0
        while True:
            created = await service.create(
                [harness.three_stage_task(n + k) for k in range(4)], columns=["id"]
            )
            assert isinstance(created, list)
            ids.extend(t["id"] for t in created)
            n += 4
            await asyncio.sleep(0.1)

    async def held_by_host1() -> list[asyncpg.Record]:
        return await _fetch(
            dsn, "SELECT id, stage FROM tasks WHERE status = 'EXECUTED' AND executor_id = 'host1'"
        )

    loading = asyncio.create_task(load())
    try:
        await eventually(held_by_host1, within=60, what="host 1 to run stages")
        started = time.monotonic()
        hosts.cut(1)
        cut_at = time.monotonic()
        cut_wall = harness.wall()  # a call host 1 made after this is a new call
        # Events from here on are later than anything host 1 did before the cut.
        cut_event = (await _fetch(dsn, "SELECT max(id) AS id FROM events"))[0]["id"]
        # What host 1 held at the cut, each run at the stage whose result it had not
        # committed: its calls on the wire can only be these.
        held = await harness.held(dsn, "host1")
        await eventually(lambda: leader_on(2), within=90, what="host 2's manager to lead")
        await eventually(
            lambda: _rescued(dsn, {task for task, _ in held}),
            within=90,
            what="host 1's tasks to finish elsewhere",
        )
        hosts.heal(1)
        healed_at = time.monotonic()

        async def heard_from_host1() -> bool:
            rows = await _fetch(
                dsn,
                "SELECT heartbeat_at > now() - interval '2 seconds' AS fresh"
                " FROM executors WHERE id = 'host1'",
            )
            return bool(rows and rows[0]["fresh"])

        await eventually(heard_from_host1, within=120, what="host 1's executor to come back")
        await asyncio.sleep(1)  # load keeps arriving with host 1 back
    finally:
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
    await eventually(lambda: harness.all_finished(dsn, ids), within=180, what="every task FINISHED")
    for proc in procs:
        proc.stop()

    rescued = {task for task, _ in held}
    host1 = [c for c in target.calls if c.peer == hosts.own_address(1)]
    claimed_after = {
        r["task_id"]
        for r in await _fetch(
            dsn,
            "SELECT task_id FROM events WHERE type = 'task-received' AND executor_id = 'host1'"
            " AND id > $1",
            cut_event,
        )
    }
    # A run rescued from host 1: host 1 made every call of it before the cut. A call it made
    # after the cut, or once healed, is a new call of a run it no longer owned. When a call
    # was made is the executor's own reading (X-Deadline minus X-Timeout): a request written
    # before the cut may still reach the service later, out of the link's retransmissions.
    new_calls = [
        f"{c.id} made {(harness.made_at(c) or 0) - cut_wall:+.2f} s after the cut"
        for c in host1
        if c.task_id in rescued and (harness.made_at(c) or harness.wall_of(c.at)) > cut_wall
    ]
    arrived_late = [c for c in host1 if c.task_id in rescued and c.at > cut_at]
    after_heal = [c for c in arrived_late if c.at > healed_at]
    # Any other call host 1's requests brought after the cut is of a task it claimed anew.
    others = [
        str(c.id)
        for c in host1
        if c.at > cut_at and c.task_id not in rescued and c.task_id not in claimed_after
    ]
    # Per call: a stage called again is a run host 1 held at the cut, called by it before the
    # cut and again elsewhere after; every task the cut did not hit made exactly 3 calls.
    cut = harness.Fault(
        "link of host 1 cut", started, healed_at, cut_wall, hit=held, detail="host 1"
    )
    check = harness.check_calls(target, ids, [cut])
    # No result of a run taken from host 1 written by it after the cut.
    stale = await _fetch(
        dsn,
        "SELECT type, task_id FROM events WHERE executor_id = 'host1' AND task_id = ANY($1)"
        " AND type NOT IN ('task-suspended', 'task-received', 'task-started')"
        " AND id > (SELECT min(id) FROM events WHERE type = 'task-suspended'"
        "           AND executor_id = 'host1' AND task_id = ANY($1))",
        [task for task, _ in held],
    )
    duties = _duties(cluster.log)
    first = [at for at, addr in duties if addr == hosts.own_address(1)]
    second = [at for at, addr in duties if addr == hosts.own_address(2)]
    figures = {
        "runs_held_at_the_cut": len(held),
        "host2_led_after_host1_last_duty_s": (
            round((min(second) - max(first)).total_seconds(), 1) if first and second else None
        ),
        "healed_after_cut_s": round(healed_at - cut_at, 1),
        "tasks": len(ids),
        "host1_new_calls_of_rescued_runs": len(new_calls),
        "host1_calls_of_rescued_runs_arriving_after_cut": len(arrived_late),
        "host1_calls_of_rescued_runs_arriving_after_heal": len(after_heal),
        "host1_calls_after_cut_of_tasks_not_claimed_anew": len(others),
        "host1_results_written_for_rescued_runs": len(stale),
        **check.figures(),
    }
    harness.write_figures(tmp, "hosts-cut", figures)
    assert stale == [], f"host 1 wrote results of runs taken from it: {stale}"
    assert new_calls == [], f"host 1 called runs taken from it: {new_calls}"
    assert after_heal == [], (
        "calls of runs taken from host 1 reached the service after the heal (made before the"
        f" cut, delivered late): {[str(c.id) for c in after_heal]}"
    )
    assert others == [], f"host 1 called tasks it did not own: {others}"
    assert check.unexplained == [], f"repeated calls the cut does not explain: {check.unexplained}"
    assert check.not_three == {}, f"tasks without one call per stage: {check.not_three}"
    # The leader cut off stepped down before the standby acted: no two leaders at once.
    assert first
    assert second
    assert max(first) < min(second), "two managers acted at once"


async def _rescued(dsn: str, tasks: set[str]) -> bool:
    rows = await _fetch(
        dsn,
        "SELECT count(*) AS n FROM tasks WHERE id = ANY($1) AND status = 'FINISHED'"
        " AND executor_id <> 'host1'",
        sorted(tasks),
    )
    return rows[0]["n"] == len(tasks)
