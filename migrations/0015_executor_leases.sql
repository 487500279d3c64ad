-- kaiju-tasks 0015: executor leases.
--
-- An executor starts no stage call once most of its lease has passed since the last heartbeat
-- the database took (a cut network, an outage): by then the manager may have rescued its tasks.
-- The manager, for its part, rescues an executor's tasks no earlier than that lease after its
-- last heartbeat, whatever its own stale_after, so that a rescued run never calls its stage
-- while the run that replaces it does. NULL (an executor of an earlier version): no lease.
ALTER TABLE executors ADD COLUMN lease interval;
