"""Secrets read from files, as Vault Agent, the Vault CSI provider and Kubernetes Secrets mount them.

Three settings name a file instead of holding the secret: JWT_SECRET_FILE, INTERNAL_SERVICE_TOKEN_FILE
and DATABASE_URL_FILE, each exclusive with its plain variable. Every read of such a file checks it:

- it must exist and be a regular file (a symlink to one is fine: Kubernetes swaps a `..data` link);
- it must not be readable or writable by others, nor writable by its group (mode & 0o026): mount it
  with `defaultMode: 0400` (or 0440 with an fsGroup), Vault Agent `perms = "0400"`;
- one trailing newline is dropped (Vault Agent templates usually end with one, Kubernetes Secrets
  usually do not); what is left must not be empty; at most 64 KiB of UTF-8.

Formats, chosen to be unambiguous:

- JWT_SECRET_FILE: either one bare HS256 secret (one line, its kid is JWT_SECRET_KID), or a JSON
  object of kid -> secret, `{"2026-01": "...", "2026-02": "..."}`. The first entry signs (`sira
  token`) and verifies tokens that carry no kid; every entry verifies tokens carrying its kid. A
  rotation: add the new kid, SIGHUP; move it first once every verifier has it; remove the old kid,
  SIGHUP. Each secret is at least 32 bytes; a kid appears once.
- INTERNAL_SERVICE_TOKEN_FILE: one token per line (blank lines skipped), each at least 16 bytes and
  without spaces; every one is accepted, so a rotation overlaps old and new.
- DATABASE_URL_FILE: the URL, read once at start (see docs/configuration.md, Secrets from files).

Errors are ValueErrors that name the path and the reason (a JSON entry by its position), never a byte
of the content: a file with kid and secret swapped must not print the secret.
"""

from __future__ import annotations

import json
import os
import re
import stat

from conf.secrets import jwt_secret_or_generate

MAX_FILE_BYTES = 64 * 1024
FORBIDDEN_MODE_BITS = 0o026  # group write, other read, other write
MIN_JWT_SECRET_BYTES = 32
MIN_SERVICE_TOKEN_BYTES = 16
_KID = re.compile(r"[A-Za-z0-9._\-]{1,64}")

# The *_FILE variable -> the plain variable it replaces.
FILE_VARIABLES = {
    "JWT_SECRET_FILE": "JWT_SECRET",
    "INTERNAL_SERVICE_TOKEN_FILE": "INTERNAL_SERVICE_TOKEN",
    "DATABASE_URL_FILE": "DATABASE_URL",
}


def read_secret_file(path: str) -> str:
    """The file's text without one trailing newline, after the checks of the module docstring."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not hang us
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        check_secret_mode(path, info)
        data = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def check_secret_mode(path: str, info: os.stat_result) -> None:
    """A regular file that nobody but its owner (and its group, read only) may read or change."""
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_mode & FORBIDDEN_MODE_BITS:
        raise ValueError(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: a secret file must not be readable "
                         f"by others nor writable by its group or others (make it 0400 or 0440)")


def parse_jwt_secrets(text: str, bare_kid: str) -> tuple[dict[str, str], str]:
    """({kid: secret}, the signing kid) from JWT_SECRET_FILE's text: a JSON object or one bare secret."""
    if text.lstrip().startswith("{"):
        keys = _json_object_without_duplicates(text)
        if not keys:
            raise ValueError("an empty JSON object: expected {\"KID\": \"SECRET\", ...}")
        for number, (kid, secret) in enumerate(keys.items(), start=1):  # errors say where, not what
            if not _KID.fullmatch(kid):
                raise ValueError(f"entry {number}: a kid is 1-64 letters, digits, '.', '_' or '-'")
            if not isinstance(secret, str):
                raise ValueError(f"entry {number}: the secret must be a JSON string")
            _check_jwt_secret(secret, f"entry {number}: ")
        return keys, next(iter(keys))
    if "\n" in text or "\r" in text:
        raise ValueError("several lines: expected one secret, or a JSON object {\"KID\": \"SECRET\", ...}")
    _check_jwt_secret(text, "")
    return {bare_kid: text}, bare_kid


def _json_object_without_duplicates(text: str) -> dict:
    def no_duplicates(pairs: list) -> dict:
        keys: dict = {}
        for number, (key, value) in enumerate(pairs, start=1):
            if key in keys:
                raise ValueError(f"entry {number} repeats the kid of an earlier entry")
            keys[key] = value
        return keys

    try:
        value = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:  # its message says where, never what
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object {\"KID\": \"SECRET\", ...}")
    return value


def _check_jwt_secret(secret: str, where: str) -> None:
    if len(secret.encode("utf-8")) < MIN_JWT_SECRET_BYTES:
        raise ValueError(f"{where}an HS256 secret must be at least {MIN_JWT_SECRET_BYTES} bytes")


def parse_service_tokens(text: str) -> tuple[str, ...]:
    """The internal service tokens of INTERNAL_SERVICE_TOKEN_FILE: one per line, blank lines skipped."""
    tokens: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token:
            continue
        if any(char.isspace() for char in token):
            raise ValueError(f"line {number}: a token has no spaces (one token per line)")
        if len(token.encode("utf-8")) < MIN_SERVICE_TOKEN_BYTES:
            raise ValueError(f"line {number}: a token must be at least {MIN_SERVICE_TOKEN_BYTES} bytes")
        if token not in tokens:
            tokens.append(token)
    return tuple(tokens)


def read_jwt_secrets(path: str, bare_kid: str) -> tuple[dict[str, str], str]:
    text = read_secret_file(path)
    try:
        return parse_jwt_secrets(text, bare_kid)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_service_tokens(path: str) -> tuple[str, ...]:
    text = read_secret_file(path)
    try:
        return parse_service_tokens(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_jwt_secrets(settings) -> tuple[dict[str, str], str]:
    """The HS256 secrets now in force and the signing kid: JWT_SECRET_FILE, JWT_SECRET, or the generated one."""
    if settings.jwt_secret_file:
        return read_jwt_secrets(settings.jwt_secret_file, settings.jwt_secret_kid)
    return {settings.jwt_secret_kid: jwt_secret_or_generate(settings.jwt_secret, settings.data_dir)}, \
        settings.jwt_secret_kid


def load_service_tokens(settings) -> tuple[str, ...]:
    """The internal service tokens now in force (none: the internal principal is disabled)."""
    if settings.internal_service_token_file:
        return read_service_tokens(settings.internal_service_token_file)
    return (settings.internal_service_token,) if settings.internal_service_token else ()


def file_secret_values(settings) -> list[str]:
    """The secrets held by the JWT and internal token files now, for the log masks; [] for a bad file."""
    values: list[str] = []
    if getattr(settings, "jwt_secret_file", None):
        try:
            values.extend(read_jwt_secrets(settings.jwt_secret_file, settings.jwt_secret_kid)[0].values())
        except ValueError:
            pass
    if getattr(settings, "internal_service_token_file", None):
        try:
            values.extend(read_service_tokens(settings.internal_service_token_file))
        except ValueError:
            pass
    return values
