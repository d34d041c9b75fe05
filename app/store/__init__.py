"""The model store: registry and canary config in Postgres, buckets, shared weights, hot swap."""
