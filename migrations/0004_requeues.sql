-- kaiju-tasks 0004: how many times a task was rejected with requeue (bounded, not a retry).
ALTER TABLE tasks ADD COLUMN requeues integer NOT NULL DEFAULT 0 CHECK (requeues >= 0);
