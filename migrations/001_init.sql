-- 001_init: the SIRA schema of the seeds: model registry, immutable prediction log, canary config
-- (with history and change notifications), rollback log, per-window inference metrics and
-- compare_canary_performance(). Stock PostgreSQL 15/16 only (gen_random_uuid is core since 13).
-- Applied by workers/migrate.py in one transaction; never edit it once applied: add 002_*.sql.

-- updated_at follows every UPDATE, whoever writes the row.
CREATE FUNCTION sira_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

-- Append-only tables refuse UPDATE, DELETE and TRUNCATE from everyone (only a superuser could
-- disable the trigger): a statement-level trigger fires even when no row matches, and costs
-- nothing on INSERT, INSERT ... ON CONFLICT DO NOTHING or COPY.
CREATE FUNCTION sira_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING HINT = 'rows of this table are never changed or removed';
END;
$$;

-- Every change of the registry or the canary config is announced on channel sira_config_changed
-- (payload: {"table", "op", "product"}), so each instance re-reads it within a second; polling
-- stays the fallback. The notification is sent when the transaction commits.
CREATE FUNCTION sira_notify_config_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed_product text := CASE WHEN TG_OP = 'DELETE' THEN OLD.product ELSE NEW.product END;
BEGIN
    PERFORM pg_notify('sira_config_changed',
        jsonb_build_object('table', TG_TABLE_NAME, 'op', TG_OP, 'product', changed_product)::text);
    RETURN NULL;
END;
$$;


-- Model registry --------------------------------------------------------------------------------

CREATE TABLE siramodel_registry (
    model_id     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL,
    version      text NOT NULL,
    product      text NOT NULL,
    status       text NOT NULL DEFAULT 'candidate'
                 CHECK (status IN ('candidate', 'validated', 'canary', 'production', 'archived')),
    storage_key  text NOT NULL,
    sha256       text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes   bigint NOT NULL CHECK (size_bytes > 0),
    feature_spec jsonb NOT NULL DEFAULT '{}'::jsonb,
    threshold    double precision NOT NULL CHECK (threshold >= 0 AND threshold <= 1),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT siramodel_registry_product_version_key UNIQUE (product, version)
);

COMMENT ON TABLE siramodel_registry IS
    'Every model of every product; storage_key is the object key in the model store, verified by sha256 and size_bytes.';

-- At most one production model per product; promoting a model archives the old one in the same transaction.
CREATE UNIQUE INDEX siramodel_registry_one_production ON siramodel_registry (product)
    WHERE status = 'production';

CREATE TRIGGER siramodel_registry_touch BEFORE UPDATE ON siramodel_registry
    FOR EACH ROW EXECUTE FUNCTION sira_touch_updated_at();

CREATE TRIGGER siramodel_registry_notify AFTER INSERT OR UPDATE OR DELETE ON siramodel_registry
    FOR EACH ROW EXECUTE FUNCTION sira_notify_config_changed();


-- Prediction log --------------------------------------------------------------------------------

-- No foreign key to the registry: the log must accept every prediction the workers made, and a
-- batch COPY should not take a key-share lock on a registry row per row.
CREATE TABLE siramodel_predictions (
    prediction_id uuid PRIMARY KEY,
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
    created_at    timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE siramodel_predictions IS
    'Immutable log of every prediction; writers insert with ON CONFLICT (prediction_id) DO NOTHING so a replayed batch lands once.';

CREATE INDEX siramodel_predictions_event ON siramodel_predictions (event_id, created_at);
-- Rows arrive in time order, so a BRIN index serves time ranges at a tiny fraction of a btree's size and insert cost.
CREATE INDEX siramodel_predictions_created_brin ON siramodel_predictions USING brin (created_at);

CREATE TRIGGER siramodel_predictions_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON siramodel_predictions
    FOR EACH STATEMENT EXECUTE FUNCTION sira_refuse_change();


-- Canary configuration and its history ---------------------------------------------------------

CREATE TABLE sira_canary_config (
    product             text PRIMARY KEY,
    canary_model_id     uuid REFERENCES siramodel_registry (model_id),
    production_model_id uuid REFERENCES siramodel_registry (model_id),
    canary_percent      numeric(5, 2) NOT NULL DEFAULT 0
                        CHECK (canary_percent >= 0 AND canary_percent <= 100),
    mode                text NOT NULL DEFAULT 'canary' CHECK (mode IN ('canary', 'shadow')),
    started_at          timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    updated_by          text,
    CONSTRAINT sira_canary_config_traffic_needs_model
        CHECK (canary_percent = 0 OR canary_model_id IS NOT NULL),
    CONSTRAINT sira_canary_config_two_models
        CHECK (canary_model_id IS NULL OR canary_model_id <> production_model_id)
);

COMMENT ON TABLE sira_canary_config IS
    'Per product: which model is canary, which production, and the share of traffic (or shadow copy) the canary gets.';

CREATE TABLE sira_canary_config_history (
    history_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation           text NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE')),
    product             text NOT NULL,
    canary_model_id     uuid,
    production_model_id uuid,
    canary_percent      numeric(5, 2),
    mode                text,
    started_at          timestamptz,
    updated_at          timestamptz,
    updated_by          text,
    recorded_at         timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE sira_canary_config_history IS
    'Every state sira_canary_config went through (the new row; the old one for DELETE), written by a trigger.';

CREATE INDEX sira_canary_config_history_product ON sira_canary_config_history (product, history_id);

CREATE FUNCTION sira_record_canary_config() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    config sira_canary_config := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
BEGIN
    INSERT INTO sira_canary_config_history
        (operation, product, canary_model_id, production_model_id, canary_percent, mode,
         started_at, updated_at, updated_by)
    VALUES
        (TG_OP, config.product, config.canary_model_id, config.production_model_id,
         config.canary_percent, config.mode, config.started_at, config.updated_at, config.updated_by);
    RETURN NULL;
END;
$$;

CREATE TRIGGER sira_canary_config_touch BEFORE UPDATE ON sira_canary_config
    FOR EACH ROW EXECUTE FUNCTION sira_touch_updated_at();

CREATE TRIGGER sira_canary_config_record AFTER INSERT OR UPDATE OR DELETE ON sira_canary_config
    FOR EACH ROW EXECUTE FUNCTION sira_record_canary_config();

CREATE TRIGGER sira_canary_config_notify AFTER INSERT OR UPDATE OR DELETE ON sira_canary_config
    FOR EACH ROW EXECUTE FUNCTION sira_notify_config_changed();

CREATE TRIGGER sira_canary_config_history_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON sira_canary_config_history
    FOR EACH STATEMENT EXECUTE FUNCTION sira_refuse_change();


-- Rollback log ----------------------------------------------------------------------------------

CREATE TABLE sira_canary_rollback_log (
    id                  bigserial PRIMARY KEY,
    product             text NOT NULL,
    canary_model_id     uuid,
    production_model_id uuid,
    reason              text NOT NULL,
    metrics             jsonb,
    triggered_by        text NOT NULL DEFAULT 'auto',
    created_at          timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE sira_canary_rollback_log IS
    'Every canary rollback, automatic (triggered_by = auto, with the metrics that decided it) or manual.';

CREATE INDEX sira_canary_rollback_log_product ON sira_canary_rollback_log (product, created_at DESC);


-- Inference metrics -----------------------------------------------------------------------------

CREATE TABLE sira_inference_metrics (
    window_start   timestamptz NOT NULL,
    window_seconds integer NOT NULL CHECK (window_seconds > 0),
    product        text NOT NULL,
    model_id       uuid NOT NULL,
    model_role     text NOT NULL CHECK (model_role IN ('production', 'canary', 'shadow')),
    requests       bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    errors         bigint NOT NULL DEFAULT 0 CHECK (errors >= 0),
    p50_ms         double precision,
    p95_ms         double precision,
    p99_ms         double precision,
    allow_count    bigint NOT NULL DEFAULT 0 CHECK (allow_count >= 0),
    review_count   bigint NOT NULL DEFAULT 0 CHECK (review_count >= 0),
    block_count    bigint NOT NULL DEFAULT 0 CHECK (block_count >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (window_start, product, model_id, model_role)
);

COMMENT ON TABLE sira_inference_metrics IS
    'Per time window, product, model and role: request and error counts, latency percentiles, decision counts.';


-- Canary versus production ----------------------------------------------------------------------

-- One row per (role, model) among the two models, over the last p_hours. Latency percentiles
-- leave out cache hits (no model ran for them); counts and decision rates include them.
CREATE FUNCTION compare_canary_performance(
    p_product text,
    p_canary_model_id uuid,
    p_production_model_id uuid,
    p_hours integer DEFAULT 1
)
RETURNS TABLE (
    model_role     text,
    model_id       uuid,
    requests       bigint,
    avg_score      double precision,
    p50_latency_ms double precision,
    p95_latency_ms double precision,
    p99_latency_ms double precision,
    block_rate     double precision,
    review_rate    double precision,
    allow_rate     double precision
)
LANGUAGE sql STABLE AS $$
    SELECT p.model_role,
           p.model_id,
           count(*),
           avg(p.score),
           percentile_cont(0.50) WITHIN GROUP (ORDER BY p.latency_ms) FILTER (WHERE NOT p.cached),
           percentile_cont(0.95) WITHIN GROUP (ORDER BY p.latency_ms) FILTER (WHERE NOT p.cached),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY p.latency_ms) FILTER (WHERE NOT p.cached),
           avg((p.decision = 'block')::integer)::double precision,
           avg((p.decision = 'review')::integer)::double precision,
           avg((p.decision = 'allow')::integer)::double precision
      FROM siramodel_predictions AS p
     WHERE p.product = p_product
       AND p.model_id IN (p_canary_model_id, p_production_model_id)
       AND p.created_at >= now() - make_interval(hours => p_hours)
     GROUP BY p.model_role, p.model_id
     ORDER BY array_position(ARRAY['production', 'canary', 'shadow'], p.model_role), p.model_id
$$;
