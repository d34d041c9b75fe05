"""The parsers of setting values: each takes the raw text of a variable and returns its value, or
raises ValueError whose text completes "expected ..." in the one-line start error (conf/settings.py)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable

from psycopg import conninfo


def parse_positive_int(value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"a positive integer, got {value!r}")
    return number


def parse_bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"an integer from {low} to {high}, got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"an integer from {low} to {high}, got {value!r}")
        return number

    return parse


def parse_positive_float(value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"a positive number of seconds, got {value!r}") from None
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError(f"a positive number of seconds, got {value!r}")
    return number


def parse_timeout_s(value: str) -> float:
    """Seconds, more than 0 and at most an hour."""
    number = parse_positive_float(value)
    if number > 3600:
        raise ValueError(f"a number of seconds from 0 to 3600, got {value!r}")
    return number


def parse_ratio(value: str) -> float:
    """A factor of at least 1 (a canary may not be judged against a bar below production's)."""
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"a number of at least 1, got {value!r}") from None
    if not 1.0 <= number < float("inf"):
        raise ValueError(f"a number of at least 1, got {value!r}")
    return number


def parse_bind(value: str) -> str:
    """host:port with a port in 1..65535; IPv6 hosts in brackets."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]*):(\d{1,5})", value.strip())
    if not match:
        raise ValueError(f"HOST:PORT such as 127.0.0.1:8080, got {value!r}")
    host, port = match.group(1), int(match.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"a port from 1 to 65535, got {value!r}")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"a valid IPv6 address in brackets, got {value!r}") from None
    return value.strip()


def parse_database_url(value: str) -> str:
    """A libpq URL (postgresql:// or postgres://) naming a host or a socket directory.

    libpq quotes the offending token in its errors, which may be part of a password: only the
    reason is kept.
    """
    value = value.strip()
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("a URL such as postgresql://user:pass@host:5432/db")
    try:
        params = conninfo.conninfo_to_dict(value)
    except Exception as exc:  # psycopg.ProgrammingError for a malformed URL
        reason = str(exc).strip().splitlines()[0].split(":")[0]
        raise ValueError(f"a valid postgresql:// URL ({reason})") from None
    if not params.get("host") and not params.get("hostaddr"):
        raise ValueError("a postgresql:// URL with a host (or ?host=/socket/dir)")
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"a postgresql:// URL with a port from 1 to 65535, got {port!r}")
    return value


def parse_log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError(f"one of debug, info, warning, error, critical, got {value!r}")
    return level


def parse_switch(value: str) -> bool:
    """on/off, true/false, yes/no, 1/0 (any case)."""
    word = value.strip().lower()
    if word in {"on", "true", "yes", "1"}:
        return True
    if word in {"off", "false", "no", "0"}:
        return False
    raise ValueError(f"on or off, got {value!r}")


def parse_nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("a non-empty value")
    return value


def parse_kid(value: str) -> str:
    """A JWT key id: the one rule for JWT_SECRET_KID, JWT_PUBLIC_KEYS and the keys' ring (app/auth/keys.py)."""
    if not re.fullmatch(r"[A-Za-z0-9._\-]{1,64}", value):
        raise ValueError(f"a key id of 1-64 letters, digits, '.', '_' or '-', got {value!r}")
    return value


def parse_min_length(minimum: int) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if len(value.encode()) < minimum:
            raise ValueError(f"a secret of at least {minimum} bytes")
        return value

    return parse


def parse_public_keys(value: str) -> dict[str, str]:
    """kid=path pairs separated by commas; each path must name a readable file."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        kid, sep, path = item.partition("=")
        if not sep or not kid or not path:
            raise ValueError(f"KID=PATH[,KID=PATH...], got {item!r}")
        parse_kid(kid)
        if kid in keys:
            raise ValueError(f"each kid once, but {kid!r} is named twice")
        if not os.path.isfile(path):
            raise ValueError(f"a readable PEM file for kid {kid!r}, but {path!r} is not a file")
        keys[kid] = path
    return keys


def parse_bucket(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", value.strip()):
        raise ValueError(f"an S3 bucket name (3-63 lower-case letters, digits, '.', '-'), got {value!r}")
    return value.strip()


def parse_http_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/:]+(:\d{1,5})?(/\S*)?", value.strip()):
        raise ValueError(f"an http(s)://host[:port] URL, got {value!r}")
    return value.strip().rstrip("/")


def parse_optional_file(value: str) -> str:
    if not os.path.isfile(value):
        raise ValueError(f"a readable file, but {value!r} is not a file")
    return value


def parse_ring_bytes(value: str) -> int:
    """A queue ring size: a multiple of 64 from 64 KiB to 1 GiB (shm.ring's layout)."""
    number = parse_bounded_int(64 * 1024, 1 << 30)(value)
    if number % 64:
        raise ValueError(f"a multiple of 64 from 65536 to 1073741824, got {value!r}")
    return number


KEY_PREFIX = r"([A-Za-z0-9_][A-Za-z0-9._-]*/)+"  # segments of letters, digits, '.', '_', '-', each ending in '/'


def parse_key_prefix(value: str) -> str:
    """An object key prefix ending in '/' (segments of letters, digits, '.', '_', '-'), or '' for off."""
    if value and not re.fullmatch(KEY_PREFIX, value):
        raise ValueError(f"empty (off) or a key prefix such as prediction-spool/, got {value!r}")
    return value


def parse_required_key_prefix(value: str) -> str:
    """An object key prefix ending in '/', never empty."""
    if not re.fullmatch(KEY_PREFIX, value):
        raise ValueError(f"a key prefix such as prediction-archive/, got {value!r}")
    return value

