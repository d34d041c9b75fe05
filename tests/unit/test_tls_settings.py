"""TLS, mutual TLS and the request timeouts: every wrong value is one line naming the variable, before anything runs."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from conf.settings import ConfigError, load_settings
from conf.tls import gunicorn_tls_options, server_context


def refusal(env: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_tls_is_off_by_default():
    settings = load_settings({})
    tls = (settings.tls_cert, settings.tls_key, settings.tls_ca, settings.tls_client_auth)
    assert tls == (None, None, None, "none")
    assert gunicorn_tls_options(settings.tls_cert, settings.tls_key, settings.tls_ca, settings.tls_client_auth) == {}
    assert settings.header_timeout_s == 10.0 and settings.body_timeout_s == 10.0


def test_tls_and_mutual_tls_settings_become_gunicorns_options(tls_files):
    settings = load_settings({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": tls_files.server_key,
                              "SIRA_TLS_CA": tls_files.ca, "SIRA_TLS_CLIENT_AUTH": "Required"})
    options = gunicorn_tls_options(settings.tls_cert, settings.tls_key, settings.tls_ca, settings.tls_client_auth)
    assert options == {"certfile": tls_files.server_cert, "keyfile": tls_files.server_key,
                       "ca_certs": tls_files.ca, "cert_reqs": ssl.CERT_REQUIRED}
    plain = load_settings({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": tls_files.server_key})
    assert gunicorn_tls_options(plain.tls_cert, plain.tls_key, plain.tls_ca, plain.tls_client_auth)["cert_reqs"] \
        == ssl.CERT_NONE
    optional = load_settings({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": tls_files.server_key,
                              "SIRA_TLS_CA": tls_files.ca, "SIRA_TLS_CLIENT_AUTH": "optional"})
    assert server_context(optional.tls_cert, optional.tls_key, optional.tls_ca,
                          optional.tls_client_auth).verify_mode == ssl.CERT_OPTIONAL


def test_missing_file_is_refused(tls_files):
    message = refusal({"SIRA_TLS_CERT": "/no/such/cert.pem", "SIRA_TLS_KEY": tls_files.server_key})
    assert message.startswith("SIRA_TLS_CERT: expected a readable PEM file") and "/no/such/cert.pem" in message


def test_directory_instead_of_a_file_is_refused(tls_files, tmp_path):
    message = refusal({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": str(tmp_path)})
    assert message.startswith("SIRA_TLS_KEY: expected a readable PEM file") and "directory" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_is_refused(tls_files, tmp_path):
    locked = tmp_path / "locked.key"
    locked.write_bytes(Path(tls_files.server_key).read_bytes())
    locked.chmod(0)
    message = refusal({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": str(locked)})
    assert message.startswith("SIRA_TLS_KEY: expected a readable PEM file")


def test_key_that_does_not_match_the_certificate_is_refused(tls_files):
    message = refusal({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": tls_files.stray_key})
    assert message.startswith("SIRA_TLS_KEY: expected the private key of SIRA_TLS_CERT")


def test_files_that_are_not_pem_are_refused(tls_files, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert refusal({"SIRA_TLS_CERT": str(junk), "SIRA_TLS_KEY": tls_files.server_key}).startswith(
        "SIRA_TLS_CERT: expected PEM certificates")
    assert refusal({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": str(junk)}).startswith(
        "SIRA_TLS_KEY: expected a PEM private key")
    assert refusal({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": tls_files.server_cert}).startswith(
        "SIRA_TLS_KEY: expected a PEM private key")
    assert refusal({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": tls_files.server_key,
                    "SIRA_TLS_CA": str(junk), "SIRA_TLS_CLIENT_AUTH": "required"}).startswith(
        "SIRA_TLS_CA: expected PEM certificates")


def test_encrypted_key_is_refused(tls_files, tmp_path):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(tls_files.server_key).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pass-phrase")))
    message = refusal({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": str(encrypted)})
    assert message.startswith("SIRA_TLS_KEY: expected an unencrypted PEM private key")


@pytest.mark.parametrize("only", ["SIRA_TLS_CERT", "SIRA_TLS_KEY"])
def test_certificate_and_key_go_together(tls_files, only):
    value = tls_files.server_cert if only == "SIRA_TLS_CERT" else tls_files.server_key
    message = refusal({only: value})
    assert "SIRA_TLS_CERT and SIRA_TLS_KEY go together" in message


def test_ca_without_client_auth_is_refused(tls_files):
    message = refusal({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": tls_files.server_key,
                       "SIRA_TLS_CA": tls_files.ca})
    assert message.startswith("SIRA_TLS_CLIENT_AUTH: expected optional or required")


@pytest.mark.parametrize("mode", ["optional", "required"])
def test_client_auth_without_ca_is_refused(tls_files, mode):
    message = refusal({"SIRA_TLS_CERT": tls_files.server_cert, "SIRA_TLS_KEY": tls_files.server_key,
                       "SIRA_TLS_CLIENT_AUTH": mode})
    assert message.startswith("SIRA_TLS_CA: expected the CA file that signs client certificates")


def test_client_auth_without_a_server_certificate_is_refused(tls_files):
    message = refusal({"SIRA_TLS_CA": tls_files.ca, "SIRA_TLS_CLIENT_AUTH": "required"})
    assert message.startswith("SIRA_TLS_CERT: expected a server certificate")


@pytest.mark.parametrize("env, variable", [
    ({"SIRA_TLS_CLIENT_AUTH": "yes"}, "SIRA_TLS_CLIENT_AUTH"),
    ({"SIRA_TLS_CLIENT_AUTH": ""}, "SIRA_TLS_CLIENT_AUTH"),
    ({"SIRA_HEADER_TIMEOUT_S": "0"}, "SIRA_HEADER_TIMEOUT_S"),
    ({"SIRA_HEADER_TIMEOUT_S": "-1"}, "SIRA_HEADER_TIMEOUT_S"),
    ({"SIRA_HEADER_TIMEOUT_S": "soon"}, "SIRA_HEADER_TIMEOUT_S"),
    ({"SIRA_HEADER_TIMEOUT_S": "inf"}, "SIRA_HEADER_TIMEOUT_S"),
    ({"SIRA_BODY_TIMEOUT_S": "nan"}, "SIRA_BODY_TIMEOUT_S"),
    ({"SIRA_BODY_TIMEOUT_S": "3601"}, "SIRA_BODY_TIMEOUT_S"),
    ({"SIRA_BODY_TIMEOUT_S": ""}, "SIRA_BODY_TIMEOUT_S"),
])
def test_bad_timeout_and_client_auth_values_are_refused(env, variable):
    assert refusal(env).startswith(variable + ": expected ")


def test_timeouts_accept_fractions():
    settings = load_settings({"SIRA_HEADER_TIMEOUT_S": "0.5", "SIRA_BODY_TIMEOUT_S": " 2.5 "})
    assert (settings.header_timeout_s, settings.body_timeout_s) == (0.5, 2.5)
