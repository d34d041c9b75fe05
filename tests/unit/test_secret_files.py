"""Secrets from files (conf/secret_files.py), their start checks (conf/settings.py) and their reload
(workers/credentials.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.auth.keys import KeyRing, mint_token
from app.auth.tokens import Authenticator
from app.errors import Unauthorized
from conf.logs import MASK, configure_logging, mask_secrets, secret_values
from conf.secret_files import parse_jwt_secrets, parse_service_tokens, read_secret_file
from conf.settings import ConfigError, effective_values, load_settings
from workers.credentials import build_authenticator, reload_credentials

OLD = "old-secret-" + "o" * 32
NEW = "new-secret-" + "n" * 32
TOKEN_A = "internal-token-aaaaaaaaaaaa"
TOKEN_B = "internal-token-bbbbbbbbbbbb"


def secret_file(tmp_path, text: str, name: str = "secret", mode: int = 0o400) -> str:
    path = tmp_path / name
    if path.exists():
        path.chmod(0o600)
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def bearer_for(kid: str, secret: str) -> str:
    return "Bearer " + mint_token(role="fraud_analyst", subject="x", ttl_s=60, secret=secret, kid=kid)


# read_secret_file ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o400, 0o440, 0o600, 0o640])
def test_a_private_file_is_read_without_its_trailing_newline(tmp_path, mode):
    assert read_secret_file(secret_file(tmp_path, OLD + "\n", mode=mode)) == OLD
    assert read_secret_file(secret_file(tmp_path, OLD, mode=mode)) == OLD  # Kubernetes: no newline
    assert read_secret_file(secret_file(tmp_path, OLD + "\r\n", mode=mode)) == OLD


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o620, 0o666])
def test_a_file_others_may_read_or_write_is_refused(tmp_path, mode):
    path = secret_file(tmp_path, OLD, mode=mode)
    with pytest.raises(ValueError, match=f"{path} has mode {mode:04o}") as raised:
        read_secret_file(path)
    assert OLD not in str(raised.value)


@pytest.mark.parametrize("text", ["", "\n", "  \n", "\r\n"])
def test_an_empty_file_is_refused(tmp_path, text):
    with pytest.raises(ValueError, match="is empty"):
        read_secret_file(secret_file(tmp_path, text))


def test_a_missing_file_a_directory_and_a_fifo_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_secret_file(str(tmp_path / "absent"))
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    with pytest.raises(ValueError, match="is a directory"):
        read_secret_file(str(folder))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ValueError, match="not a regular file"):  # and it does not hang waiting for a writer
        read_secret_file(str(fifo))


def test_an_unreadable_file_is_refused(tmp_path):
    path = secret_file(tmp_path, OLD, mode=0o000)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: every file is readable")
    with pytest.raises(ValueError, match="cannot be opened"):
        read_secret_file(path)


def test_a_symlinked_file_is_read_as_kubernetes_mounts_it(tmp_path):
    data = tmp_path / "..2026_01"
    data.mkdir()
    secret_file(data, OLD, name="jwt")
    os.symlink(data.name, tmp_path / "..data")
    os.symlink("..data/jwt", tmp_path / "jwt")
    assert read_secret_file(str(tmp_path / "jwt")) == OLD


def test_a_huge_or_binary_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="larger than"):
        read_secret_file(secret_file(tmp_path, "x" * (64 * 1024 + 1)))
    path = tmp_path / "binary"
    path.write_bytes(b"\xff\xfe" * 20)
    path.chmod(0o400)
    with pytest.raises(ValueError, match="not UTF-8"):
        read_secret_file(str(path))


# JWT_SECRET_FILE's formats ---------------------------------------------------------------------


def test_a_bare_secret_takes_the_configured_kid():
    assert parse_jwt_secrets(OLD, "default") == ({"default": OLD}, "default")


def test_a_json_object_gives_several_kids_and_the_first_one_signs():
    keys, signing = parse_jwt_secrets(json.dumps({"k2": NEW, "k1": OLD}), "default")
    assert keys == {"k2": NEW, "k1": OLD} and signing == "k2"


@pytest.mark.parametrize("text, reason", [
    ("short", "at least 32 bytes"),
    (OLD + "\n" + NEW, "several lines"),
    ("{}", "empty JSON object"),
    ('{"k1": "' + OLD + '", "k1": "' + NEW + '"}', "entry 2 repeats the kid"),
    ('{"bad kid": "' + OLD + '"}', "entry 1: a kid is"),
    ('{"k1": 12}', "entry 1: the secret must be a JSON string"),
    ('{"k1": "' + OLD + '", "k2": "short"}', "entry 2: an HS256 secret must be at least 32 bytes"),
    ('{"k1": "' + OLD + '",}', "not valid JSON"),
    ('{"k1": "' + OLD + '"} trailing', "not valid JSON"),
])
def test_a_bad_jwt_secret_file_is_refused_without_echoing_it(text, reason):
    with pytest.raises(ValueError, match=reason) as raised:
        parse_jwt_secrets(text, "default")
    assert OLD not in str(raised.value) and NEW not in str(raised.value)


def test_a_json_file_with_kid_and_secret_swapped_does_not_print_the_secret():
    with pytest.raises(ValueError) as raised:
        parse_jwt_secrets(json.dumps({OLD + " x": "k1"}), "default")
    assert OLD not in str(raised.value)


def test_service_tokens_are_one_per_line():
    assert parse_service_tokens(f"{TOKEN_A}\n\n  {TOKEN_B}  \n{TOKEN_A}") == (TOKEN_A, TOKEN_B)
    with pytest.raises(ValueError, match="line 2: a token must be at least 16 bytes"):
        parse_service_tokens(f"{TOKEN_A}\nshort")
    with pytest.raises(ValueError, match="line 1: a token has no spaces"):
        parse_service_tokens(f"{TOKEN_A} {TOKEN_B}")


# the start checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("plain, value", [("JWT_SECRET", OLD), ("INTERNAL_SERVICE_TOKEN", TOKEN_A),
                                          ("DATABASE_URL", "postgresql://u:p@db/sira")])
def test_a_variable_and_its_file_together_are_refused(tmp_path, plain, value):
    env = {plain: value, f"{plain}_FILE": secret_file(tmp_path, value)}
    with pytest.raises(ConfigError, match=f"^{plain}_FILE: expected either {plain} or {plain}_FILE, not both$"):
        load_settings(env)


@pytest.mark.parametrize("variable", ["JWT_SECRET_FILE", "INTERNAL_SERVICE_TOKEN_FILE", "DATABASE_URL_FILE"])
@pytest.mark.parametrize("case", ["missing", "empty", "world-readable", "directory"])
def test_a_bad_secret_file_is_one_line_naming_variable_and_path(tmp_path, variable, case):
    path = {"missing": lambda: str(tmp_path / "absent"),
            "empty": lambda: secret_file(tmp_path, "\n"),
            "world-readable": lambda: secret_file(tmp_path, OLD, mode=0o644),
            "directory": lambda: str(tmp_path)}[case]()
    with pytest.raises(ConfigError) as raised:
        load_settings({variable: path})
    message = str(raised.value)
    assert message.startswith(f"{variable}: {path}") and "\n" not in message and OLD not in message


def test_the_file_contents_are_checked_at_start(tmp_path):
    with pytest.raises(ConfigError, match="JWT_SECRET_FILE: .*entry 2 repeats the kid"):
        load_settings({"JWT_SECRET_FILE": secret_file(tmp_path, f'{{"a": "{OLD}", "a": "{NEW}"}}')})
    with pytest.raises(ConfigError, match="INTERNAL_SERVICE_TOKEN_FILE: .*line 1"):
        load_settings({"INTERNAL_SERVICE_TOKEN_FILE": secret_file(tmp_path, "short")})
    with pytest.raises(ConfigError, match="DATABASE_URL_FILE: .*expected a URL") as raised:
        load_settings({"DATABASE_URL_FILE": secret_file(tmp_path, "mysql://u:pw-1234567@db/x")})
    assert "pw-1234567" not in str(raised.value)


def test_a_kid_in_both_the_secret_file_and_the_public_keys_is_refused(tmp_path):
    pem = tmp_path / "k1.pem"
    pem.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    path = secret_file(tmp_path, json.dumps({"k1": OLD}))
    with pytest.raises(ConfigError, match="kid 'k1' is also in JWT_PUBLIC_KEYS"):
        load_settings({"JWT_SECRET_FILE": path, "JWT_PUBLIC_KEYS": f"k1={pem}"})


def test_database_url_comes_from_its_file_and_config_shows_where(tmp_path, monkeypatch):
    path = secret_file(tmp_path, "postgresql://sira:pw-0123456789@db:5432/sira\n")
    monkeypatch.setenv("DATABASE_URL_FILE", path)
    settings = load_settings({"DATABASE_URL_FILE": path})
    assert settings.database_url == "postgresql://sira:pw-0123456789@db:5432/sira"
    rows = {name: (shown, source) for name, shown, source in effective_values(settings)}
    assert rows["DATABASE_URL"] == ("postgresql://sira:****@db:5432/sira", "DATABASE_URL_FILE")
    assert rows["DATABASE_URL_FILE"][0] == path
    assert "pw-0123456789" in secret_values(settings)


def test_config_shows_the_paths_and_the_logs_mask_the_contents(tmp_path):
    jwt_path = secret_file(tmp_path, json.dumps({"k1": OLD}), name="jwt")
    token_path = secret_file(tmp_path, TOKEN_A, name="token")
    settings = load_settings({"JWT_SECRET_FILE": jwt_path, "INTERNAL_SERVICE_TOKEN_FILE": token_path})
    shown = "\n".join(f"{name} {value}" for name, value, _ in effective_values(settings))
    assert jwt_path in shown and token_path in shown and OLD not in shown and TOKEN_A not in shown
    assert OLD in secret_values(settings) and TOKEN_A in secret_values(settings)


# reload ----------------------------------------------------------------------------------------


@pytest.fixture
def log_lines():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    configure_logging("info", [], stream=buffer)
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_a_rotation_by_kid_keeps_old_tokens_until_their_key_is_removed(tmp_path, log_lines):
    path = secret_file(tmp_path, json.dumps({"k1": OLD}), name="jwt")
    tokens = secret_file(tmp_path, TOKEN_A, name="tokens")
    settings = load_settings({"JWT_SECRET_FILE": path, "INTERNAL_SERVICE_TOKEN_FILE": tokens,
                              "SIRA_DATA_DIR": str(tmp_path / "data")})
    auth = build_authenticator(settings)
    old_token = bearer_for("k1", OLD)
    auth.authenticate(old_token)  # now cached
    with pytest.raises(Unauthorized):
        auth.authenticate(bearer_for("k2", NEW))

    secret_file(tmp_path, json.dumps({"k1": OLD, "k2": NEW}), name="jwt")
    secret_file(tmp_path, f"{TOKEN_A}\n{TOKEN_B}\n", name="tokens")
    assert reload_credentials(settings, auth)
    for header in (old_token, bearer_for("k2", NEW), f"Bearer {TOKEN_A}", f"Bearer {TOKEN_B}"):
        auth.authenticate(header)

    secret_file(tmp_path, json.dumps({"k2": NEW}), name="jwt")
    secret_file(tmp_path, TOKEN_B, name="tokens")
    assert reload_credentials(settings, auth)
    auth.authenticate(bearer_for("k2", NEW))
    auth.authenticate(f"Bearer {TOKEN_B}")
    for header in (old_token, f"Bearer {TOKEN_A}"):  # the cached verification of old_token went too
        with pytest.raises(Unauthorized):
            auth.authenticate(header)
    # the new secrets are masked in every line logged after the reload
    logging.getLogger("sira.test").warning("leaked %s %s", NEW, TOKEN_B)
    assert log_lines()[-1]["message"] == f"leaked {MASK} {MASK}"


@pytest.mark.parametrize("bad", ["", "\n", "short-secret", "{not json"])
def test_a_rotation_to_a_bad_file_keeps_every_key_and_logs_one_error(tmp_path, log_lines, bad):
    path = secret_file(tmp_path, json.dumps({"k1": OLD}), name="jwt")
    settings = load_settings({"JWT_SECRET_FILE": path, "INTERNAL_SERVICE_TOKEN": TOKEN_A,
                              "SIRA_DATA_DIR": str(tmp_path / "data")})
    auth = build_authenticator(settings)
    secret_file(tmp_path, bad, name="jwt")
    assert not reload_credentials(settings, auth)
    auth.authenticate(bearer_for("k1", OLD))
    auth.authenticate(f"Bearer {TOKEN_A}")
    errors = [line for line in log_lines() if line["level"] == "error"]
    assert len(errors) == 1 and path in errors[0]["message"], errors


def test_a_world_readable_file_at_reload_keeps_the_keys(tmp_path, log_lines):
    path = secret_file(tmp_path, json.dumps({"k1": OLD}), name="jwt")
    settings = load_settings({"JWT_SECRET_FILE": path, "SIRA_DATA_DIR": str(tmp_path / "data")})
    auth = build_authenticator(settings)
    secret_file(tmp_path, json.dumps({"k2": NEW}), name="jwt", mode=0o644)
    assert not reload_credentials(settings, auth)
    auth.authenticate(bearer_for("k1", OLD))
    assert NEW not in json.dumps(log_lines())


def test_a_public_key_file_that_is_gone_at_reload_drops_its_kid(tmp_path, log_lines):
    private = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "ec-1.pem"
    pem.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    settings = load_settings({"JWT_SECRET": OLD, "JWT_PUBLIC_KEYS": f"ec-1={pem}",
                              "SIRA_DATA_DIR": str(tmp_path / "data")})
    auth = build_authenticator(settings)
    claims = {"sub": "x", "role": "ml_ops", "exp": int(time.time()) + 60}
    header = "Bearer " + jwt.encode(claims, private, algorithm="ES256", headers={"kid": "ec-1"})
    auth.authenticate(header)
    pem.unlink()
    assert reload_credentials(settings, auth)
    with pytest.raises(Unauthorized, match="kid names no known key"):
        auth.authenticate(header)
    assert auth.kids == ["default"]
    assert any(line["level"] == "warning" and "ec-1" in line["message"] for line in log_lines())


def test_several_internal_tokens_are_each_accepted():
    auth = Authenticator(KeyRing.from_config(OLD, "default", {}), [TOKEN_A, TOKEN_B])
    assert auth.authenticate(f"Bearer {TOKEN_A}").internal and auth.authenticate(f"Bearer {TOKEN_B}").internal
    with pytest.raises(Unauthorized):
        auth.authenticate(f"Bearer {TOKEN_A}x")


def test_mask_secrets_extends_the_masks_of_the_root_handler(log_lines):
    mask_secrets(["a-value-read-later-123"])
    logging.getLogger("sira.test").warning("x a-value-read-later-123 y")
    assert log_lines()[-1]["message"] == f"x {MASK} y"
