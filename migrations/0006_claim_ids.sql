-- kaiju-tasks 0006: each claim of a task gets an id, and every write of that run is guarded by
-- it, so a stale write (a late reply, a late cancel, an old run still returning) can never
-- touch a newer run of the same task, even on the same executor.
ALTER TABLE tasks ADD COLUMN claim_id text;
