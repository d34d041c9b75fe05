-- 004_prediction_partitions: the prediction log becomes range-partitioned by day on created_at.
--
-- Twelve pods write billions of rows a day into one table whose triggers refuse DELETE: as one
-- heap it could only grow. Day partitions let whole days leave by DETACH and DROP once archived
-- (`sira predictions archive`, app/predlog/archive.py), while every row stays immutable: each
-- partition carries the same statement trigger as the table, so UPDATE, DELETE and TRUNCATE are
-- refused on a partition too.
--
-- Days are UTC: partition siramodel_predictions_pYYYYMMDD holds [day 00:00Z, next day 00:00Z).
-- The supervisor creates today's and the next days' partitions ahead of time under an advisory
-- lock (sira_ensure_prediction_partitions), so many pods never race. A row whose day has no
-- partition lands in siramodel_predictions_default: the write path never fails for a missing
-- partition, and the row moves to its day's partition when that is made (sira_prediction_partition).
--
-- A partitioned table's unique keys must hold the partition key, so the primary key is
-- (prediction_id, created_at). The writer's ON CONFLICT names both: a replayed record carries the
-- created_at it was made with, so it meets its first copy in the same partition and lands once.
--
-- The existing rows are copied into their day partitions inside this migration's transaction, then
-- the old heap is dropped: the table is held for as long as the copy takes, so a log of many
-- millions of rows wants a maintenance window (docs/prediction-log.md gives the rate).

ALTER TABLE siramodel_predictions RENAME TO siramodel_predictions_unpartitioned;
ALTER INDEX siramodel_predictions_pkey RENAME TO siramodel_predictions_unpartitioned_pkey;
ALTER INDEX siramodel_predictions_event RENAME TO siramodel_predictions_unpartitioned_event;
ALTER INDEX siramodel_predictions_created_brin RENAME TO siramodel_predictions_unpartitioned_created_brin;

CREATE TABLE siramodel_predictions (
    prediction_id uuid NOT NULL,
    event_id      text NOT NULL,
    product       text NOT NULL,
    model_id      uuid NOT NULL,
    model_role    text NOT NULL CHECK (model_role IN ('production', 'canary', 'shadow')),
    score         double precision NOT NULL,
    decision      text NOT NULL CHECK (decision IN ('allow', 'review', 'block')),
    explanation   jsonb,
    latency_ms    double precision,
    cached        boolean NOT NULL DEFAULT false,
    request_id    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    trace_id      text,
    CONSTRAINT siramodel_predictions_pkey PRIMARY KEY (prediction_id, created_at)
) PARTITION BY RANGE (created_at);

COMMENT ON TABLE siramodel_predictions IS
    'Immutable log of every prediction, one partition per UTC day; writers insert with ON CONFLICT (prediction_id, created_at) DO NOTHING so a replayed batch lands once.';
COMMENT ON COLUMN siramodel_predictions.trace_id IS
    'W3C trace id of the request (OpenTelemetry), when it was traced; NULL otherwise.';

CREATE INDEX siramodel_predictions_event ON siramodel_predictions (event_id, created_at);
CREATE INDEX siramodel_predictions_created_brin ON siramodel_predictions USING brin (created_at);

CREATE TRIGGER siramodel_predictions_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON siramodel_predictions
    FOR EACH STATEMENT EXECUTE FUNCTION sira_refuse_change();

-- A statement trigger on the partitioned table fires for statements on the table, not for one that
-- names a partition: every partition gets its own.
CREATE FUNCTION sira_refuse_prediction_changes(p_partition regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('CREATE TRIGGER siramodel_predictions_append_only '
                   'BEFORE UPDATE OR DELETE OR TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION sira_refuse_change()', p_partition);
END;
$$;

CREATE TABLE siramodel_predictions_default PARTITION OF siramodel_predictions DEFAULT;
SELECT sira_refuse_prediction_changes('siramodel_predictions_default');

-- The partition of one UTC day, created when missing; its name. Rows of the day that wait in the
-- default partition (none existed when they were written) move into it: the default partition is
-- swapped for a new empty one and its rows inserted again through the table, each into its day's
-- partition or the new default, and the old default dropped; all in the caller's transaction, so
-- no row is ever lost or seen twice. The default partition holds only such strays, so this is small.
CREATE FUNCTION sira_prediction_partition(p_day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    partition_name text := 'siramodel_predictions_p' || to_char(p_day, 'YYYYMMDD');
    day_start timestamptz := p_day::timestamp AT TIME ZONE 'UTC';
    strays boolean;
BEGIN
    IF to_regclass(partition_name) IS NOT NULL THEN
        RETURN partition_name;
    END IF;
    SELECT EXISTS (SELECT 1 FROM siramodel_predictions_default
                    WHERE created_at >= day_start AND created_at < day_start + interval '1 day')
      INTO strays;
    IF strays THEN
        ALTER TABLE siramodel_predictions DETACH PARTITION siramodel_predictions_default;
        ALTER TABLE siramodel_predictions_default RENAME TO siramodel_predictions_default_moving;
        CREATE TABLE siramodel_predictions_default PARTITION OF siramodel_predictions DEFAULT;
        PERFORM sira_refuse_prediction_changes('siramodel_predictions_default');
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF siramodel_predictions FOR VALUES FROM (%L) TO (%L)',
                   partition_name, day_start, day_start + interval '1 day');
    PERFORM sira_refuse_prediction_changes(partition_name::regclass);
    IF strays THEN
        INSERT INTO siramodel_predictions SELECT * FROM siramodel_predictions_default_moving;
        DROP TABLE siramodel_predictions_default_moving;
    END IF;
    RETURN partition_name;
END;
$$;

-- Yesterday's (late replays), today's and the next p_days_ahead days' partitions; how many were
-- made. One caller at a time: every supervisor calls it on start and every hour.
CREATE FUNCTION sira_ensure_prediction_partitions(p_days_ahead integer DEFAULT 3) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    made integer := 0;
    offset_days integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('sira_prediction_partitions', 0));
    FOR offset_days IN -1 .. p_days_ahead LOOP
        IF to_regclass('siramodel_predictions_p' || to_char(today + offset_days, 'YYYYMMDD')) IS NULL THEN
            PERFORM sira_prediction_partition(today + offset_days);
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END;
$$;

-- Days that left Postgres for the bucket (`sira predictions archive`): where each went, what it
-- held, and whether it was brought back. GET /v1/infer/{id} reads it to answer 410 for an id of an
-- archived day. Rows of a day that arrive after it was archived (a late spool replay) go as the
-- day's next part; a restore brings every part back, and archiving the day again then replaces
-- the restored parts (their rows are in the partition again).
CREATE TABLE sira_prediction_archives (
    day            date NOT NULL,
    part           integer NOT NULL CHECK (part >= 0),
    object_key     text NOT NULL,
    manifest_key   text NOT NULL,
    store          text NOT NULL,
    rows           bigint NOT NULL CHECK (rows >= 0),
    sha256         text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes     bigint NOT NULL CHECK (size_bytes > 0),
    schema_version integer NOT NULL,
    archived_at    timestamptz NOT NULL DEFAULT now(),
    restored_at    timestamptz,
    PRIMARY KEY (day, part)
);

COMMENT ON TABLE sira_prediction_archives IS
    'One row per UTC day of siramodel_predictions moved to the bucket as Parquet (object_key in store), verified by sha256 and rows.';

-- The rows already logged, into the partitions of their days.
SELECT sira_prediction_partition(day)
  FROM (SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date AS day
          FROM siramodel_predictions_unpartitioned) AS days;
INSERT INTO siramodel_predictions
SELECT prediction_id, event_id, product, model_id, model_role, score, decision, explanation,
       latency_ms, cached, request_id, created_at, trace_id
  FROM siramodel_predictions_unpartitioned;
DROP TABLE siramodel_predictions_unpartitioned;

SELECT sira_ensure_prediction_partitions();
