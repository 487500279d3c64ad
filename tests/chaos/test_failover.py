"""Primary failover under load: a streaming standby promoted, the primary gone, nothing lost.

The product is given a multi-host DSN (``host=primary,standby`` with
``target_session_attrs=read-write``): every connection goes to whichever server accepts writes.
The primary commits synchronously to the standby (``synchronous_standby_names``), so a create
that was acknowledged is on the standby when the primary dies. Then the primary is stopped
(immediate: a crash) and the standby promoted while tasks keep arriving. Every acknowledged task
must exist on the new primary and finish; a manager must lead again (the advisory lock held on
the new primary); no stage may run twice except for tasks an executor held at the moment of the
crash whose result was not committed (a rescue calls them again, with the same request id):
a call is excused only if it was made before the crash and its run was, on the standby at the
crash, still at that stage (its result not committed). Tasks no fault hit make exactly three
calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from kaiju_tasks.service import TaskService
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually
from tests.chaos import cluster as cluster_
from tests.chaos import harness
from tests.chaos.test_chaos import RATE, RECOVERY_BOUND, Run, _print_logs

LONG = os.environ.get("KAIJU_TASKS_CHAOS_LONG") == "1"
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


@contextlib.contextmanager
def primary_and_standby() -> Iterator[tuple[cluster_.Cluster, cluster_.Cluster]]:
    """A primary that commits synchronously to a streaming standby; both removed on exit."""
    reason = cluster_.skip_reason()
    if reason is not None:
        cluster_.unavailable(reason)
    primary_root = Path(tempfile.mkdtemp(prefix="kaiju-tasks-pg-primary-"))
    standby_root = Path(tempfile.mkdtemp(prefix="kaiju-tasks-pg-standby-"))
    primary = cluster_.Cluster(
        primary_root,
        settings={
            "wal_level": "replica",
            "max_wal_senders": "5",
            # An acknowledged commit is on the standby: zero loss when the primary dies.
            "synchronous_standby_names": "'*'",
            "synchronous_commit": "on",
        },
    )
    # The standby's copy carries the primary's settings: once promoted, with no standby of its
    # own, it must not wait for one (every commit would hang).
    standby = cluster_.Cluster(
        standby_root, settings={"hot_standby": "on", "synchronous_standby_names": "''"}
    )
    try:
        primary.init()
        primary.start()
        standby.init_standby(primary)
        standby.start()
        yield primary, standby
    finally:
        standby.remove()
        primary.remove()


async def _leader_on(dsn: str) -> bool:
    """Whether a manager holds the leadership lock on the server of ``dsn``."""
    key = postgres.LEADER_LOCK_KEY
    try:
        connection = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    try:
        held = await connection.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = $1 AND objid = $2",
            key >> 32,
            key & 0xFFFFFFFF,
        )
    finally:
        await connection.close()
    return bool(held)


async def test_promoting_the_standby_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with primary_and_standby() as (primary, standby):
        await harness.migrated_database(primary.dsn())
        # Replicated synchronously: the database and schema are on the standby already.
        dsn = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/kaiju"
            "?target_session_attrs=read-write"
        )
        async with harness.counting_target(delay=0.02) as target:
            run = Run(primary, dsn, target, tmp_path)
            pool = await postgres.create_pool(dsn, max_size=4, application_name="chaos-load")
            run.service = TaskService(postgres.PostgresTaskStore(pool))
            try:
                run.start_processes()
                load = asyncio.create_task(run.load())
                try:
                    await eventually(lambda: len(target.done_at) > 100, within=60, what="load")
                    await eventually(lambda: _leader_on(primary.dsn("kaiju")), what="a leader")
                    warm = time.monotonic()
                    await asyncio.sleep(3)  # the baseline window
                    baseline = min(run.throughput(warm, warm + 3), 3.0 * RATE)
                    started = time.monotonic()
                    await asyncio.to_thread(primary.stop, "immediate")  # a crash
                    crashed_at = harness.wall()
                    await asyncio.sleep(2 if not LONG else 10)  # the time an operator takes
                    # What executors held at the crash, read on the standby before it is
                    # promoted (every acknowledged commit is on it): a run at a stage whose
                    # result was not committed; its call, made before the crash, may run again.
                    hit = await harness.held(standby.dsn("kaiju"))
                    await asyncio.to_thread(standby.promote)
                    promoted = time.monotonic()
                    run.faults.append(
                        harness.Fault(
                            "primary crash, standby promoted",
                            started,
                            promoted,
                            crashed_at,
                            hit=hit,
                            detail=f"promoted {promoted - started:.1f} s after the crash",
                        )
                    )
                    await eventually(
                        lambda: _leader_on(standby.dsn("kaiju")), within=60, what="a new leader"
                    )
                    led_after = time.monotonic() - promoted
                    await eventually(
                        lambda: any(t > promoted for t in target.done_at),
                        within=60,
                        what="stages to run again",
                    )
                    resumed_after = min(t for t in target.done_at if t > promoted) - promoted
                    recoveries = await run.recoveries(baseline)
                    await asyncio.sleep(1)  # load keeps arriving on the new primary
                finally:
                    load.cancel()
                    await asyncio.gather(load, return_exceptions=True)
                new_primary = standby.dsn("kaiju")
                await eventually(
                    lambda: harness.all_finished(new_primary, run.ids),
                    within=180,
                    what="every acknowledged task FINISHED on the new primary",
                )
            except BaseException:
                _print_logs(run)
                raise
            finally:
                for proc in run.procs:
                    proc.stop()
                await pool.close()
    check = harness.check_calls(target, run.ids, run.faults)
    harness.write_figures(
        tmp_path,
        "failover",
        {
            "form": "long" if LONG else "bounded",
            "promoted_after_crash_s": round(run.faults[0].ended - run.faults[0].started, 1),
            "tasks_acknowledged": len(run.ids),
            "runs_held_at_the_crash": len(hit),
            "leader_after_promotion_s": round(led_after, 1),
            "stages_after_promotion_s": round(resumed_after, 1),
            "baseline_calls_per_s": round(baseline, 1),
            "recovery_s": round(recoveries[0], 1),
            **check.figures(),
        },
    )
    assert check.unexplained == [], f"repeated calls no crash explains: {check.unexplained[:20]}"
    assert check.not_three == {}, f"tasks without one call per stage: {check.not_three}"
    assert recoveries[0] <= RECOVERY_BOUND
