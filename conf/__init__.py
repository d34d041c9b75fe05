"""Settings from environment variables (conf/settings.py has the table), the data dir, logs, secrets, TLS."""
