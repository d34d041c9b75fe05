"""Every setting of SIRA: one table of (variable, default, parser, help, secret), read from the environment.

The table is the single source: `load_settings` checks every value at start (a bad one is a
`ConfigError` whose message is the one line the CLI prints before exiting 2), `sira config` prints
the effective values with secrets masked, and the configuration table of docs/configuration.md is generated from it
(`python -m conf.settings --markdown`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from conf.parsers import (
    parse_bind,
    parse_bounded_int,
    parse_bucket,
    parse_database_url,
    parse_http_url,
    parse_key_prefix,
    parse_kid,
    parse_log_level,
    parse_min_length,
    parse_nonempty,
    parse_optional_file,
    parse_positive_float,
    parse_positive_int,
    parse_public_keys,
    parse_ratio,
    parse_required_key_prefix,
    parse_ring_bytes,
    parse_switch,
    parse_timeout_s,
)
from conf.ratelimit import RateLimits, parse_rate_limits
from conf.redact import redact, redact_text
from conf.secret_files import FILE_VARIABLES, read_jwt_secrets, read_secret_file, read_service_tokens
from conf.tls import check_tls, parse_client_auth, parse_pem_file


class ConfigError(ValueError):
    """A setting has a bad value; str() is one line naming the variable and what it expects."""


@dataclasses.dataclass(frozen=True)
class Setting:
    env: str
    default: str | None
    parse: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def attr(self) -> str:
        return self.env.lower().removeprefix("sira_")


SETTINGS: tuple[Setting, ...] = (
    Setting("SIRA_DATA_DIR", "./var", parse_nonempty,
            "Folder for the embedded Postgres, the local model store, model files, pid files and the generated JWT "
            "secret."),
    Setting("SIRA_BIND", "127.0.0.1:8080", parse_bind, "HOST:PORT the HTTP workers listen on."),
    Setting("SIRA_WORKERS", None, parse_bounded_int(1, 256),
            "Number of HTTP worker processes (default: number of cores)."),
    Setting("DATABASE_URL", None, parse_database_url,
            "PostgreSQL URL. Unset: an embedded PostgreSQL under $SIRA_DATA_DIR/pg, started and stopped by sira.",
            secret=True),
    Setting("JWT_SECRET", None, parse_min_length(32),
            "HS256 secret for client tokens (at least 32 bytes). Unset: generated once and kept in "
            "$SIRA_DATA_DIR/jwt_secret (with a warning).",
            secret=True),
    Setting("JWT_SECRET_FILE", None, parse_nonempty,
            "File holding the HS256 secret, or a JSON object of KID -> SECRET to rotate by kid (instead of "
            "JWT_SECRET; re-read on SIGHUP; mode 0400 or 0440). See Secrets from files."),
    Setting("JWT_SECRET_KID", "default", parse_kid,
            "Key id of JWT_SECRET (or of a one-secret JWT_SECRET_FILE); tokens without a kid use it."),
    Setting("JWT_PUBLIC_KEYS", "", parse_public_keys,
            "Extra verification keys as KID=PEM_PATH[,KID=PEM_PATH...] (RS256 for RSA, ES256 for P-256); tokens pick"
            " one by kid."),
    Setting("JWT_ISSUER", None, parse_nonempty, "Required `iss` claim (unset: not checked)."),
    Setting("JWT_AUDIENCE", None, parse_nonempty, "Required `aud` claim (unset: not checked)."),
    Setting("INTERNAL_SERVICE_TOKEN", None, parse_min_length(16),
            "Opaque token for internal callers; it may call every endpoint. Unset: disabled.", secret=True),
    Setting("INTERNAL_SERVICE_TOKEN_FILE", None, parse_nonempty,
            "File of internal service tokens, one per line, all accepted (instead of INTERNAL_SERVICE_TOKEN; re-read"
            " on SIGHUP; mode 0400 or 0440)."),
    Setting("DATABASE_URL_FILE", None, parse_nonempty,
            "File holding DATABASE_URL (instead of it; read at start; mode 0400 or 0440)."),
    Setting("MODEL_BUCKET", None, parse_bucket,
            "S3 bucket of the model store. Unset: a local folder store in $SIRA_DATA_DIR/store."),
    Setting("S3_ENDPOINT_URL", None, parse_http_url,
            "S3 endpoint for MinIO and other S3-compatible stores (unset: AWS)."),
    Setting("CACHE_MAX_ITEMS",
            "5000", parse_bounded_int(0, 10_000_000), "Capacity of the shared prediction cache (0 disables it)."),
    Setting("CACHE_TTL_MS", "300000", parse_positive_int, "Time to live of a cached prediction, in milliseconds."),
    Setting("MODEL_POLL_INTERVAL_S", "30", parse_positive_float, "Seconds between two syncs of the model registry."),
    Setting("LOG_LEVEL", "info", parse_log_level, "debug, info, warning, error or critical."),
    Setting("SIRA_ACCESS_LOG", "off", parse_switch,
            "on: one JSON access log line per HTTP request (written after the response is sent)."),
    Setting("METRICS_BIND", None, parse_bind,
            "Optional HOST:PORT of an ops port that serves only /metrics, /healthz and /readyz (no token: restrict "
            "it to the scraper). /metrics is on SIRA_BIND too unless SIRA_METRICS_ON_MAIN_PORT is off."),
    Setting("SIRA_METRICS_ON_MAIN_PORT", "on", parse_switch,
            "on: GET /metrics answers on SIRA_BIND too, without a token (one port is all `make run` needs); off: "
            "only on METRICS_BIND's port, 404 NOT_FOUND on SIRA_BIND (the shipped Kubernetes config: every client "
            "reaches SIRA_BIND, and a scrape costs the answering worker a merge of every metrics file). Off without "
            "METRICS_BIND: /metrics is served nowhere."),
    Setting("SIRA_OPENAPI_FEATURE_SPECS", "off", parse_switch,
            "on: /openapi.json shows every served product's payload schema (feature names, bounds, categories) to "
            "anyone; off: only to a request with a valid token (any role), and without one a generic payload. A "
            "fraud model's inputs are what a fraudster wants to learn."),
    Setting("SIRA_BATCH_MAX", "256", parse_bounded_int(1, 10_000), "Most events in one POST /v1/infer/batch."),
    Setting("SIRA_OUTCOMES_BATCH_MAX", "1000", parse_bounded_int(1, 10_000),
            "Most outcomes (fraud or legit labels of events) in one POST /v1/outcomes."),
    Setting("SIRA_MAX_BODY_BYTES",
            "1048576", parse_bounded_int(1024, 64 * 1024 * 1024), "Largest request body accepted (413 above)."),
    Setting("SIRA_KEEPALIVE_S", "5", parse_bounded_int(0, 3600), "Seconds an idle keep-alive connection stays open."),
    Setting("SIRA_HEADER_TIMEOUT_S", "10", parse_timeout_s,
            "Seconds a new connection has to send its first request line and headers (slow or silent clients are "
            "disconnected)."),
    Setting("SIRA_BODY_TIMEOUT_S", "10", parse_timeout_s,
            "Seconds a request has to send its whole body once its headers are in (408 REQUEST_TIMEOUT after, and "
            "the connection is closed)."),
    Setting("SIRA_TLS_CERT", None, parse_pem_file,
            "PEM certificate chain of the server. With SIRA_TLS_KEY: every listener (METRICS_BIND's too) speaks "
            "HTTPS only."),
    Setting("SIRA_TLS_KEY", None, parse_pem_file, "PEM private key (unencrypted) of SIRA_TLS_CERT."),
    Setting("SIRA_TLS_CA", None, parse_pem_file,
            "PEM CA certificates that sign client certificates (mutual TLS); needs SIRA_TLS_CLIENT_AUTH optional or "
            "required."),
    Setting("SIRA_TLS_CLIENT_AUTH", "none", parse_client_auth,
            "Client certificates: none, optional (checked against SIRA_TLS_CA when sent) or required (the handshake "
            "fails without one)."),
    Setting("SIRA_GUNICORN_CONFIG", None, parse_optional_file,
            "Optional gunicorn config file (Python) for ops overrides; applied after SIRA's own settings."),
    Setting("SIRA_QUEUE_RING_BYTES", "4194304", parse_ring_bytes,
            "Bytes of each worker's prediction queue ring in /dev/shm (a multiple of 64). A full ring spills to the "
            "worker's overflow file under $SIRA_DATA_DIR/spool."),
    Setting("SIRA_SPOOL_MAX_BYTES", "1073741824", parse_bounded_int(1024 * 1024, 1 << 50),
            "Most bytes the prediction log keeps under $SIRA_DATA_DIR/spool: the writer's batches while Postgres is "
            "away and the workers' overflow files (logged as it fills); at the limit new predictions wait in the "
            "rings, and when those are full a request is refused (503)."),
    Setting("SIRA_SPOOL_HANDOFF_PREFIX", "prediction-spool/", parse_key_prefix,
            "With MODEL_BUCKET: a writer that stops while Postgres is away uploads its spool and overflow files "
            "under this prefix of the bucket, and any instance replays them once Postgres answers (empty: off)."),
    Setting("SIRA_ARCHIVE_PREFIX", "prediction-archive/", parse_required_key_prefix,
            "Where `sira predictions archive` puts each archived day of the prediction log in the model store "
            "(MODEL_BUCKET, else $SIRA_DATA_DIR/store): <prefix><YYYY-MM-DD>/part-NNNN.parquet and .manifest.json."),
    Setting("SIRA_WRITER_BATCH_ROWS", "5000", parse_bounded_int(1, 100_000),
            "Most prediction rows the writer sends to Postgres in one COPY and commit."),
    Setting("SIRA_WRITER_LINGER_MS", "100", parse_bounded_int(0, 1000),
            "The writer sends a batch that is not full at most this often (milliseconds): fewer, larger commits for "
            "the same rows."),
    Setting("SIRA_CANARY_BUDGET_MS", "50", parse_positive_float,
            "A canary or shadow run is stopped at this (milliseconds per event) and counts as a failure: production "
            "answers the event (fallback: true)."),
    Setting("SIRA_BREAKER_FAILURES", "5", parse_bounded_int(1, 1_000_000),
            "Canary failures within SIRA_BREAKER_WINDOW_S that open its circuit breaker (its events go to "
            "production)."),
    Setting("SIRA_BREAKER_WINDOW_S",
            "10", parse_positive_float, "Window, in seconds, in which the breaker counts canary failures."),
    Setting("SIRA_BREAKER_COOLDOWN_S", "30", parse_positive_float,
            "Seconds an open breaker stays open before it lets the canary try again (half-open); a failure then "
            "rolls the canary back."),
    Setting("SIRA_METRICS_WINDOW_S", "60", parse_positive_float,
            "Seconds of each sira_inference_metrics window the supervisor writes (aligned to the clock, so every "
            "instance cuts the same windows)."),
    Setting("SIRA_CANARY_WINDOW_S", "60", parse_positive_float,
            "Sliding window, in seconds, over which the supervisor compares a canary with production for the "
            "automatic rollback."),
    Setting("SIRA_CANARY_MIN_REQUESTS", "100", parse_bounded_int(1, 100_000_000),
            "Requests the canary and production must each have served in the window before the canary can be judged."),
    Setting("SIRA_CANARY_MAX_ERROR_RATIO", "1.5", parse_ratio,
            "Roll the canary back when its error rate in the window exceeds this many times production's (and it had"
            " an error)."),
    Setting("SIRA_CANARY_MAX_LATENCY_RATIO", "1.3", parse_ratio,
            "Roll the canary back when its p95 model latency in the window exceeds this many times production's."),
    Setting("SIRA_CANARY_FP_WINDOW_H", "168", parse_bounded_int(1, 8760),
            "Hours of predictions (by their time, not their labels') over which the outcomes judge a canary "
            "(fp_rate_threshold)."),
    Setting("SIRA_CANARY_MIN_LABELLED", "100", parse_bounded_int(1, 100_000_000),
            "Labelled predictions the canary and production must each have in that window before the outcomes "
            "judge the canary."),
    Setting("SIRA_CANARY_MAX_FP_RATIO", "1.5", parse_ratio,
            "Roll the canary back (fp_rate_threshold) when the false-positive rate of its blocks exceeds this many "
            "times production's and is at least one percentage point above it."),
    Setting("SIRA_CANARY_MAX_BLOCK_RATIO", "2.0", parse_ratio,
            "Roll the canary back (decision_shift) when its block rate in the window (blocks over the events it "
            "answered) exceeds this many times production's and is at least one percentage point above it."),
    Setting("SIRA_RATE_LIMITS", "", parse_rate_limits,
            "Requests per token subject and role, shared by every worker of the host: comma-separated ROLE=N/second,"
            " ROLE=N/minute, ROLE=N/hour or ROLE=unlimited. Roles not named keep their defaults: fraud_analyst, "
            "ml_ops, pay_admin 100/minute; sira_service and internal_service (the internal token) unlimited; "
            "anonymous (requests failing authentication, per client address) 100/minute. Over it: 429 "
            "RATE_LIMIT_EXCEEDED with Retry-After."),
)

SETTINGS_BY_ENV = {setting.env: setting for setting in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective settings; attribute names are the variable names, lower case, without SIRA_."""

    data_dir: str
    bind: str
    workers: int
    database_url: str | None
    jwt_secret: str | None
    jwt_secret_file: str | None
    jwt_secret_kid: str
    jwt_public_keys: dict[str, str]
    jwt_issuer: str | None
    jwt_audience: str | None
    internal_service_token: str | None
    internal_service_token_file: str | None
    database_url_file: str | None
    model_bucket: str | None
    s3_endpoint_url: str | None
    cache_max_items: int
    cache_ttl_ms: int
    model_poll_interval_s: float
    log_level: str
    access_log: bool
    metrics_bind: str | None
    metrics_on_main_port: bool
    openapi_feature_specs: bool
    batch_max: int
    outcomes_batch_max: int
    max_body_bytes: int
    keepalive_s: int
    header_timeout_s: float
    body_timeout_s: float
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None
    tls_client_auth: str
    gunicorn_config: str | None
    queue_ring_bytes: int
    spool_max_bytes: int
    spool_handoff_prefix: str
    archive_prefix: str
    writer_batch_rows: int
    writer_linger_ms: int
    canary_budget_ms: float
    breaker_failures: int
    breaker_window_s: float
    breaker_cooldown_s: float
    metrics_window_s: float
    canary_window_s: float
    canary_min_requests: int
    canary_max_error_ratio: float
    canary_max_latency_ratio: float
    canary_max_block_ratio: float
    canary_fp_window_h: int
    canary_min_labelled: int
    canary_max_fp_ratio: float
    rate_limits: RateLimits

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_settings(environ: Mapping[str, str] | None = None, read_secret_files: bool = True) -> Settings:
    """Read and check every setting; the first bad one raises ConfigError with a one-line message.

    `read_secret_files=False` (for `sira reload`, which needs none of them) leaves the *_FILE
    contents unread: a bad file must not stop the signal that tells the server to re-read it.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = environ.get(setting.env)
        if raw is None or (raw == "" and setting.default is None):
            raw = setting.default
        if raw is None:
            values[setting.attr] = None
            continue
        try:
            values[setting.attr] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(redact_text(f"{setting.env}: expected {exc}")) from None  # a bad URL may hold a password
    if values["workers"] is None:
        values["workers"] = default_workers()
    check_metrics_bind(values["bind"], values["metrics_bind"])
    if read_secret_files:
        check_secret_files(values)
    try:
        check_tls(values["tls_cert"], values["tls_key"], values["tls_ca"], values["tls_client_auth"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Settings(**values)


def check_secret_files(values: dict[str, Any]) -> None:
    """Each *_FILE setting excludes its plain variable, and its file must be usable now (conf/secret_files.py).

    DATABASE_URL_FILE's content becomes `database_url`; the JWT and internal token files are only
    checked here: they are read again when the keys are built and on every SIGHUP.
    """
    for file_env, plain_env in FILE_VARIABLES.items():
        path = values[SETTINGS_BY_ENV[file_env].attr]
        if path is not None and values[SETTINGS_BY_ENV[plain_env].attr] is not None:
            raise ConfigError(f"{file_env}: expected either {plain_env} or {file_env}, not both")
    try:
        if values["database_url_file"]:
            values["database_url"] = read_database_url(values["database_url_file"])
    except ValueError as exc:
        raise ConfigError(f"DATABASE_URL_FILE: {exc}") from None
    try:
        if values["jwt_secret_file"]:
            kids = read_jwt_secrets(values["jwt_secret_file"], values["jwt_secret_kid"])[0]
            shared = sorted(set(kids) & set(values["jwt_public_keys"]))
            if shared:
                raise ValueError(f"{values['jwt_secret_file']}: kid {shared[0]!r} is also in JWT_PUBLIC_KEYS")
    except ValueError as exc:
        raise ConfigError(f"JWT_SECRET_FILE: {exc}") from None
    try:
        if values["internal_service_token_file"]:
            read_service_tokens(values["internal_service_token_file"])  # at least one, or an error
    except ValueError as exc:
        raise ConfigError(f"INTERNAL_SERVICE_TOKEN_FILE: {exc}") from None


def read_database_url(path: str) -> str:
    """DATABASE_URL_FILE's URL, checked as DATABASE_URL is; errors name the file, never the password."""
    url = read_secret_file(path)
    try:
        return parse_database_url(url)
    except ValueError as exc:
        raise ValueError(f"{path}: expected {exc}") from None


def check_metrics_bind(bind: str, metrics_bind: str | None) -> None:
    """The ops port must differ from SIRA_BIND's: the app tells the two apart by port."""
    if metrics_bind is not None and metrics_bind.rpartition(":")[2] == bind.rpartition(":")[2]:
        raise ConfigError(f"METRICS_BIND: expected a port other than SIRA_BIND's, got {metrics_bind!r}")


def mask(setting: Setting, value: Any) -> str:
    """The value as `sira config` shows it: secrets replaced, a database password hidden.

    DATABASE_URL is shown with only its secrets masked (conf/redact.py), so that its host, port and
    database can be checked; any other value may embed a URL with credentials (S3_ENDPOINT_URL).
    """
    if value is None:
        return "(unset)"
    if setting.env == "DATABASE_URL":
        return redact(value)
    if setting.secret:
        return "****"
    if isinstance(value, dict):
        return redact(",".join(f"{k}={v}" for k, v in value.items()))
    return redact(str(value))


def effective_values(settings: Settings) -> list[tuple[str, str, str]]:
    """(variable, shown value, where it came from) for every setting."""
    rows = []
    for setting in SETTINGS:
        source = "env" if setting.env in os.environ else "default"
        shown = mask(setting, getattr(settings, setting.attr))
        if setting.env in FILE_VARIABLES.values() and os.environ.get(f"{setting.env}_FILE"):
            source = f"{setting.env}_FILE"  # DATABASE_URL read from its file, masked; the others are not kept
            shown = "****" if shown == "(unset)" else shown
        rows.append((setting.env, shown, source))
    return rows


def markdown_table() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for setting in SETTINGS:
        default = f"`{setting.default}`" if setting.default not in (None, "") else "unset"
        lines.append(f"| `{setting.env}` | {default} | {setting.help} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(markdown_table())
