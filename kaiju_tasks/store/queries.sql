-- Every fixed runtime query of kaiju-tasks. One block per query: a `-- name: <name>` header, a
-- one-line purpose, then the statement. Loaded by kaiju_tasks/store/queries.py.
-- Conventions: $1 is the row id where there is one; `$all OR user_id = $user` restricts a caller
-- to its own rows unless it may act on everybody's; time comes in as a parameter (`now`).

-- name: insert_tasks
-- Insert new tasks from a JSON array of complete rows (the service computed status and times);
-- queued ones get a task-sent event and wake the executors of their app.
WITH created AS (
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
RETURNING *),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, created)
    SELECT 'task-sent', id, job_id, status, 0, created FROM created WHERE status = 'QUEUED'),
wake AS (
    SELECT pg_notify('kaiju_tasks_queued', app_name)
    FROM (SELECT DISTINCT app_name FROM created WHERE status = 'QUEUED') a)
SELECT created.* FROM created, (SELECT count(*) FROM wake) w;

-- name: trace_tasks
-- Store the creator's trace context with new tasks (in their insert's transaction).
UPDATE tasks SET trace = $2::jsonb WHERE id = ANY($1::text[]);

-- name: task_json
-- The JSON columns of tasks just written by COPY, as stored (see PostgresTaskStore.insert_tasks).
SELECT id, commands, kws, meta FROM tasks WHERE id = ANY($1::text[]);

-- name: get_task
-- One task by id.
SELECT * FROM tasks WHERE id = $1;

-- name: task_owners
-- The owners of the tasks that exist among the given ids.
SELECT id, user_id FROM tasks WHERE id = ANY($1::text[]);

-- name: delete_task
-- Delete a task the caller may change, unless an executor is running it.
DELETE FROM tasks
WHERE id = $1 AND ($2::boolean OR user_id = $3) AND status <> 'EXECUTED'
RETURNING id;

-- name: reset_task
-- Return a task that is not running to its initial state and queue it (IDLE if disabled).
WITH done AS (
UPDATE tasks
SET status = CASE WHEN enabled THEN 'QUEUED' ELSE 'IDLE' END,
    stage = 0, result = '[]', error = NULL, exit_code = NULL, retries = 0, requeues = 0,
    executor_id = NULL,
    job_id = CASE WHEN enabled THEN $4 END,
    queued_at = CASE WHEN enabled THEN $5::timestamptz END,
    exec_deadline = CASE WHEN enabled
                         THEN $5::timestamptz + make_interval(secs => max_exec_timeout) END,
    wait_deadline = NULL,
    next_run = CASE WHEN enabled THEN NULL ELSE $5::timestamptz END,
    status_change = $5::timestamptz
WHERE id = $1 AND ($2::boolean OR user_id = $3) AND status <> 'EXECUTED'
RETURNING *),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, created, data)
    SELECT 'task-sent', id, job_id, status, 0, $5, '{"reset": true}'::jsonb
    FROM done WHERE status = 'QUEUED'),
wake AS (SELECT pg_notify('kaiju_tasks_queued', app_name) FROM done WHERE status = 'QUEUED')
SELECT done.* FROM done, (SELECT count(*) FROM wake) w;

-- name: write_message
-- Deliver a message to a task waiting on a Message stage: it becomes that stage's result and
-- the task is queued at the next stage. $6: the most bytes of JSON the stored results may take
-- before the message is added.
WITH done AS (
UPDATE tasks
SET result = result || jsonb_build_array($4::jsonb), stage = stage + 1,
    status = CASE WHEN enabled THEN 'QUEUED' ELSE 'IDLE' END,
    next_run = CASE WHEN enabled THEN NULL ELSE $5::timestamptz END,
    wait_deadline = NULL, status_change = $5::timestamptz
WHERE id = $1 AND ($2::boolean OR user_id = $3) AND status = 'WAITING'
  AND commands -> stage ->> 'kind' = 'message'
  -- the results with the message stay within [limits] task_result_bytes ($6 bytes of it left)
  AND octet_length(result::text) <= $6::bigint
RETURNING *),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, created, data)
    SELECT 'task-sent', id, job_id, 'QUEUED', stage, $5, '{"resumed": "message"}'::jsonb
    FROM done WHERE status = 'QUEUED'),
wake AS (SELECT pg_notify('kaiju_tasks_queued', app_name) FROM done WHERE status = 'QUEUED')
SELECT done.* FROM done, (SELECT count(*) FROM wake) w;

-- name: cancel_task
-- Abort a task that has not ended: FAILED with exit code 130; a running stage's executor is
-- told on kaiju_tasks_cancel and abandons the call.
WITH old AS (
    SELECT id, status, executor_id, claim_id FROM tasks
    WHERE id = $1 AND ($2::boolean OR user_id = $3)
      AND status IN ('IDLE', 'QUEUED', 'EXECUTED', 'WAITING', 'SUSPENDED')
    FOR UPDATE),
done AS (
    UPDATE tasks t
    -- the stage it stood at when cancelled, read under the row lock
    SET status = 'FAILED', exit_code = 130,
        error = $4::jsonb || jsonb_build_object('stage', t.stage), wait_deadline = NULL,
        next_run = NULL, status_change = $5::timestamptz
    FROM old WHERE t.id = old.id
    RETURNING t.*),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created, data)
    SELECT 'task-revoked', done.id, done.job_id, 'FAILED', done.stage, old.executor_id, $5,
           jsonb_build_object('reason', 'cancelled')
    FROM done JOIN old ON old.id = done.id),
notes AS (
    INSERT INTO notifications (task_id, job_id, status, result, exit_code, error, user_id,
                               created)
    SELECT id, job_id, 'FAILED', result, 130, error, user_id, $5 FROM done WHERE notify),
wake AS (
    SELECT pg_notify('kaiju_tasks_cancel', id || ' ' || coalesce(claim_id, '')) FROM old
    WHERE status = 'EXECUTED')
SELECT done.* FROM done, (SELECT count(*) FROM wake) w;

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

-- ==== engine: executors ========================================================================
-- Events: every transition inserts its lifecycle event in the same statement, and the
-- kaiju_tasks_events channel is notified (deduplicated by PostgreSQL within a transaction).

-- name: register_executor
-- An executor comes online (or back online under the same id).
WITH e AS (
    INSERT INTO executors (id, apps, host, pid, concurrency, started, heartbeat_at, debug, lease)
    VALUES ($1, $2::text[], $3, $4, $5, $6, $6, $7, $8)
    ON CONFLICT (id) DO UPDATE
    SET apps = excluded.apps, host = excluded.host, pid = excluded.pid,
        concurrency = excluded.concurrency, started = excluded.started,
        heartbeat_at = excluded.heartbeat_at, stopped_at = NULL, debug = excluded.debug,
        lease = excluded.lease
    RETURNING id)
INSERT INTO events (type, executor_id, created, data)
SELECT 'worker-online', e.id, $6,
       jsonb_build_object('apps', $2::text[], 'host', $3, 'pid', $4, 'concurrency', $5,
                          'debug', $7::boolean)
FROM e;

-- name: heartbeat
-- An executor is alive ($3: the tasks it holds, recorded in the event); returns 1, or 0 when
-- its row is gone (the manager forgot it) and it must register again.
WITH e AS (
    UPDATE executors SET heartbeat_at = $2, stopped_at = NULL WHERE id = $1 RETURNING id),
ev AS (
    INSERT INTO events (type, executor_id, created, data)
    SELECT 'worker-heartbeat', e.id, $2, jsonb_build_object('active', $3::integer) FROM e)
SELECT count(*) FROM e;

-- name: executor_stopped
-- An executor went offline cleanly.
WITH e AS (
    UPDATE executors SET stopped_at = $2, heartbeat_at = $2 WHERE id = $1 RETURNING id)
INSERT INTO events (type, executor_id, created) SELECT 'worker-offline', e.id, $2 FROM e;

-- name: claim
-- Claim up to $3 QUEUED tasks of the given apps: highest priority first, then oldest (ties in
-- the queue index's order, by the row's place in the table). One index scan per app (a plain
-- `app_name = ANY(...)` would read and sort the whole queue); rows locked beyond the final
-- LIMIT are released at commit, untouched.
WITH picked AS (
    SELECT q.id FROM unnest($1::text[]) AS a(app)
    CROSS JOIN LATERAL (
        SELECT id, priority, queued_at FROM tasks
        WHERE status = 'QUEUED' AND app_name = a.app AND enabled
          -- an expired task that never started is left to the manager to revoke
          AND (expires_at IS NULL OR expires_at > $4 OR stage > 0 OR retries > 0
               OR result <> '[]'::jsonb)
        ORDER BY priority DESC, queued_at
        LIMIT $3
        FOR UPDATE SKIP LOCKED) q
    ORDER BY q.priority DESC, q.queued_at
    LIMIT $3),
claimed AS (
    UPDATE tasks t
    SET status = 'EXECUTED', executor_id = $2, claim_id = gen_random_uuid()::text,
        status_change = $4
    FROM picked WHERE t.id = picked.id
    RETURNING t.*),
-- Two events per task, in this order: task-received (this executor took it) and task-started
-- (it runs now: claiming is starting here, the status is EXECUTED from the claim on).
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created)
    SELECT k.type, c.id, c.job_id, 'EXECUTED', c.stage, $2, $4
    FROM claimed c CROSS JOIN (VALUES (1, 'task-received'), (2, 'task-started')) AS k(n, type)
    ORDER BY c.id, k.n)
SELECT * FROM claimed;

-- name: claim_one
-- As claim, for an executor of one app ($1 is the app name): the same rows in the same order.
-- Its plan does not depend on the parameters, so PostgreSQL keeps one generic plan for it
-- instead of planning every claim again (claim's app array makes each plan look cheaper than a
-- generic one, and planning cost that statement about a third of its time).
WITH picked AS (
    SELECT id FROM tasks
    WHERE status = 'QUEUED' AND app_name = $1 AND enabled
      -- an expired task that never started is left to the manager to revoke
      AND (expires_at IS NULL OR expires_at > $4 OR stage > 0 OR retries > 0
           OR result <> '[]'::jsonb)
    ORDER BY priority DESC, queued_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED),
claimed AS (
    UPDATE tasks t
    SET status = 'EXECUTED', executor_id = $2, claim_id = gen_random_uuid()::text,
        status_change = $4
    FROM picked WHERE t.id = picked.id
    RETURNING t.*),
-- Two events per task, in this order: task-received (this executor took it) and task-started
-- (it runs now: claiming is starting here, the status is EXECUTED from the claim on).
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created)
    SELECT k.type, c.id, c.job_id, 'EXECUTED', c.stage, $2, $4
    FROM claimed c CROSS JOIN (VALUES (1, 'task-received'), (2, 'task-started')) AS k(n, type)
    ORDER BY c.id, k.n)
SELECT * FROM claimed;

-- name: record_stages
-- Commit finished stages of running tasks (not the last one): result appended, next stage set.
-- Items: [{id, stage, result, claim_id, method, duration_s}] (method and duration for the
-- event). Returns the ids that applied (still this claim's run, at that stage).
WITH r AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb)
        AS r(id text, stage integer, result jsonb, method text, duration_s double precision,
             claim_id text)),
done AS (
    UPDATE tasks t
    SET stage = r.stage + 1, result = t.result || jsonb_build_array(r.result)
    FROM r
    WHERE t.id = r.id AND t.status = 'EXECUTED' AND t.executor_id = $2 AND t.stage = r.stage
      AND t.claim_id = r.claim_id
    RETURNING t.id, t.job_id, t.stage),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created, data)
    SELECT 'task-stage-succeeded', done.id, done.job_id, 'EXECUTED', done.stage - 1, $2, $3,
           jsonb_build_object('method', r.method, 'duration_s', r.duration_s)
    FROM done JOIN r ON r.id = done.id)
SELECT id FROM done;

-- name: finish_tasks
-- Finish running tasks: FINISHED, exit code 0, the last result appended (when `append`),
-- a notification when `notify`, the `next_task` queued when it is idle or ended and enabled,
-- and `next_run` set to the next cron fire time (the manager restarts the task then).
-- Items: [{id, stage, result, append, next_run, claim_id, method, duration_s}]. Returns the
-- ids that applied.
WITH r AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb)
        AS r(id text, stage integer, result jsonb, append boolean, next_run timestamptz,
             method text, duration_s double precision, claim_id text)),
done AS (
    UPDATE tasks t
    SET status = 'FINISHED', exit_code = 0, error = NULL, stage = t.stages,
        result = CASE WHEN r.append THEN t.result || jsonb_build_array(r.result)
                      ELSE t.result END,
        next_run = r.next_run, wait_deadline = NULL, status_change = $3
    FROM r
    WHERE t.id = r.id AND t.status = 'EXECUTED' AND t.executor_id = $2 AND t.stage = r.stage
      AND t.claim_id = r.claim_id
    RETURNING t.*),
notes AS (
    INSERT INTO notifications (task_id, job_id, status, result, exit_code, user_id, created)
    SELECT id, job_id, 'FINISHED', result, 0, user_id, $3 FROM done WHERE notify),
chained AS (
    UPDATE tasks n
    SET status = 'QUEUED', stage = 0, result = '[]', error = NULL, exit_code = NULL,
        retries = 0, requeues = 0, executor_id = NULL, job_id = gen_random_uuid()::text,
        queued_at = $3,
        exec_deadline = $3 + make_interval(secs => n.max_exec_timeout), wait_deadline = NULL,
        next_run = NULL, status_change = $3
    FROM done
    WHERE n.id = done.next_task AND n.enabled
      AND n.status IN ('IDLE', 'FINISHED', 'FAILED')
    RETURNING n.id, n.job_id, n.app_name),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created, data)
    SELECT 'task-succeeded', done.id, done.job_id, 'FINISHED', done.stages - 1, $2, $3,
           jsonb_build_object('result', done.result -> -1, 'method', r.method,
                              'duration_s', r.duration_s)
    FROM done JOIN r ON r.id = done.id
    UNION ALL
    SELECT 'task-sent', id, job_id, 'QUEUED', 0, NULL, $3, jsonb_build_object('chained', true)
    FROM chained),
wake AS (
    SELECT pg_notify('kaiju_tasks_queued', app_name) FROM (SELECT DISTINCT app_name FROM chained) a)
SELECT id FROM done, (SELECT count(*) FROM wake) w;

-- name: fail_tasks
-- A run failed (stage error, timeout, lost message): retry when retries are left and the failure
-- is retryable — at once, or at `retry_at` (IDLE until then; kaiju_tasks.retry computes it) when
-- the task has a retry_delay or is disabled — else FAILED with the exit code, a notification
-- when `notify`, and `next_run` for cron. A retry keeps the job_id; restart_policy FIRST starts
-- over at stage 0 with no results.
-- Items: [{id, status, executor_id, stage, error, exit_code, retryable, next_run, retry_at,
-- rejected, method, duration_s, due, claim_id, run}] (run: as in wait_tasks); the row
-- must still be in that status, stage and executor. Returns [{id, status, executor_id}].
WITH r AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb)
        AS r(id text, status text, executor_id text, stage integer, error jsonb,
             exit_code integer, retryable boolean, next_run timestamptz,
             retry_at timestamptz, rejected boolean, method text, duration_s double precision,
             due text, claim_id text, run text)),
cur AS (
    SELECT t.id, r.error, r.exit_code, r.next_run, r.retry_at, r.run,
           t.executor_id AS old_executor,
           t.claim_id AS old_claim,
           r.method, r.duration_s,
           coalesce(r.rejected, false) AS rejected,
           (r.retryable AND t.retries < t.max_retries) AS retry,
           (t.retry_delay > 0 OR NOT t.enabled) AS delayed,
           t.restart_policy = 'FIRST' AS first
    FROM tasks t JOIN r ON t.id = r.id
    WHERE t.status = r.status AND t.stage = r.stage
      AND t.executor_id IS NOT DISTINCT FROM r.executor_id
      AND (r.claim_id IS NULL OR t.claim_id = r.claim_id)
      -- the manager's items say why; the reason must still hold on the row as it is now
      AND (r.due IS NULL
           OR (r.due = 'run' AND t.exec_deadline <= $2)
           OR (r.due = 'wait' AND t.wait_deadline <= $2)
           OR (r.due = 'expired' AND t.expires_at <= $2 AND t.retries = 0))
    FOR UPDATE OF t),
done AS (
    UPDATE tasks t
    SET status = CASE WHEN NOT c.retry THEN 'FAILED' WHEN c.delayed THEN 'IDLE' ELSE 'QUEUED' END,
        retries = t.retries + CASE WHEN c.retry THEN 1 ELSE 0 END,
        stage = CASE WHEN c.retry AND c.first THEN 0 ELSE t.stage END,
        result = CASE WHEN c.retry AND c.first THEN '[]'::jsonb ELSE t.result END,
        error = c.error,
        exit_code = CASE WHEN c.retry THEN NULL ELSE c.exit_code END,
        executor_id = CASE WHEN c.retry THEN NULL ELSE t.executor_id END,
        wait_deadline = NULL,
        queued_at = CASE WHEN c.retry AND NOT c.delayed THEN $2 ELSE t.queued_at END,
        exec_deadline = CASE WHEN c.retry AND NOT c.delayed
                             THEN $2 + make_interval(secs => t.max_exec_timeout)
                             ELSE t.exec_deadline END,
        -- an item without retry_at retries at the manager's next tick, never waits forever
        next_run = CASE WHEN c.retry AND c.delayed THEN coalesce(c.retry_at, $2)
                        WHEN c.retry THEN NULL
                        ELSE c.next_run END,
        status_change = $2,
        trace = CASE WHEN c.run IS NULL THEN t.trace
                     ELSE coalesce(t.trace, '{}'::jsonb) || jsonb_build_object('run', c.run) END
    FROM cur c
    WHERE t.id = c.id
    RETURNING t.*, c.retry, c.old_executor, c.old_claim, c.rejected, c.method, c.duration_s),
notes AS (
    INSERT INTO notifications (task_id, job_id, status, result, exit_code, error, user_id,
                               created)
    SELECT id, job_id, 'FAILED', result, exit_code, error, user_id, $2
    FROM done WHERE notify AND NOT retry),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created, data)
    SELECT CASE WHEN retry THEN 'task-retried' WHEN rejected THEN 'task-rejected'
                WHEN exit_code = 130 THEN 'task-revoked' ELSE 'task-failed' END,
           id, job_id, status, stage, old_executor, $2,
           jsonb_strip_nulls(jsonb_build_object(
               'error', error, 'retries', retries, 'exit_code', exit_code,
               'method', method, 'duration_s', duration_s))
    FROM done),
wake AS (
    SELECT pg_notify('kaiju_tasks_queued', app_name)
    FROM (SELECT DISTINCT app_name FROM done WHERE status = 'QUEUED') a)
SELECT id, status, old_executor AS executor_id, old_claim AS claim_id
FROM done, (SELECT count(*) FROM wake) w;

-- name: wait_tasks
-- Park running tasks on a Timer or Message stage: WAITING until `wait_deadline`, executor freed.
-- Items: [{id, stage, wait_deadline, claim_id, run}] (run: the traceparent of this run, kept
-- in `trace` so that the run resuming the task links to it; absent without tracing). Returns
-- the ids that applied.
WITH r AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb)
        AS r(id text, stage integer, wait_deadline timestamptz, claim_id text, run text)),
done AS (
    UPDATE tasks t
    SET status = 'WAITING', wait_deadline = r.wait_deadline, executor_id = NULL,
        status_change = $3,
        trace = CASE WHEN r.run IS NULL THEN t.trace
                     ELSE coalesce(t.trace, '{}'::jsonb) || jsonb_build_object('run', r.run) END
    FROM r
    WHERE t.id = r.id AND t.status = 'EXECUTED' AND t.executor_id = $2 AND t.stage = r.stage
      AND t.claim_id = r.claim_id
    RETURNING t.id, t.job_id, t.stage, t.wait_deadline),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created, data)
    SELECT 'task-waiting', id, job_id, 'WAITING', stage, $2, $3,
           jsonb_build_object('wait_deadline', wait_deadline)
    FROM done)
SELECT id FROM done;

-- name: suspend_executor_tasks
-- Hand back the tasks an executor still holds (shutdown): SUSPENDED at their current stage,
-- and wake the manager at commit, which re-queues them at once instead of at its next tick.
WITH done AS (
    UPDATE tasks SET status = 'SUSPENDED', executor_id = NULL, status_change = $2
    WHERE status = 'EXECUTED' AND executor_id = $1 AND claim_id = ANY($3::text[])
    RETURNING id, job_id, stage),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created)
    SELECT 'task-suspended', id, job_id, 'SUSPENDED', stage, $1, $2 FROM done),
wake AS (
    SELECT pg_notify('kaiju_tasks_manager', '') WHERE EXISTS (SELECT 1 FROM done))
SELECT id FROM done, (SELECT count(*) FROM wake) w;

-- name: release_tasks
-- Put runs claimed ahead whose stage has not started back in the queue (an executor whose
-- stages got slower, see Pipeline._first_slot): QUEUED at their stage, in their place
-- (queued_at kept), or IDLE until enabled; no retry or requeue counted. Guarded by the run's
-- claim id; wakes the executors of their app at commit.
WITH done AS (
    UPDATE tasks
    SET status = CASE WHEN enabled THEN 'QUEUED' ELSE 'IDLE' END,
        next_run = CASE WHEN enabled THEN NULL ELSE $2::timestamptz END,
        executor_id = NULL, status_change = $2
    WHERE status = 'EXECUTED' AND executor_id = $1 AND claim_id = ANY($3::text[])
    RETURNING id, job_id, stage, app_name, status),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created, data)
    SELECT 'task-sent', id, job_id, status, stage, $1, $2, '{"released": true}'::jsonb
    FROM done WHERE status = 'QUEUED'),
wake AS (
    SELECT pg_notify('kaiju_tasks_queued', app_name)
    FROM (SELECT DISTINCT app_name FROM done WHERE status = 'QUEUED') a)
SELECT id FROM done, (SELECT count(*) FROM wake) w;

-- name: orphans
-- Claims an executor holds in the database but does not run (a lost claim or hand-back reply).
SELECT id, claim_id FROM tasks
WHERE status = 'EXECUTED' AND executor_id = $1 AND NOT (claim_id = ANY($2::text[]));

-- name: task_status
-- The status, stage, executor and claim of the given tasks (to notice cancellations and rescues).
SELECT id, status, stage, executor_id, claim_id FROM tasks WHERE id = ANY($1::text[]);

-- ==== engine: manager duties ===================================================================

-- name: queue_due
-- Queue due tasks: IDLE ones (a new job_id unless a delayed retry kept one) and ended cron tasks
-- at their next fire time (a fresh run: results cleared, new job_id).
-- Two scans, each served by its own partial index (tasks_next_run_idx, tasks_cron_next_run_idx).
WITH idle AS (
    SELECT id FROM tasks
    WHERE status = 'IDLE' AND enabled AND next_run <= $1
    ORDER BY next_run
    LIMIT $2
    FOR UPDATE SKIP LOCKED),
ended AS (
    SELECT id FROM tasks
    WHERE status IN ('FINISHED', 'FAILED') AND cron IS NOT NULL AND enabled AND next_run <= $1
    ORDER BY next_run
    LIMIT $2
    FOR UPDATE SKIP LOCKED),
due AS (SELECT id FROM idle UNION ALL SELECT id FROM ended),
done AS (
    UPDATE tasks t
    SET status = 'QUEUED',
        job_id = CASE WHEN t.status = 'IDLE' THEN coalesce(t.job_id, gen_random_uuid()::text)
                      ELSE gen_random_uuid()::text END,
        stage = CASE WHEN t.status = 'IDLE' THEN t.stage ELSE 0 END,
        result = CASE WHEN t.status = 'IDLE' THEN t.result ELSE '[]'::jsonb END,
        retries = CASE WHEN t.status = 'IDLE' THEN t.retries ELSE 0 END,
        requeues = CASE WHEN t.status = 'IDLE' THEN t.requeues ELSE 0 END,
        error = CASE WHEN t.status = 'IDLE' THEN t.error END,
        exit_code = NULL, executor_id = NULL, queued_at = $1,
        exec_deadline = $1 + make_interval(secs => t.max_exec_timeout),
        next_run = NULL, wait_deadline = NULL, status_change = $1
    FROM due WHERE t.id = due.id
    RETURNING t.id, t.job_id, t.app_name),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, created)
    SELECT 'task-sent', id, job_id, 'QUEUED', 0, $1 FROM done),
wake AS (
    SELECT pg_notify('kaiju_tasks_queued', app_name) FROM (SELECT DISTINCT app_name FROM done) a)
SELECT count(*) FROM done, (SELECT count(*) FROM wake) w;

-- name: release_timers
-- Resume tasks whose Timer is due: the timer stage's result is null and the task is queued at
-- the next stage (an executor finishes it at once if that was the last stage).
WITH due AS (
    SELECT id FROM tasks
    WHERE status = 'WAITING' AND wait_deadline <= $1 AND commands -> stage ->> 'kind' = 'timer'
    LIMIT $2
    FOR UPDATE SKIP LOCKED),
done AS (
    UPDATE tasks t
    -- a disabled task waits in IDLE (due now) until it is enabled again
    SET status = CASE WHEN t.enabled THEN 'QUEUED' ELSE 'IDLE' END,
        next_run = CASE WHEN t.enabled THEN NULL ELSE $1::timestamptz END,
        stage = t.stage + 1, result = t.result || '[null]'::jsonb,
        wait_deadline = NULL, status_change = $1
    FROM due WHERE t.id = due.id
    RETURNING t.id, t.job_id, t.stage, t.app_name, t.status),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, created, data)
    SELECT 'task-sent', id, job_id, status, stage, $1, '{"resumed": "timer"}'::jsonb
    FROM done WHERE status = 'QUEUED'),
wake AS (
    SELECT pg_notify('kaiju_tasks_queued', app_name)
    FROM (SELECT DISTINCT app_name FROM done WHERE status = 'QUEUED') a)
SELECT count(*) FROM done, (SELECT count(*) FROM wake) w;

-- name: overdue
-- Tasks past a deadline: the run's exec_deadline, a Message stage's wait deadline, or
-- `expires_at` before the run started (Celery's `expires`).
SELECT id, status, executor_id, stage, cron, max_exec_timeout, expires_at, retry_delay, retries,
       (status IN ('IDLE', 'QUEUED') AND stage = 0 AND result = '[]'::jsonb AND retries = 0
        AND expires_at <= $1) AS expired,
       (exec_deadline <= $1) AS run_expired
FROM tasks
WHERE (status IN ('QUEUED', 'EXECUTED', 'WAITING', 'SUSPENDED') AND exec_deadline <= $1)
   OR (status = 'WAITING' AND wait_deadline <= $1 AND commands -> stage ->> 'kind' = 'message')
   OR (status IN ('IDLE', 'QUEUED') AND expires_at <= $1 AND stage = 0
       AND result = '[]'::jsonb AND retries = 0)
LIMIT $2;

-- name: suspend_stale
-- Suspend the tasks of executors that stopped heartbeating (before $2; NULL: none counts as
-- silent, only offline or forgotten executors are lost) or went offline. A silent executor is
-- lost only once its lease has run out too, counted from its last heartbeat or from $4 (when the
-- manager began watching, if later): until then it may still start stage calls (migration 0015).
-- The lost executors are found first: a join re-checked after locking could pair a task
-- just claimed by a live executor with the old executor's row. Their rows are locked (FOR
-- SHARE) until the rescue commits: a heartbeat committed meanwhile is seen (the row is checked
-- again, and the executor is not lost), one in progress makes the rescue pass the executor by
-- for this tick (SKIP LOCKED: never wait on a connection that may be cut), and one that comes
-- later waits for the rescue, so the executor's look at its runs after that heartbeat sees
-- them taken. The runs taken are told to stop ("task_id claim_id" on kaiju_tasks_cancel): an
-- executor that is in fact alive abandons their calls at once instead of at its next
-- heartbeat.
WITH silent AS MATERIALIZED (
    SELECT e.id FROM executors e
    WHERE (e.stopped_at IS NOT NULL
           OR (e.heartbeat_at < $2
               AND greatest(e.heartbeat_at, $4::timestamptz)
                   < $1::timestamptz - coalesce(e.lease, interval '0')))
      AND EXISTS (SELECT 1 FROM tasks t WHERE t.executor_id = e.id AND t.status = 'EXECUTED')
    FOR SHARE OF e SKIP LOCKED),
lost AS MATERIALIZED (
    SELECT id FROM silent
    UNION
    SELECT t.executor_id FROM tasks t
    WHERE t.status = 'EXECUTED'
      AND NOT EXISTS (SELECT 1 FROM executors e WHERE e.id = t.executor_id)),
stale AS (
    SELECT t.id FROM tasks t
    WHERE t.status = 'EXECUTED' AND t.executor_id IN (SELECT id FROM lost)
    LIMIT $3
    FOR UPDATE SKIP LOCKED),
done AS (
    UPDATE tasks t SET status = 'SUSPENDED', status_change = $1
    FROM stale WHERE t.id = stale.id
    RETURNING t.id, t.job_id, t.stage, t.executor_id, t.claim_id),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created, data)
    SELECT 'task-suspended', id, job_id, 'SUSPENDED', stage, executor_id, $1,
           '{"reason": "executor lost"}'::jsonb
    FROM done),
stop AS (
    SELECT pg_notify('kaiju_tasks_cancel', id || ' ' || claim_id) FROM done
    WHERE claim_id IS NOT NULL)
SELECT count(*) FROM done, (SELECT count(*) FROM stop) s;

-- name: requeue_suspended
-- Queue SUSPENDED tasks again at the stage they were on (results and job_id kept).
WITH due AS (
    SELECT id FROM tasks WHERE status = 'SUSPENDED' LIMIT $2 FOR UPDATE SKIP LOCKED),
done AS (
    UPDATE tasks t
    SET status = CASE WHEN t.enabled THEN 'QUEUED' ELSE 'IDLE' END,
        next_run = CASE WHEN t.enabled THEN NULL ELSE $1::timestamptz END,
        executor_id = NULL, status_change = $1
    FROM due WHERE t.id = due.id
    RETURNING t.id, t.job_id, t.stage, t.app_name, t.status),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, created, data)
    SELECT 'task-sent', id, job_id, status, stage, $1, '{"resumed": "suspended"}'::jsonb
    FROM done WHERE status = 'QUEUED'),
wake AS (
    SELECT pg_notify('kaiju_tasks_queued', app_name)
    FROM (SELECT DISTINCT app_name FROM done WHERE status = 'QUEUED') a)
SELECT count(*) FROM done, (SELECT count(*) FROM wake) w;

-- name: debug_orphans
-- Tasks left in debug queues (`<app>@debug-<random>`) that no live debug executor serves: its
-- executor stopped, was forgotten, was silent since $2 (NULL: silence does not count), or never
-- existed. Each debug queue has one executor, so nothing will ever run them. $3: only these
-- queues (NULL: all). At most $1.
WITH alive AS (
    SELECT DISTINCT unnest(apps) AS app FROM executors
    WHERE debug AND stopped_at IS NULL AND ($2::timestamptz IS NULL OR heartbeat_at >= $2))
SELECT t.id, t.status, t.executor_id, t.stage, t.app_name
FROM tasks t
WHERE t.app_name LIKE '%@debug-%' AND t.status IN ('IDLE', 'QUEUED', 'WAITING', 'SUSPENDED')
  AND ($3::text[] IS NULL OR t.app_name = ANY($3::text[]))
  AND NOT EXISTS (SELECT 1 FROM alive a WHERE a.app = t.app_name)
ORDER BY t.id
LIMIT $1;

-- name: prune_tasks
-- Delete ended tasks older than the retention period, except cron and system tasks.
WITH doomed AS (
    SELECT id FROM tasks
    WHERE status IN ('FINISHED', 'FAILED') AND status_change < $1 AND cron IS NULL
      AND NOT system
      AND NOT EXISTS (SELECT 1 FROM tasks r WHERE r.next_task = tasks.id)
    LIMIT $2)
DELETE FROM tasks t USING doomed
WHERE t.id = doomed.id
  -- checked again on the row as it is now: it may have been reset since the scan
  AND t.status IN ('FINISHED', 'FAILED') AND t.status_change < $1 AND t.cron IS NULL
  AND NOT t.system;

-- name: prune_notifications
-- Delete notifications older than the retention period.
DELETE FROM notifications WHERE id IN (SELECT id FROM notifications WHERE created < $1 LIMIT $2);

-- name: prune_events
-- Delete events older than the retention period.
DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created < $1 LIMIT $2);

-- name: prune_executors
-- Forget executors that have been silent longer than the retention period and hold no task
-- (those are rescued first, by suspend_stale, which keeps to their lease).
DELETE FROM executors WHERE id IN (
    SELECT e.id FROM executors e
    WHERE e.heartbeat_at < $1
      AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.executor_id = e.id AND t.status = 'EXECUTED')
    LIMIT $2);

-- name: notify_cancel
-- Tell executors to abandon the running stages of these tasks.
-- Payloads are "task_id claim_id": only that run is abandoned, not a newer one.
SELECT count(pg_notify('kaiju_tasks_cancel', run)) FROM unnest($1::text[]) AS run;

-- name: notify_queued
-- Wake executors of these apps.
SELECT count(pg_notify('kaiju_tasks_queued', app)) FROM unnest($1::text[]) AS app;

-- ==== API tokens ===============================================================================

-- name: insert_token
-- Store a new token's hash and what it grants.
INSERT INTO tokens (token_hash, user_id, permissions, name, created)
VALUES ($1, $2, $3::text[], $4, $5)
RETURNING id, user_id, permissions, name, created, revoked_at;

-- name: find_token
-- The grants of a token that is not revoked.
SELECT id, user_id, permissions FROM tokens WHERE token_hash = $1 AND revoked_at IS NULL;

-- name: list_tokens
-- Every token, newest first (hashes are not returned).
SELECT id, user_id, permissions, name, created, revoked_at FROM tokens ORDER BY id DESC;

-- name: revoke_token
-- Revoke a token; returns it if it was active.
UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL
RETURNING id, user_id, permissions, name, created, revoked_at;

-- name: requeue_rejected
-- A stage rejected its task with requeue: back in the queue at its stage, no retry counted.
-- Items: [{id, stage, error, claim_id}]; returns the ids that applied (the caller checked the
-- bound).
WITH r AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb)
        AS r(id text, stage integer, error jsonb, claim_id text)),
done AS (
    UPDATE tasks t
    SET status = 'QUEUED', requeues = t.requeues + 1, executor_id = NULL, queued_at = $3,
        error = r.error, status_change = $3
    FROM r
    WHERE t.id = r.id AND t.status = 'EXECUTED' AND t.executor_id = $2 AND t.stage = r.stage
      AND t.claim_id = r.claim_id
    RETURNING t.id, t.job_id, t.stage, t.app_name, t.requeues, t.error),
ev AS (
    INSERT INTO events (type, task_id, job_id, status, stage, executor_id, created, data)
    SELECT 'task-rejected', id, job_id, 'QUEUED', stage, $2, $3,
           jsonb_build_object('requeue', true, 'requeues', requeues, 'error', error)
    FROM done),
wake AS (
    SELECT pg_notify('kaiju_tasks_queued', app_name) FROM (SELECT DISTINCT app_name FROM done) a)
SELECT id FROM done, (SELECT count(*) FROM wake) w;

-- ==== event receivers ==========================================================================

-- name: events_after
-- Events written by transactions that have all ended (xid below the snapshot's xmin), after
-- the cursor ($1 xid as text, $2 id; NULLs: from the oldest kept), in (xid, id) order: read
-- this way, a receiver misses none and repeats none, whatever order transactions commit in.
-- The task's app and stage count are joined in for monitors. With $4 (a one-off snapshot, not
-- followed afterwards) every committed event is read, whatever transactions are still open.
SELECT e.id, e.xid::text AS xid, e.type, e.task_id, e.job_id, e.status, e.stage,
       e.executor_id, e.created, e.data, t.app_name, t.stages
FROM events e
LEFT JOIN tasks t ON t.id = e.task_id
WHERE ($4::boolean OR e.xid < pg_snapshot_xmin(pg_current_snapshot()))
  AND ($1::text IS NULL OR (e.xid, e.id) > ($1::text::xid8, $2::bigint))
ORDER BY e.xid, e.id
LIMIT $3;

-- name: event_cursor
-- The cursor of an event id, to resume after it.
SELECT xid::text AS xid, id FROM events WHERE id = $1;

-- name: latest_event_cursor
-- The cursor of the newest event of ended transactions: "from now on".
SELECT xid::text AS xid, id FROM events
WHERE xid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY xid DESC, id DESC
LIMIT 1;

-- ==== the read side (store/insights.py) =======================================================
-- What the dashboard, /metrics, /health and `kaiju-tasks top` show, each figure read by one query.

-- name: task_counts
-- Tasks by app and status.
SELECT app_name AS app, status, count(*) AS count FROM tasks GROUP BY 1, 2 ORDER BY 1, 2;

-- name: queue_lag
-- Per app with QUEUED tasks, the age in seconds of the oldest at $1.
SELECT app_name AS app, extract(epoch FROM $1::timestamptz - min(queued_at))::float8 AS lag
FROM tasks WHERE status = 'QUEUED'
GROUP BY 1
ORDER BY 1;

-- name: cluster
-- Whether a manager leads (holds the leadership lock of this database: $2, $3 are its key's
-- halves as pg_locks shows a bigint key), how many executors were heard from after $1 and have
-- not stopped (debug ones among them), and the last event id given out (the identity's last
-- value: unlike max(id), it never goes back when old events are pruned).
SELECT EXISTS (
           SELECT 1 FROM pg_locks
           WHERE locktype = 'advisory' AND granted AND classid = $2 AND objid = $3
             AND objsubid = 1
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
       ) AS leader,
       count(*) AS executors,
       count(*) FILTER (WHERE debug) AS debug_executors,
       (SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('events', 'id')), 0))
           AS events
FROM executors
WHERE stopped_at IS NULL AND heartbeat_at > $1;

-- name: unserved_apps
-- Apps whose tasks are QUEUED while no live executor serves them ($2: heard from after this and
-- not stopped), the longest waiting first: {app, queued, waiting_s} measured at $1; at most $3.
WITH served AS (
    SELECT DISTINCT unnest(apps) AS app FROM executors
    WHERE stopped_at IS NULL AND heartbeat_at > $2),
queued AS (
    SELECT app_name, count(*) AS queued, min(queued_at) AS oldest
    FROM tasks WHERE status = 'QUEUED'
      -- a debug queue whose executor is gone is emptied by the manager (debug_orphans)
      AND app_name NOT LIKE '%@debug-%'
    GROUP BY 1)
SELECT q.app_name AS app, q.queued,
       greatest(extract(epoch FROM $1::timestamptz - q.oldest)::float8, 0) AS waiting_s
FROM queued q
WHERE NOT EXISTS (SELECT 1 FROM served s WHERE s.app = q.app_name)
ORDER BY q.oldest, q.app_name
LIMIT $3;

-- name: served_apps
-- The apps live executors serve (heard from after $1 and not stopped).
SELECT DISTINCT unnest(apps) AS app FROM executors WHERE stopped_at IS NULL AND heartbeat_at > $1;

-- name: workers
-- Executors heard from since $1 (live ones first, then the newest), each with the tasks it runs
-- now; at most $2 (NULL: all).
SELECT e.id, e.host, e.pid, e.apps, e.concurrency, e.started, e.heartbeat_at, e.stopped_at,
       e.debug,
       coalesce((SELECT array_agg(t.id ORDER BY t.status_change) FROM tasks t
                 WHERE t.status = 'EXECUTED' AND t.executor_id = e.id), '{}') AS running
FROM executors e
WHERE e.heartbeat_at > $1 OR e.stopped_at > $1
ORDER BY e.stopped_at IS NOT NULL, e.started DESC
LIMIT $2;

-- name: active_tasks
-- Tasks running or waiting, the longest in their status first; at most $1.
SELECT id, app_name, status, stage, stages, executor_id, job_id, status_change, wait_deadline
FROM tasks WHERE status IN ('EXECUTED', 'WAITING')
ORDER BY status_change
LIMIT $1;

-- name: throughput
-- Finished and failed tasks per minute over the $2 minutes up to $1, from the events table.
SELECT date_trunc('minute', created) AS minute,
       count(*) FILTER (WHERE type = 'task-succeeded') AS finished,
       count(*) FILTER (WHERE type IN ('task-failed', 'task-revoked', 'task-rejected')) AS failed
FROM events
WHERE created > date_trunc('minute', $1::timestamptz) - make_interval(mins => $2 - 1)
  AND created <= $1::timestamptz
  AND type IN ('task-succeeded', 'task-failed', 'task-revoked', 'task-rejected')
GROUP BY 1
ORDER BY 1;

-- name: timeline
-- The newest $2 events of task $1 written since $3, oldest first (a cron task's early runs drop
-- off first).
SELECT * FROM (
    SELECT e.id, e.type, e.status, e.stage, e.executor_id, e.created, e.data
    FROM events e
    WHERE e.task_id = $1 AND e.created >= $3
    ORDER BY e.id DESC
    LIMIT $2
) newest
ORDER BY id;

-- name: raw_task
-- The stored JSON of one task as text, each column cut to $2 characters: what the dashboard
-- shows of a task it cannot format.
SELECT id, app_name, status, stage, stages, user_id, created, status_change,
       left(commands::text, $2) AS commands, length(commands::text) AS commands_chars,
       left(kws::text, $2) AS kws, length(kws::text) AS kws_chars,
       left(result::text, $2) AS result, length(result::text) AS result_chars,
       left(error::text, $2) AS error, length(error::text) AS error_chars
FROM tasks
WHERE id = $1;

-- ==== dashboard sessions =======================================================================

-- name: session_start
-- A new session ($1: hash of its id) for the active token whose hash is $2, created at $3 and
-- idle-expiring at $4; nothing if the token is unknown or revoked.
INSERT INTO dashboard_sessions (id_hash, token_id, created, expires)
SELECT $1, t.id, $3, $4 FROM tokens t WHERE t.token_hash = $2 AND t.revoked_at IS NULL
RETURNING token_id;

-- name: session_trim
-- Keep the newest $2 sessions of token $1; the older ones end.
DELETE FROM dashboard_sessions
WHERE id_hash IN (
    SELECT id_hash FROM dashboard_sessions WHERE token_id = $1
    ORDER BY created DESC, id_hash
    OFFSET $2
);

-- name: session_prune
-- Sessions that have ended ($1 = now, $2 = the longest a session may last): idle too long, too
-- old, or of a revoked token.
DELETE FROM dashboard_sessions s
WHERE s.expires <= $1
   OR s.created <= $1 - $2::interval
   OR EXISTS (SELECT 1 FROM tokens t WHERE t.id = s.token_id AND t.revoked_at IS NOT NULL);

-- name: session_find
-- The caller a live session ($1: hash of its id) stands for at $2; a session used again after
-- more than $5 of quiet is extended to $2 + $3 (idle expiry). $4: the longest a session lasts.
WITH found AS (
    SELECT s.id_hash, s.token_id, s.expires, t.user_id, t.permissions
    FROM dashboard_sessions s
    JOIN tokens t ON t.id = s.token_id
    WHERE s.id_hash = $1
      AND s.expires > $2
      AND s.created > $2 - $4::interval
      AND t.revoked_at IS NULL
), touched AS (
    UPDATE dashboard_sessions s SET expires = $2 + $3::interval
    FROM found
    WHERE s.id_hash = found.id_hash AND found.expires < $2 + $3::interval - $5::interval
)
SELECT token_id, user_id, permissions FROM found;

-- name: session_end
-- End a session (log out).
DELETE FROM dashboard_sessions WHERE id_hash = $1;

-- ==== /metrics counters (metrics.py) ==========================================================

-- name: ended_counts
-- Task runs that ended (FINISHED; FAILED by a failure, a revoke or a rejection) by app and
-- status, counted from the events of ended transactions after the cursor ($1 xid as text, $2 id;
-- NULLs: from the oldest kept) in events_after's order, so that a caller that passes back the
-- cursor misses none and counts none twice. Each row carries the cursor after the last event
-- read (counted or not); no row: no event since. A lone row with NULL status: nothing ended.
-- The app is the task's, NULL once the task is deleted.
WITH seen AS (
    SELECT e.xid, e.id, e.type, e.task_id, e.status FROM events e
    WHERE e.xid < pg_snapshot_xmin(pg_current_snapshot())
      AND ($1::text IS NULL OR (e.xid, e.id) > ($1::text::xid8, $2::bigint))),
last AS (
    SELECT xid::text AS xid, id FROM seen ORDER BY xid DESC, id DESC LIMIT 1),
counts AS (
    SELECT t.app_name AS app, s.status, count(*) AS count
    FROM seen s
    LEFT JOIN tasks t ON t.id = s.task_id
    WHERE s.type IN ('task-succeeded', 'task-failed', 'task-revoked', 'task-rejected')
      AND s.status IN ('FINISHED', 'FAILED')
    GROUP BY t.app_name, s.status)
SELECT c.app, c.status, coalesce(c.count, 0) AS count, last.xid, last.id
FROM last
LEFT JOIN counts c ON true
ORDER BY count DESC, c.app, c.status;
