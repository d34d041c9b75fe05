-- 002_trace_id: the W3C trace id (32 lower-case hex) of the request that made a prediction, when
-- OpenTelemetry tracing was on and the request was traced (app/tracing.py); NULL otherwise.
-- Adding a nullable column without a default rewrites nothing: instant even on a large log. No
-- CHECK on its format: a prediction must never be refused for its tracing field.
-- The append-only trigger (BEFORE UPDATE OR DELETE OR TRUNCATE) is untouched by ALTER TABLE.

ALTER TABLE siramodel_predictions
    ADD COLUMN trace_id text;

COMMENT ON COLUMN siramodel_predictions.trace_id IS
    'W3C trace id of the request (OpenTelemetry), when it was traced; NULL otherwise.';
