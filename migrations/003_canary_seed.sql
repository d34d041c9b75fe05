-- 003_canary_seed: each canary config gets a routing seed, 16 bytes that key the hash which puts
-- an event in the canary's buckets (app/canary_routing.py). Without it any client could compute
-- an event's bucket from its product and event id and pick ids that land on the model it prefers.
--
-- POST /v1/canary (app/canary_config.py) writes a new seed drawn from Python's `secrets`
-- whenever a canary starts (exactly when started_at restarts) and keeps it on every other change,
-- so raising the percent keeps each event's bucket. The column default only fills the rows that
-- exist when this file runs, and rows that an older SIRA inserts during a rolling upgrade:
-- uuid_send(gen_random_uuid()) is 16 bytes, 122 of them random bits from PostgreSQL's strong
-- random source, core since PostgreSQL 13 (no pgcrypto needed). A volatile default is evaluated
-- per row while ADD COLUMN rewrites the table, so no two existing rows share a seed. The rewrite
-- fires no row trigger: no history row and no NOTIFY; supervisors pick the seed up on their next
-- sync (the new version reads it on start). Until every pod runs a version that reads the seed,
-- old pods route with the unkeyed hash and new pods with the seed: stop canaries, or accept
-- that split, for the length of the rollout.
--
-- The seed is never answered by the API. The history table keeps no copy of it.

ALTER TABLE sira_canary_config
    ADD COLUMN routing_seed bytea NOT NULL DEFAULT uuid_send(gen_random_uuid())
        CONSTRAINT sira_canary_config_routing_seed_length CHECK (octet_length(routing_seed) = 16);

COMMENT ON COLUMN sira_canary_config.routing_seed IS
    '16 secret bytes keying the canary''s bucket hash; new when a canary starts, kept while it runs; never answered by the API.';
