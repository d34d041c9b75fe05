"""Who may call: bearer tokens, keys, roles, and the per-role rate limits."""
