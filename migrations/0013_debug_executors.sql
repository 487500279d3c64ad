-- kaiju-tasks 0013: debug executors (`kaiju-tasks executor --debug`).
--
-- A debug executor serves private queues `<app>@debug-<random>` only; production executors never
-- claim them. Its row says so, for `top`, the dashboard and /metrics, and so that the manager can
-- fail the tasks left in its queues once it is gone (they would otherwise wait forever).
ALTER TABLE executors ADD COLUMN debug boolean NOT NULL DEFAULT false;

-- The tasks waiting in debug queues, for the manager's look for queues whose executor is gone:
-- production tasks never enter this index.
CREATE INDEX tasks_debug_idx ON tasks (app_name)
    WHERE app_name LIKE '%@debug-%' AND status IN ('IDLE', 'QUEUED', 'WAITING', 'SUSPENDED');
