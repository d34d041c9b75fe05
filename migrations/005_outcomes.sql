-- 005_outcomes: what turned out to be fraud. Chargebacks and analysts' reviews arrive days or
-- weeks after a prediction, as labels of the payment event (product, event_id): every prediction
-- of the event (production, canary, shadow) is judged by the same label, so a shadow model's
-- comparison with production is paired, event by event.
--
-- Append-only like the prediction log: a correction is a new row, and the outcome of an event is
-- its latest by coalesce(observed_at, received_at). The same outcome sent twice (same event,
-- source, label and observed_at, observed_at absent counting as one value) is kept once: a unique
-- index with NULLS NOT DISTINCT (PostgreSQL 15). predicted_at is the created_at of the event's
-- first prediction, so a join to the day-partitioned log can bound created_at, and the table can be
-- partitioned by it like the log when it grows.

CREATE TABLE sira_prediction_outcomes (
    product      text NOT NULL,
    event_id     text NOT NULL,
    label        text NOT NULL CHECK (label IN ('fraud', 'legit')),
    source       text NOT NULL CHECK (source ~ '^[a-z][a-z0-9_]{0,63}$'),
    observed_at  timestamptz,
    received_at  timestamptz NOT NULL DEFAULT now(),
    predicted_at timestamptz NOT NULL
);

COMMENT ON TABLE sira_prediction_outcomes IS
    'Labels of payment events (fraud or legit) from chargebacks, analysts...; append-only, the latest per event wins.';

CREATE UNIQUE INDEX sira_prediction_outcomes_once ON sira_prediction_outcomes
    (product, event_id, source, label, observed_at) NULLS NOT DISTINCT;
CREATE INDEX sira_prediction_outcomes_predicted_brin ON sira_prediction_outcomes USING brin (predicted_at);

CREATE TRIGGER sira_prediction_outcomes_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON sira_prediction_outcomes
    FOR EACH STATEMENT EXECUTE FUNCTION sira_refuse_change();

-- The latest outcome of each labelled event.
CREATE VIEW sira_event_outcomes AS
SELECT DISTINCT ON (product, event_id) product, event_id, label, source,
       coalesce(observed_at, received_at) AS observed_at, predicted_at
  FROM sira_prediction_outcomes
 ORDER BY product, event_id, coalesce(observed_at, received_at) DESC, received_at DESC;

-- Beside compare_canary_performance: per (role, model) of the two, over predictions made in the last
-- p_hours (by the prediction's time, not the label's), the labelled predictions and how `block` and
-- `review` (review or block) did against the labels: precision, recall, false-positive rate.
CREATE FUNCTION compare_canary_quality(
    p_product text,
    p_canary_model_id uuid,
    p_production_model_id uuid,
    p_hours integer DEFAULT 24
)
RETURNS TABLE (
    model_role        text,
    model_id          uuid,
    predictions       bigint,
    labelled          bigint,
    fraud             bigint,
    legit             bigint,
    block_precision   double precision,
    block_recall      double precision,
    block_fp_rate     double precision,
    review_precision  double precision,
    review_recall     double precision,
    review_fp_rate    double precision
)
LANGUAGE sql STABLE AS $$
    WITH judged AS (
        SELECT p.model_role, p.model_id, p.decision, o.label
          FROM siramodel_predictions AS p
          LEFT JOIN LATERAL (SELECT e.label FROM sira_event_outcomes AS e   -- the view, one event at a time
                              WHERE e.product = p.product AND e.event_id = p.event_id) AS o ON true
         WHERE p.product = p_product
           AND p.model_id IN (p_canary_model_id, p_production_model_id)
           AND p.created_at >= now() - make_interval(hours => p_hours)
    )
    SELECT model_role, model_id, count(*), count(label),
           count(*) FILTER (WHERE label = 'fraud'), count(*) FILTER (WHERE label = 'legit'),
           (count(*) FILTER (WHERE decision = 'block' AND label = 'fraud'))::double precision
               / nullif(count(*) FILTER (WHERE decision = 'block' AND label IS NOT NULL), 0),
           (count(*) FILTER (WHERE decision = 'block' AND label = 'fraud'))::double precision
               / nullif(count(*) FILTER (WHERE label = 'fraud'), 0),
           (count(*) FILTER (WHERE decision = 'block' AND label = 'legit'))::double precision
               / nullif(count(*) FILTER (WHERE label = 'legit'), 0),
           (count(*) FILTER (WHERE decision <> 'allow' AND label = 'fraud'))::double precision
               / nullif(count(*) FILTER (WHERE decision <> 'allow' AND label IS NOT NULL), 0),
           (count(*) FILTER (WHERE decision <> 'allow' AND label = 'fraud'))::double precision
               / nullif(count(*) FILTER (WHERE label = 'fraud'), 0),
           (count(*) FILTER (WHERE decision <> 'allow' AND label = 'legit'))::double precision
               / nullif(count(*) FILTER (WHERE label = 'legit'), 0)
      FROM judged
     GROUP BY model_role, model_id
     ORDER BY array_position(ARRAY['production', 'canary', 'shadow'], model_role), model_id
$$;
