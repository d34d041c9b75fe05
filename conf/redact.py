"""Secrets inside URLs, libpq connection strings and free text, masked for `sira config` and the logs.

A setting such as DATABASE_URL or S3_ENDPOINT_URL may carry a credential in several places, and a
library error may echo a whole connection string into a log line. Only the secret part is replaced
by MASK: host, port, database, user name and the other parameters stay readable.

Masked forms:

- a URL's userinfo password, as written (percent-encoded or not): `scheme://user:****@host`, also
  with an empty user (`scheme://:****@host`). A userinfo without ':' is the role name in a
  postgres:// URL and is shown; in any other scheme it is a token by convention
  (`https://TOKEN@host`) and is masked. As libpq reads it, the userinfo runs to the '@' before
  the first '/', so a password holding '?', '#' or an unencoded '@' is masked whole;
- query and fragment parameters named in SECRET_KEYS (`?password=`, `&X-Amz-Signature=`...);
- in a libpq keyword/value string (`host=db password='a b\\'c' dbname=x`), the values of the
  SECRET_KEYS keywords, quoted or not; `key = value` with spaces too.

Keys are compared case-insensitively, '-' and '_' alike. Parameters that name files (passfile,
sslkey, sslcert, sslrootcert) hold paths, not secrets, and are shown.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

import psycopg
from psycopg import conninfo

MASK = "****"

# Parameter names whose values are secrets, lower case with '_' for '-'.
SECRET_KEYS = frozenset({
    # libpq
    "password", "sslpassword",
    # passwords, tokens and keys as HTTP and S3 endpoints name them
    "passwd", "pwd", "pass", "secret", "client_secret", "token", "access_token", "refresh_token",
    "id_token", "auth_token", "session_token", "api_key", "apikey", "access_key", "secret_key",
    "secret_access_key", "private_key",
    # signed URLs: AWS SigV4 and SigV2, Google Cloud Storage, Azure SAS
    "x_amz_signature", "x_amz_security_token", "signature", "x_goog_signature", "sig",
})
# Schemes whose username-only userinfo is a database role, not a token.
ROLE_SCHEMES = frozenset({"postgresql", "postgres"})

# A URL in free text ends at whitespace, a quote or an angle bracket (the delimiters of log
# messages, reprs and JSON strings), and not on the punctuation of the sentence around it.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]*[^\s\"'<>.,;:!?)\]}]")
_TRAILING = ".,;:!?)]}"
_KEY_NAMES = "|".join(re.escape(key).replace("_", "[-_]") for key in sorted(SECRET_KEYS, key=len, reverse=True))
# key=value with a secret key in free text: a libpq quoted value ('...' with backslash escapes, up
# to the end of the text when unclosed) or an unquoted one up to whitespace, '&' or a quote.
_PAIR = re.compile(r"(?i)(?<![\w.-])(" + _KEY_NAMES + r")(\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&'\"]+)")
_ESCAPED = re.compile(r"\\(.)")


def is_secret_key(name: str) -> bool:
    """Whether a parameter name (percent-encoded or not) is one of SECRET_KEYS."""
    return unquote(name).strip().lower().replace("-", "_") in SECRET_KEYS


def _hide(value: str, found: list[str] | None, *forms: str) -> str:
    """MASK in place of `value`; `found` collects the value and its decoded forms for the log filter."""
    if found is not None:
        found.extend(form for form in (value, *forms) if form)
    return MASK


def redact(value: str, found: list[str] | None = None) -> str:
    """A setting's value with its secrets masked: a URL, a libpq keyword/value string or any text."""
    text = value.strip()
    if _URL.fullmatch(text):
        return redact_url(text, found)
    if "=" in text and "://" not in text and "\x00" not in text:  # libpq would stop reading at a NUL
        try:
            return redact_dsn(text, found)
        except psycopg.Error:  # not a connection string: masked as free text below
            pass
    return redact_text(value, found)


def redact_text(text: str, found: list[str] | None = None) -> str:
    """Free text (a log message, an error) with the secrets of every URL and key=value pair in it masked."""
    if "://" in text:
        text = _URL.sub(lambda match: redact_url(match.group(), found), text)
    if "=" in text:
        text = _PAIR.sub(lambda match: _mask_pair(match, found), text)
    return text


def _mask_pair(match: re.Match, found: list[str] | None) -> str:
    key, equals, value = match.groups()
    if value.rstrip(_TRAILING) == MASK:  # masked already (within a URL, before a comma)
        return match.group()
    if value.startswith("'"):
        inner = value[1:-1] if len(value) > 1 and value.endswith("'") else value[1:]
        return key + equals + _hide(inner, found, _ESCAPED.sub(r"\1", inner))
    return key + equals + _hide(value, found, unquote_plus(value))


def redact_url(url: str, found: list[str] | None = None) -> str:
    """A URL with its userinfo password (or token) and its secret query and fragment parameters masked.

    Split by hand, as libpq splits a URL: urllib.parse ends the userinfo at '?' or '#' where libpq
    does not, and rebuilding a query with urlencode would re-encode the parameters that are shown.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return redact_text(url, found)
    authority = rest.partition("/")[0]
    userinfo, at, _ = authority.rpartition("@")
    if at:
        rest = _mask_userinfo(scheme, userinfo, found) + rest[len(userinfo):]
    before_fragment, hash_sign, fragment = rest.partition("#")
    address, question_mark, query = before_fragment.partition("?")
    if question_mark:
        address += question_mark + mask_query(query, found)
    if hash_sign:
        address += hash_sign + mask_query(fragment, found)
    return scheme + sep + address


def _mask_userinfo(scheme: str, userinfo: str, found: list[str] | None) -> str:
    user, colon, password = userinfo.partition(":")
    if colon:
        return user + colon + (_hide(password, found, unquote(password)) if password else "")
    if scheme.lower() in ROLE_SCHEMES or not user:
        return user
    return _hide(user, found, unquote(user))


def mask_query(query: str, found: list[str] | None = None) -> str:
    """`a=1&password=x` -> `a=1&password=****`: each parameter kept as written unless its name is secret."""
    pairs = []
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        if equals and value and value != MASK and is_secret_key(name):
            pair = name + equals + _hide(value, found, unquote_plus(value))
        pairs.append(pair)
    return "&".join(pairs)


def redact_dsn(dsn: str, found: list[str] | None = None) -> str:
    """A libpq keyword/value string (`host=db password=x`) rebuilt by psycopg with its secret values masked.

    Raises psycopg.Error when `dsn` is not one (an unknown keyword, a missing '=').
    """
    params = conninfo.conninfo_to_dict(dsn)
    for key, value in params.items():
        if is_secret_key(key) and value:
            params[key] = _hide(str(value), found)
    if found is not None:
        found.extend(_raw_secret_values(dsn))
    return conninfo.make_conninfo(**_as_written(params, dsn))


def _as_written(params: dict, dsn: str) -> dict:
    """The parameters in the order `dsn` gives them (libpq returns its own order): easier to compare."""
    def position(key: str) -> int:
        match = re.search(r"(?<!\S)" + re.escape(key) + r"\s*=", dsn)
        return match.start() if match else len(dsn)

    return {key: params[key] for key in sorted(params, key=position)}


def _raw_secret_values(text: str) -> list[str]:
    """The secret values of key=value pairs as written in `text` (quoted, escaped), for the log filter."""
    written: list[str] = []
    _PAIR.sub(lambda match: _mask_pair(match, written), text)
    return written


def secrets_in(value: str) -> list[str]:
    """The secret strings held in a URL, connection string or text, as written and decoded.

    For the log filter (conf/logs.py), which masks these values wherever a line shows them, also
    outside any URL (an error message quoting only the password).
    """
    found: list[str] = []
    redact(value, found)
    return list(dict.fromkeys(found))
