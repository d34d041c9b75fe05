"""Secrets that SIRA may generate itself when ops did not set them."""

from __future__ import annotations

import logging
import os
import secrets

log = logging.getLogger("sira.conf")

JWT_SECRET_FILE = "jwt_secret"


def jwt_secret_or_generate(jwt_secret: str | None, data_dir: str) -> str:
    """JWT_SECRET when set; else the one kept in the data dir, created once (mode 0600) with a warning.

    Several processes may start at once: O_EXCL makes exactly one of them create the file.
    """
    if jwt_secret:
        return jwt_secret
    path = os.path.join(data_dir, JWT_SECRET_FILE)
    os.makedirs(data_dir, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with open(path, encoding="ascii") as handle:
            value = handle.read().strip()
        if len(value) < 16:
            raise ValueError(f"{path} holds no usable secret; delete it or set JWT_SECRET") from None
        return value
    value = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(value + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("JWT_SECRET is not set: generated one in %s; set JWT_SECRET in production", path)
    return value
