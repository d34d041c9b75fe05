"""The `sira` command: help, exit codes, one-line errors, masked config, tokens, reload."""

from __future__ import annotations

import subprocess
import sys

import jwt
import pytest

from tests.fixtures.server import run_sira, sira_env

SUBCOMMANDS = ["serve", "migrate", "token", "reload", "config"]


@pytest.mark.parametrize("args", [["--help"], *[[name, "--help"] for name in SUBCOMMANDS]])
def test_help_on_every_subcommand_exits_0(args):
    result = run_sira(*args, env=sira_env())
    assert result.returncode == 0, result.stderr
    assert "usage: sira" in result.stdout


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["serve", "--workers", "zero"],
                                  ["serve", "--bind", "localhost"], ["token", "--role", "ml_ops"],
                                  ["token", "--role", "ml_ops", "--sub", "a", "--ttl", "forever"],
                                  ["config", "--yaml"]])
def test_usage_errors_exit_2(args):
    result = run_sira(*args, env=sira_env())
    assert result.returncode == 2
    assert "usage: sira" in result.stderr


@pytest.mark.parametrize("command", ["serve", "migrate", "config", "token", "reload"])
@pytest.mark.parametrize("variable, value", [("SIRA_WORKERS", "abc"), ("DATABASE_URL", "mysql://x/y"),
                                             ("SIRA_BIND", "127.0.0.1"), ("CACHE_TTL_MS", "-5")])
def test_bad_setting_exits_2_with_one_line_before_starting(tmp_path, command, variable, value):
    args = [command] + (["--role", "ml_ops", "--sub", "x"] if command == "token" else [])
    env = sira_env(SIRA_DATA_DIR=str(tmp_path / "data"), **{variable: value})
    result = run_sira(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sira: configuration error: {variable}: expected")
    assert not (tmp_path / "data").exists(), "nothing may start before the settings are checked"


def test_config_masks_secrets(tmp_path):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), JWT_SECRET="jwt-secret-value-0123456789-abcdefghij",
                   INTERNAL_SERVICE_TOKEN="internal-token-value-0123",
                   DATABASE_URL="postgresql://sira:db-password-42@127.0.0.1:5432/sira")
    result = run_sira("config", env=env)
    assert result.returncode == 0, result.stderr
    for secret in ("jwt-secret-value-0123456789-abcdefghij", "internal-token-value-0123", "db-password-42"):
        assert secret not in result.stdout
    assert "JWT_SECRET" in result.stdout and "****" in result.stdout
    as_json = run_sira("config", "--json", env=env)
    assert as_json.returncode == 0 and "db-password-42" not in as_json.stdout


def test_token_mints_a_verifiable_jwt(tmp_path):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), JWT_SECRET="jwt-secret-value-0123456789-abcdefghij")
    result = run_sira("token", "--role", "ml_ops", "--sub", "alice", "--ttl", "15m", env=env)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), "jwt-secret-value-0123456789-abcdefghij", algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 900
    assert claims.get("role") == "ml_ops" or "ml_ops" in claims.get("roles", [])


def test_token_without_secret_generates_one_in_data_dir(tmp_path):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path))
    result = run_sira("token", "--role", "sira_service", "--sub", "svc", env=env)
    assert result.returncode == 0, result.stderr
    secret = (tmp_path / "jwt_secret").read_text().strip()
    jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])
    assert "JWT_SECRET is not set" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--role", "root", "--sub", "x"], "--role"),
    (["--role", "ml_ops", "--sub", "x", "--private-key", "/no/such.pem"], "--private-key"),
    (["--role", "ml_ops", "--sub", "x", "--alg", "RS256"], "--alg"),
])
def test_token_bad_flags_exit_2(tmp_path, args, fragment):
    env = sira_env(SIRA_DATA_DIR=str(tmp_path), JWT_SECRET="jwt-secret-value-0123456789-abcdefghij")
    result = run_sira("token", *args, env=env)
    assert result.returncode == 2
    assert fragment in result.stderr


def test_reload_without_a_server_exits_1(tmp_path):
    result = run_sira("reload", env=sira_env(SIRA_DATA_DIR=str(tmp_path)))
    assert result.returncode == 1
    assert "no server is running" in result.stderr


def test_reload_with_a_stale_pidfile_exits_1(tmp_path):
    (tmp_path / "sira.pid").write_text("999999\n")
    result = run_sira("reload", env=sira_env(SIRA_DATA_DIR=str(tmp_path)))
    assert result.returncode == 1


def test_reload_sends_sighup_to_the_pid_in_the_pidfile(tmp_path):
    marker = tmp_path / "got-hup"
    script = ("import signal, sys, time, pathlib\n"
              f"signal.signal(signal.SIGHUP, lambda *a: (pathlib.Path({str(marker)!r}).write_text('1'), sys.exit(0)))\n"
              "print('ready', flush=True)\n"
              "time.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        (tmp_path / "sira.pid").write_text(f"{child.pid}\n")
        result = run_sira("reload", env=sira_env(SIRA_DATA_DIR=str(tmp_path)))
        assert result.returncode == 0, result.stderr
        child.wait(10)
        assert marker.read_text() == "1"
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("curve_or_rsa, algorithm", [("ec", "ES256"), ("rsa", "RS256")])
def test_token_signed_with_a_private_key_picks_the_algorithm_by_key_type(tmp_path, curve_or_rsa, algorithm):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = ec.generate_private_key(ec.SECP256R1()) if curve_or_rsa == "ec" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    result = run_sira("token", "--role", "ml_ops", "--sub", "ops", "--private-key", str(pem), "--kid", "k2",
                      env=sira_env(SIRA_DATA_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    jwt.decode(token, key.public_key(), algorithms=[algorithm])


def test_token_with_a_file_that_is_not_a_key_exits_2(tmp_path):
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    result = run_sira("token", "--role", "ml_ops", "--sub", "x", "--private-key", str(pem),
                      env=sira_env(SIRA_DATA_DIR=str(tmp_path)))
    assert result.returncode == 2 and "--private-key" in result.stderr
