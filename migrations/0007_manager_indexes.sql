-- kaiju-tasks 0007: indexes for the manager's time-based scans, so that each tick reads only
-- the rows that are due instead of the whole table: ended cron tasks by next fire time, and
-- tasks with an expiry that have not started.
CREATE INDEX tasks_cron_next_run_idx ON tasks (next_run)
    WHERE cron IS NOT NULL AND status IN ('FINISHED', 'FAILED');
CREATE INDEX tasks_expires_idx ON tasks (expires_at)
    WHERE expires_at IS NOT NULL AND status IN ('IDLE', 'QUEUED');
