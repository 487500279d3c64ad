-- Every fixed runtime query of kaiju-tasks. One block per query: a `-- name: <name>` header, a
-- one-line purpose, then the statement. Loaded by kaiju_tasks/store/queries.py.
-- Conventions: $1 is the row id where there is one; `$all OR user_id = $user` restricts a caller
-- to its own rows unless it may act on everybody's; time comes in as a parameter (`now`).

-- name: insert_tasks
-- Insert new tasks from a JSON array of complete rows (the service computed status and times).
INSERT INTO tasks (id, app_name, commands, kws, enabled, cron, max_exec_timeout, max_retries,
                   restart_policy, retry_delay, next_task, notify, system, description, meta,
                   priority, status, stages, job_id, user_id, created, queued_at, exec_deadline,
                   next_run, status_change, expires_at, parent_id, root_id)
SELECT r.id, r.app_name, r.commands, r.kws, r.enabled, r.cron, r.max_exec_timeout, r.max_retries,
       r.restart_policy, r.retry_delay, r.next_task, r.notify, r.system, r.description, r.meta,
       r.priority, r.status, r.stages, r.job_id, r.user_id, r.created, r.queued_at,
       r.exec_deadline, r.next_run, r.created, r.expires_at, r.parent_id, r.root_id
FROM jsonb_to_recordset($1::jsonb) AS r(
    id text, app_name text, commands jsonb, kws jsonb, enabled boolean, cron text,
    max_exec_timeout integer, max_retries integer, restart_policy text, retry_delay integer,
    next_task text, notify boolean, system boolean, description text, meta jsonb,
    priority smallint, status text, stages integer, job_id text, user_id text,
    created timestamptz, queued_at timestamptz, exec_deadline timestamptz, next_run timestamptz,
    expires_at timestamptz, parent_id text, root_id text)
RETURNING *;

-- name: get_task
-- One task by id.
SELECT * FROM tasks WHERE id = $1;

-- name: task_owners
-- The owners of the tasks that exist among the given ids.
SELECT id, user_id FROM tasks WHERE id = ANY($1::text[]);

-- name: delete_task
-- Delete a task the caller may change.
DELETE FROM tasks WHERE id = $1 AND ($2::boolean OR user_id = $3) RETURNING id;

-- name: reset_task
-- Return a task that is not running to its initial state and queue it (IDLE if disabled).
UPDATE tasks
SET status = CASE WHEN enabled THEN 'QUEUED' ELSE 'IDLE' END,
    stage = 0, result = '[]', error = NULL, exit_code = NULL, retries = 0, executor_id = NULL,
    job_id = CASE WHEN enabled THEN $4 END,
    queued_at = CASE WHEN enabled THEN $5::timestamptz END,
    exec_deadline = CASE WHEN enabled
                         THEN $5::timestamptz + make_interval(secs => max_exec_timeout) END,
    wait_deadline = NULL,
    next_run = CASE WHEN enabled THEN NULL ELSE $5::timestamptz END,
    status_change = $5::timestamptz
WHERE id = $1 AND ($2::boolean OR user_id = $3) AND status <> 'EXECUTED'
RETURNING *;

-- name: write_message
-- Deliver a message to a task waiting on a Message stage: it becomes that stage's result and
-- the task is queued at the next stage.
UPDATE tasks
SET result = result || jsonb_build_array($4::jsonb), stage = stage + 1, status = 'QUEUED',
    wait_deadline = NULL, status_change = $5::timestamptz
WHERE id = $1 AND ($2::boolean OR user_id = $3) AND status = 'WAITING'
  AND commands -> stage ->> 'kind' = 'message'
RETURNING *;

-- name: cancel_task
-- Abort a task that has not ended: FAILED with exit code 130 (its executor drops the stage).
UPDATE tasks
SET status = 'FAILED', exit_code = 130, error = $4::jsonb, wait_deadline = NULL,
    status_change = $5::timestamptz
WHERE id = $1 AND ($2::boolean OR user_id = $3)
  AND status IN ('IDLE', 'QUEUED', 'EXECUTED', 'WAITING', 'SUSPENDED')
RETURNING *;

-- name: insert_notification
-- Record a finished or failed run of a task.
INSERT INTO notifications (task_id, job_id, status, result, exit_code, error, user_id, created)
VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, $7, $8::timestamptz)
RETURNING *;

-- name: get_notification
-- One notification the caller may see.
SELECT * FROM notifications WHERE id = $1 AND ($2::boolean OR user_id = $3);

-- name: update_notification
-- Mark a notification the caller may change as read or unread.
UPDATE notifications SET read = $4 WHERE id = $1 AND ($2::boolean OR user_id = $3) RETURNING *;

-- name: delete_notification
-- Delete a notification the caller may change.
DELETE FROM notifications WHERE id = $1 AND ($2::boolean OR user_id = $3) RETURNING id;
