-- kaiju-tasks 0001: tasks and notifications.
-- Limits mirror kaiju_tasks.models.Limit; the service reports violations by field before they
-- reach these constraints, which guard against writers that bypass it.

CREATE TABLE tasks (
    id               text        PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 256),
    app_name         text        NOT NULL DEFAULT 'default' CHECK (length(app_name) BETWEEN 1 AND 256),
    commands         jsonb       NOT NULL CHECK (jsonb_typeof(commands) = 'array'
                                                 AND jsonb_array_length(commands) BETWEEN 1 AND 100),
    kws              jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(kws) = 'object'),
    enabled          boolean     NOT NULL DEFAULT true,
    cron             text,
    max_exec_timeout integer     NOT NULL DEFAULT 300 CHECK (max_exec_timeout BETWEEN 10 AND 14400),
    max_retries      integer     NOT NULL DEFAULT 0 CHECK (max_retries BETWEEN 0 AND 10),
    retries          integer     NOT NULL DEFAULT 0 CHECK (retries >= 0),
    restart_policy   text        NOT NULL DEFAULT 'CURRENT' CHECK (restart_policy IN ('CURRENT', 'FIRST')),
    retry_delay      integer     NOT NULL DEFAULT 0 CHECK (retry_delay BETWEEN 0 AND 86400),
    next_task        text        REFERENCES tasks (id) ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED,
    notify           boolean     NOT NULL DEFAULT false,
    system           boolean     NOT NULL DEFAULT false,
    description      text,
    meta             jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(meta) = 'object'),
    priority         smallint    NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    status           text        NOT NULL DEFAULT 'IDLE'
                                 CHECK (status IN ('IDLE', 'QUEUED', 'EXECUTED', 'FINISHED', 'FAILED',
                                                   'WAITING', 'SUSPENDED')),
    stage            integer     NOT NULL DEFAULT 0 CHECK (stage >= 0),
    stages           integer     NOT NULL CHECK (stages BETWEEN 1 AND 100),
    result           jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(result) = 'array'),
    error            jsonb,
    exit_code        integer,
    job_id           text,
    user_id          text,
    executor_id      text,
    created          timestamptz NOT NULL DEFAULT now(),
    queued_at        timestamptz,
    exec_deadline    timestamptz,
    wait_deadline    timestamptz,
    next_run         timestamptz,
    status_change    timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    parent_id        text,
    root_id          text,
    CHECK (stage <= stages),
    CHECK (jsonb_array_length(result) <= stages)
);

-- Executors claim the best QUEUED task of their apps: highest priority, then oldest.
CREATE INDEX tasks_queue_idx ON tasks (app_name, priority DESC, queued_at, id)
    WHERE status = 'QUEUED';
-- The manager queues IDLE tasks whose next_run is due.
CREATE INDEX tasks_next_run_idx ON tasks (next_run) WHERE status = 'IDLE' AND enabled;
-- The manager aborts running or waiting tasks past their deadline, and resumes due waits.
CREATE INDEX tasks_exec_deadline_idx ON tasks (exec_deadline)
    WHERE status IN ('QUEUED', 'EXECUTED', 'WAITING', 'SUSPENDED');
CREATE INDEX tasks_wait_deadline_idx ON tasks (wait_deadline) WHERE status = 'WAITING';
-- Rescue of tasks whose executor went silent.
CREATE INDEX tasks_executor_idx ON tasks (executor_id) WHERE status = 'EXECUTED';
-- Retries and cron restarts of ended tasks; garbage collection of old ended tasks.
CREATE INDEX tasks_ended_idx ON tasks (status_change) WHERE status IN ('FINISHED', 'FAILED');
CREATE INDEX tasks_user_idx ON tasks (user_id, created) WHERE user_id IS NOT NULL;
CREATE INDEX tasks_root_idx ON tasks (root_id) WHERE root_id IS NOT NULL;
CREATE INDEX tasks_next_task_idx ON tasks (next_task) WHERE next_task IS NOT NULL;

CREATE TABLE notifications (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id   text        NOT NULL,
    job_id    text,
    status    text        NOT NULL,
    result    jsonb       NOT NULL DEFAULT '[]',
    exit_code integer,
    error     jsonb,
    user_id   text,
    read      boolean     NOT NULL DEFAULT false,
    created   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX notifications_task_idx ON notifications (task_id, created);
CREATE INDEX notifications_user_idx ON notifications (user_id, created);
CREATE INDEX notifications_created_idx ON notifications (created);
