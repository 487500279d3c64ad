"""The default of every tunable, written once (pure: stdlib only).

The components take their defaults from here, and so does :mod:`kaiju_tasks.config` (which may
import only pure modules); each component also names its own (``executor.DEFAULT_CONCURRENCY``
is :data:`EXECUTOR_CONCURRENCY`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

# -- executor ---------------------------------------------------------------------------------

EXECUTOR_CONCURRENCY: Final = 10
"""Tasks an executor runs at once."""
EXECUTOR_PREFETCH: Final = 1000
"""The most tasks an executor claims ahead of free slots (it claims as many as measured times
call for, up to this: hundreds for stages of a millisecond, one or two for stages of a second;
see ``Pipeline._first_slot`` for those handed back when stages get slower)."""
EXECUTOR_POLL_INTERVAL: Final = timedelta(seconds=1)
"""Longest idle wait between claims when no notification arrives."""
EXECUTOR_HEARTBEAT_INTERVAL: Final = timedelta(seconds=5)
"""Time between an executor's liveness records."""
EXECUTOR_SHUTDOWN_GRACE: Final = timedelta(seconds=10)
"""Time running stages get to finish on stop before their tasks are handed back."""
EXECUTOR_LEASE_HEARTBEATS: Final = 3
"""An executor's lease, in heartbeat intervals, unless set."""
MAX_LEASE: Final = timedelta(hours=1)
"""The longest lease an executor may keep: the manager waits that long before it rescues a silent
executor's tasks."""

# -- manager ----------------------------------------------------------------------------------

MANAGER_INTERVAL: Final = timedelta(seconds=1)
"""Time between a leading manager's ticks."""
MANAGER_GC_INTERVAL: Final = timedelta(minutes=5)
"""Time between garbage collections."""
MANAGER_STANDBY_INTERVAL: Final = timedelta(seconds=2)
"""Time between a standby manager's tries to take the leadership."""
MANAGER_BATCH: Final = 1000
"""Most rows one duty handles in a tick."""
STALE_AFTER: Final = timedelta(seconds=30)
"""Executor silence after which its tasks are rescued (and no earlier than its lease)."""
TASK_RETENTION: Final = timedelta(days=7)
"""How long ended tasks (not cron, not system, not chained to) are kept."""
NOTIFICATION_RETENTION: Final = timedelta(days=30)
"""How long notifications are kept."""
EVENT_RETENTION: Final = timedelta(days=7)
"""How long events are kept."""
EXECUTOR_RETENTION: Final = timedelta(days=1)
"""How long the row of a silent executor holding no task is kept."""

ALIVE_WITHIN: Final = timedelta(seconds=60)
"""An executor heard from within this long (and not stopped) counts as live: for /health,
/metrics, ``top``, the dashboard and the manager's warning about apps nobody serves."""

# -- HTTP server ------------------------------------------------------------------------------

SERVER_MAX_BODY: Final = 1024 * 1024
"""Bytes of one request body."""
SERVER_MAX_BATCH: Final = 100
"""Calls in one JSON-RPC batch."""
SERVER_REQUEST_TIMEOUT: Final = 30.0
"""Seconds one call may take."""
SERVER_HEADER_TIMEOUT: Final = 10.0
"""Seconds a client has to deliver a request's head."""
SERVER_BODY_TIMEOUT: Final = 30.0
"""Seconds a client has to deliver a request's body."""
SERVER_AUTH_FAILURES: Final = 20
"""Failed authentications per client address per window."""
SERVER_AUTH_WINDOW: Final = 60.0
"""Seconds of that window."""
SERVER_AUTH_CLIENTS: Final = 10_000
"""Client addresses tracked at once."""

# -- database ---------------------------------------------------------------------------------

POOL_MIN: Final = 2
"""Connections a pool keeps open."""
POOL_MAX: Final = 10
"""Most connections of a pool."""
