-- kaiju-tasks 0009: identifiers compare byte by byte (COLLATE "C").
--
-- Task ids, job ids, app names, statuses, user and executor ids are opaque keys: they are only
-- ever compared for equality or sorted to break ties, never shown in a language's order. Under
-- the database's default collation (often en_US.UTF-8) every comparison in their indexes goes
-- through the locale's strcoll; with "C" it is a memcmp and btree can use abbreviated keys, which
-- roughly halves the cost of inserting new tasks. Free text (description, cron) keeps the
-- database's collation. Changing only the collation of a text column does not rewrite the table;
-- the indexes on these columns are rebuilt.
ALTER TABLE tasks DROP CONSTRAINT tasks_next_task_fkey;

ALTER TABLE tasks
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN app_name TYPE text COLLATE "C",
    ALTER COLUMN restart_policy TYPE text COLLATE "C",
    ALTER COLUMN next_task TYPE text COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C",
    ALTER COLUMN job_id TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C",
    ALTER COLUMN executor_id TYPE text COLLATE "C",
    ALTER COLUMN parent_id TYPE text COLLATE "C",
    ALTER COLUMN root_id TYPE text COLLATE "C",
    ALTER COLUMN claim_id TYPE text COLLATE "C";

ALTER TABLE tasks ADD CONSTRAINT tasks_next_task_fkey
    FOREIGN KEY (next_task) REFERENCES tasks (id) ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED;

ALTER TABLE events
    ALTER COLUMN type TYPE text COLLATE "C",
    ALTER COLUMN task_id TYPE text COLLATE "C",
    ALTER COLUMN job_id TYPE text COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C",
    ALTER COLUMN executor_id TYPE text COLLATE "C";

ALTER TABLE notifications
    ALTER COLUMN task_id TYPE text COLLATE "C",
    ALTER COLUMN job_id TYPE text COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C";

ALTER TABLE executors
    ALTER COLUMN id TYPE text COLLATE "C",
    ALTER COLUMN apps TYPE text[] COLLATE "C";

ALTER TABLE tokens
    ALTER COLUMN token_hash TYPE text COLLATE "C",
    ALTER COLUMN user_id TYPE text COLLATE "C";
