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

-- Append-only and in time order: a BRIN index serves retention at almost no write cost.
CREATE INDEX events_created_idx ON events USING brin (created);
CREATE INDEX events_task_idx ON events (task_id, id) WHERE task_id IS NOT NULL;

-- Monitors LISTEN on kaiju_tasks_events; the payload is the newest event id of the statement,
-- and they read what they missed from the table (a lost notification costs latency only).
CREATE FUNCTION kaiju_tasks_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    newest bigint;
BEGIN
    SELECT max(id) INTO newest FROM new_events;
    IF newest IS NOT NULL THEN  -- statements that wrote no event stay silent
        PERFORM pg_notify('kaiju_tasks_events', newest::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION kaiju_tasks_notify_events();
