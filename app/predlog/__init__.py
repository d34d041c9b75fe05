"""The prediction log: records in the rings, overflow and spool files, the Postgres sink, the handoff."""
