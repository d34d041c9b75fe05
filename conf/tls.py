"""TLS and mutual TLS of the HTTP listeners: the settings' parsers, their start-up check, gunicorn's options.

gunicorn builds the server's SSL context in every worker (`gunicorn.sock.ssl_context`, the same
calls as `server_context` here) and wraps every listener with it, METRICS_BIND's included. A worker
whose context fails to build would serve cleartext (gunicorn's asgi worker logs the error and goes
on without TLS), so everything that could fail there is checked once here, before anything starts,
and the worker itself refuses to serve without its context (workers/http_worker.py).

SIRA_TLS_CLIENT_AUTH: `none` asks for no client certificate, `optional` checks one when the client
sends it, `required` refuses the handshake of a client without a certificate signed by SIRA_TLS_CA.
"""

from __future__ import annotations

import ssl
from typing import Any

CLIENT_AUTH_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def parse_client_auth(value: str) -> str:
    mode = value.strip().lower()
    if mode not in CLIENT_AUTH_MODES:
        raise ValueError(f"one of none, optional, required, got {value!r}")
    return mode


def parse_pem_file(value: str) -> str:
    """A path to a file this process can read; its contents are checked by `check_tls`."""
    try:
        with open(value, "rb") as handle:
            handle.read(1)
    except IsADirectoryError:
        raise ValueError(f"a readable PEM file, but {value!r} is a directory") from None
    except OSError as exc:
        raise ValueError(f"a readable PEM file, but {value!r} cannot be read ({exc.strerror})") from None
    return value


def server_context(cert: str, key: str, ca: str | None, client_auth: str) -> ssl.SSLContext:
    """The context gunicorn's default factory builds from the same settings (gunicorn/sock.py)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.load_cert_chain(certfile=cert, keyfile=key)
    context.verify_mode = CLIENT_AUTH_MODES[client_auth]
    return context


def check_tls(cert: str | None, key: str | None, ca: str | None, client_auth: str) -> None:
    """Raises ValueError, one line naming the variable, for any TLS setting the workers could not use."""
    if (cert is None) != (key is None):
        missing = "SIRA_TLS_KEY" if key is None else "SIRA_TLS_CERT"
        raise ValueError(f"{missing}: expected a PEM file too: SIRA_TLS_CERT and SIRA_TLS_KEY go together")
    if ca is not None and client_auth == "none":
        raise ValueError("SIRA_TLS_CLIENT_AUTH: expected optional or required, since SIRA_TLS_CA is set "
                         "(the CA only checks client certificates)")
    if client_auth != "none" and ca is None:
        raise ValueError(f"SIRA_TLS_CA: expected the CA file that signs client certificates, since "
                         f"SIRA_TLS_CLIENT_AUTH is {client_auth}")
    if cert is None:
        if ca is not None or client_auth != "none":
            raise ValueError("SIRA_TLS_CERT: expected a server certificate, since client certificates are asked for")
        return
    _check_cert_and_key(cert, key)
    if ca is not None:
        _check_ca(ca)


def _check_cert_and_key(cert: str, key: str) -> None:
    """The certificate parses, the key parses, and the key is the certificate's; then OpenSSL agrees."""
    certificate = _pem_certificates("SIRA_TLS_CERT", cert)[0]
    private_key = _pem_private_key(key)
    if _public_bytes(certificate.public_key()) != _public_bytes(private_key.public_key()):
        raise ValueError(f"SIRA_TLS_KEY: expected the private key of SIRA_TLS_CERT, but {key!r} "
                         f"does not match {cert!r}")
    try:
        server_context(cert, key, None, "none")
    except ssl.SSLError as exc:
        raise ValueError(f"SIRA_TLS_CERT: expected a certificate and key OpenSSL accepts, but it refuses "
                         f"them ({exc.reason or exc.strerror or 'no reason given'})") from None


def _check_ca(ca: str) -> None:
    _pem_certificates("SIRA_TLS_CA", ca)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    except ssl.SSLError as exc:
        raise ValueError(f"SIRA_TLS_CA: expected CA certificates OpenSSL accepts, but it refuses {ca!r} "
                         f"({exc.reason or 'no reason given'})") from None


def _pem_certificates(variable: str, path: str) -> list:
    from cryptography import x509

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{variable}: expected PEM certificates (BEGIN CERTIFICATE), "
                         f"but {path!r} holds none") from None


def _pem_private_key(path: str):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"SIRA_TLS_KEY: expected an unencrypted PEM private key, but {path!r} "
                         f"is encrypted") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"SIRA_TLS_KEY: expected a PEM private key, but {path!r} holds none "
                         f"({type(exc).__name__})") from None


def _public_bytes(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def gunicorn_tls_options(cert: str | None, key: str | None, ca: str | None, client_auth: str) -> dict[str, Any]:
    """gunicorn's ssl settings; empty when TLS is off."""
    if cert is None:
        return {}
    return {"certfile": cert, "keyfile": key, "ca_certs": ca, "cert_reqs": CLIENT_AUTH_MODES[client_auth]}
