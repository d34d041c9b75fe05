"""Settings from environment variables (see conf/settings.py for the table)."""

from conf.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
