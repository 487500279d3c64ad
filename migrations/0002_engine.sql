-- kaiju-tasks 0002: executors (heartbeats) and lifecycle events.

CREATE TABLE executors (
    id           text        PRIMARY KEY,
    apps         text[]      NOT NULL,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    concurrency  integer     NOT NULL,
    started      timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    stopped_at   timestamptz
);

-- Every lifecycle transition, written in the transaction that makes it, so that a monitor can
-- follow live (NOTIFY) and catch up after a disconnect (by id).
CREATE TABLE events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type        text        NOT NULL,
    task_id     text,
    job_id      text,
    status      text,
    stage       integer,
    executor_id text,
    created     timestamptz NOT NULL,
    data        jsonb       NOT NULL DEFAULT '{}'
);

CREATE INDEX events_created_idx ON events (created);
CREATE INDEX events_task_idx ON events (task_id, id) WHERE task_id IS NOT NULL;
