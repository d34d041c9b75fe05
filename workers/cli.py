"""The `sira` command: serve, migrate, token, reload, config, models (workers/models_cli.py), predictions
(workers/predictions_cli.py), outcomes (workers/outcomes_cli.py).

Exit codes: 0 done, 1 failed, 2 usage or configuration error (printed as one line before anything
starts).

Each command imports the server's modules when it runs, not at the top: `sira config`, `token` and
`reload` then start in about 0.3 s, where importing workers.master alone takes 0.6 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

from conf.logs import configure_logging as configure_json_logging
from conf.logs import secret_values
from conf.parsers import parse_bind, parse_bounded_int
from conf.settings import ConfigError, Settings, effective_values, load_settings
from workers.cli_usage import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError
from workers.models_cli import add_models_parser, command_models
from workers.outcomes_cli import add_outcomes_parser, command_outcomes
from workers.predictions_cli import add_predictions_parser, command_predictions

log = logging.getLogger("sira.cli")


def parse_duration(value: str) -> int:
    """'90', '90s', '15m', '1h', '7d' -> seconds (positive, at most 366 days)."""
    match = re.fullmatch(r"(\d+)([smhd]?)", value.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration such as 900, 15m, 1h or 7d, got {value!r}")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if not 0 < seconds <= 366 * 86400:
        raise argparse.ArgumentTypeError(f"expected a duration from 1s to 366d, got {value!r}")
    return seconds


def argparse_type(parse, what: str):
    def convert(value: str):
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {exc}") from None

    convert.__name__ = what
    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sira", description="SIRA fraud and risk scoring server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve HTTP with gunicorn workers (settings from the environment)",
                                description="Run the gunicorn master and its workers until SIGTERM or SIGINT.")
    serve.add_argument("--bind", type=argparse_type(parse_bind, "bind"), help="HOST:PORT (overrides SIRA_BIND)")
    serve.add_argument("--workers", type=argparse_type(parse_bounded_int(1, 256), "workers"),
                       help="number of HTTP workers (overrides SIRA_WORKERS)")

    commands.add_parser("migrate", help="apply pending database migrations",
                        description="Apply migrations/NNN_*.sql in order, each once, under an advisory lock.")

    token = commands.add_parser("token", help="mint a JWT for a role",
                                description="Mint a JWT signed with the configured key (JWT_SECRET by default).")
    token.add_argument("--role", required=True, help="sira_service, fraud_analyst, ml_ops or pay_admin")
    token.add_argument("--sub", required=True, help="the token's subject (who calls)")
    token.add_argument("--ttl", type=parse_duration, default=3600,
                       help="lifetime such as 900, 15m, 1h, 7d (default 1h)")
    token.add_argument("--kid", help="key id to put in the header (default JWT_SECRET_KID or JWT_SECRET_FILE's first "
                                     "kid, or none with --private-key); with JWT_SECRET_FILE it picks the secret")
    token.add_argument("--private-key", metavar="PEM",
                       help="sign with this RSA or EC private key instead of JWT_SECRET")
    token.add_argument("--alg", choices=("HS256", "RS256", "ES256"), help="algorithm (default HS256, or by key type)")

    commands.add_parser("reload", help="ask a running server to re-read its secret files and re-sync its models "
                                       "(SIGHUP to the master)",
                        description="Send SIGHUP to the master whose pid is in $SIRA_DATA_DIR/sira.pid.")

    config = commands.add_parser("config", help="print the effective settings, secrets masked",
                                 description="Print every setting, its effective value and where it came from.")
    config.add_argument("--json", action="store_true", help="print JSON instead of a table")

    add_models_parser(commands)
    add_predictions_parser(commands)
    add_outcomes_parser(commands)
    return parser


def configure_logging(settings: Settings) -> None:
    """JSON lines on stderr at LOG_LEVEL, secrets masked (conf/logs.py); children inherit it."""
    configure_json_logging(settings.log_level, secret_values(settings))


def check_key_files(settings: Settings) -> None:
    """Every JWT_PUBLIC_KEYS file must hold a usable public key: checked before anything starts."""
    from app.auth.keys import load_public_key

    for kid, path in settings.jwt_public_keys.items():
        try:
            load_public_key(path)
        except ValueError as exc:
            raise ConfigError(f"JWT_PUBLIC_KEYS: key {kid!r}: {exc}") from None


def command_serve(settings: Settings, args: argparse.Namespace) -> int:
    from workers.instance import DataDirInUse, DataDirNotPrivate, check_private, lock_data_dir
    from workers.master import read_ops_config, serve
    from workers.postgres import open_database

    check_key_files(settings)
    if settings.gunicorn_config:
        read_ops_config(settings.gunicorn_config)  # a bad ops file stops us before anything starts
    if args.bind:
        settings = settings.replace(bind=args.bind)
    if args.workers:
        settings = settings.replace(workers=args.workers)
    try:  # before anything in the data dir is touched: the database, the metrics folder, the spool
        check_private(settings.data_dir)
        lock = lock_data_dir(settings.data_dir)
    except (DataDirInUse, DataDirNotPrivate) as exc:
        raise UsageError(str(exc)) from None
    with lock, open_database(settings.database_url, settings.data_dir) as dsn:
        serve(settings, dsn)  # migrations first (workers/bootstrap.py)
    return EXIT_OK


def command_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from workers.migrate import apply_migrations
    from workers.postgres import open_database

    with open_database(settings.database_url, settings.data_dir) as dsn:
        applied = apply_migrations(dsn)
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ", database up to date"))
    return EXIT_OK


def algorithm_of_private_key(pem: bytes, path: str) -> str:
    """RS256 for an RSA key, ES256 for an EC key, whatever the PEM's header says."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--private-key: {path!r} is not an unencrypted PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    raise UsageError(f"--private-key: {path!r} is neither an RSA nor an EC key")


def command_token(settings: Settings, args: argparse.Namespace) -> int:
    from app.auth.keys import mint_token
    from app.auth.roles import KNOWN_ROLES
    from conf.secret_files import load_jwt_secrets

    if args.role not in KNOWN_ROLES:
        raise UsageError(f"--role: expected one of {', '.join(sorted(KNOWN_ROLES))}, got {args.role!r}")
    if args.private_key:
        try:
            with open(args.private_key, "rb") as handle:
                pem = handle.read()
        except OSError as exc:
            raise UsageError(f"--private-key: cannot read {args.private_key!r} ({exc.strerror})") from None
        algorithm = args.alg or algorithm_of_private_key(pem, args.private_key)
        if algorithm == "HS256":
            raise UsageError("--alg HS256 signs with JWT_SECRET; drop --private-key or pick RS256/ES256")
        try:
            token = mint_token(role=args.role, subject=args.sub, ttl_s=args.ttl, private_key_pem=pem,
                               algorithm=algorithm, kid=args.kid, issuer=settings.jwt_issuer,
                               audience=settings.jwt_audience)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--private-key: {args.private_key!r} is not a usable {algorithm} key ({exc})") from None
    else:
        if args.alg not in (None, "HS256"):
            raise UsageError(f"--alg {args.alg} needs --private-key")
        secrets, signing_kid = load_jwt_secrets(settings)
        kid = args.kid or signing_kid
        secret = secrets.get(kid) if settings.jwt_secret_file else secrets[signing_kid]
        if secret is None:  # JWT_SECRET_FILE: --kid picks one of its secrets
            raise UsageError(f"--kid: {kid!r} is not a kid of JWT_SECRET_FILE ({', '.join(secrets)})")
        token = mint_token(role=args.role, subject=args.sub, ttl_s=args.ttl, secret=secret,
                           kid=kid, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    print(token)
    return EXIT_OK


def command_reload(settings: Settings, args: argparse.Namespace) -> int:
    from conf.datadir import MASTER_PIDFILE, data_path

    try:
        load_settings()  # the secret files, read here for a warning only: the server checks them again
    except ConfigError as exc:
        print(f"sira reload: warning: {exc}; the server will keep its current keys", file=sys.stderr)
    pidfile = data_path(settings.data_dir, MASTER_PIDFILE)
    try:
        with open(pidfile, encoding="ascii") as handle:
            pid = int(handle.read().strip())
    except FileNotFoundError:
        print(f"sira reload: no server is running ({pidfile} does not exist)", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError:
        print(f"sira reload: {pidfile} does not hold a pid", file=sys.stderr)
        return EXIT_FAILURE
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"sira reload: the server of {pidfile} (pid {pid}) is not running", file=sys.stderr)
        return EXIT_FAILURE
    print(f"sent SIGHUP to the master (pid {pid})")
    return EXIT_OK


def command_config(settings: Settings, args: argparse.Namespace) -> int:
    rows = effective_values(settings)
    if args.json:
        import orjson

        print(orjson.dumps({name: value for name, value, _ in rows}, option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    width = max(len(name) for name, _, _ in rows)
    for name, value, source in rows:
        print(f"{name.ljust(width)}  {value}  ({source})")
    return EXIT_OK


COMMANDS = {
    "serve": command_serve,
    "migrate": command_migrate,
    "token": command_token,
    "reload": command_reload,
    "config": command_config,
    "models": command_models,
    "predictions": command_predictions,
    "outcomes": command_outcomes,
}


def exit_on_sigterm(signum: int, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so context managers (the embedded Postgres) clean up.

    gunicorn's arbiter installs its own handlers once `sira serve` hands it the process.
    """
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(read_secret_files=args.command != "reload")
    except ConfigError as exc:
        print(f"sira: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings)
    try:
        return COMMANDS[args.command](settings, args)
    except UsageError as exc:
        print(f"sira {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"sira: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # the one place a failure becomes exit 1 with its reason
        log.debug("sira %s failed", args.command, exc_info=True)
        print(f"sira {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
