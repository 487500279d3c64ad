-- kaiju-tasks 0014: the W3C trace context of a task's creator ({"traceparent", "tracestate"}),
-- and of the last run ("run"), when OpenTelemetry is in use (the [otel] extra). NULL otherwise.
ALTER TABLE tasks ADD COLUMN trace jsonb;
