"""The credentials a serving process checks tokens with: built at start, re-read from their files on SIGHUP.

The master builds the Authenticator before forking (workers inherit it). On SIGHUP (`sira reload`)
the master re-reads JWT_SECRET_FILE, INTERNAL_SERVICE_TOKEN_FILE and the JWT_PUBLIC_KEYS files
first; only when they are all usable does it send SIGHUP on to its workers, which re-read them in
their event loop (workers/http_worker.py) and swap their keys in place. So a file caught half
written, emptied or made unreadable during a rotation takes no key away: the master logs one error
and every process keeps the keys it had. A worker forked later inherits the master's current keys.

A JWT_PUBLIC_KEYS file that is gone at a reload drops its kid (that is how a key is removed from a
mounted folder); one that is there but unusable stops the reload like any other bad file. The set
of kids JWT_PUBLIC_KEYS names is fixed for the life of the process (it is an environment variable).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from app.auth.keys import KeyRing
from app.auth.tokens import Authenticator
from conf.logs import mask_secrets
from conf.secret_files import load_jwt_secrets, load_service_tokens

log = logging.getLogger("sira.credentials")


@dataclasses.dataclass(frozen=True)
class Credentials:
    keyring: KeyRing
    internal_tokens: tuple[str, ...]
    secrets: tuple[str, ...]  # for the log masks
    dropped_kids: tuple[str, ...] = ()


def load_credentials(settings, public_keys_may_be_gone: bool = False) -> Credentials:
    """The keys and tokens the settings' files hold now; ValueError names the file that is not usable."""
    hmac_secrets, signing_kid = load_jwt_secrets(settings)
    public_key_files = dict(settings.jwt_public_keys)
    dropped = ()
    if public_keys_may_be_gone:
        dropped = tuple(kid for kid, path in public_key_files.items() if not os.path.lexists(path))
        for kid in dropped:
            del public_key_files[kid]
    keyring = KeyRing.from_secrets(hmac_secrets, signing_kid, public_key_files)
    tokens = load_service_tokens(settings)
    return Credentials(keyring, tokens, tuple(hmac_secrets.values()) + tokens, dropped)


def build_authenticator(settings) -> Authenticator:
    """The master's Authenticator, before the fork (the files were checked by conf.settings)."""
    credentials = load_credentials(settings)
    mask_secrets(credentials.secrets)
    return Authenticator(credentials.keyring, credentials.internal_tokens,
                         issuer=settings.jwt_issuer, audience=settings.jwt_audience)


def reload_credentials(settings, authenticator: Authenticator) -> bool:
    """Re-read the secret files into `authenticator`; on any bad file log one error and change nothing."""
    try:
        credentials = load_credentials(settings, public_keys_may_be_gone=True)
    except (ValueError, OSError) as exc:
        log.error("secret files not reloaded, the current keys stay in force: %s", exc)
        return False
    mask_secrets(credentials.secrets)  # before anything could log them
    authenticator.replace_credentials(credentials.keyring, credentials.internal_tokens)
    for kid in credentials.dropped_kids:
        log.warning("JWT_PUBLIC_KEYS: the file of kid %r is gone: its tokens are refused", kid)
    log.info("secret files reloaded: JWT kids %s, %d internal token(s)", ", ".join(authenticator.kids) or "none",
             len(credentials.internal_tokens), extra={"jwt_kids": authenticator.kids})
    return True
