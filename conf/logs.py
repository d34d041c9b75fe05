"""Structured logs for every SIRA process: one JSON object per line on stderr.

The CLI configures the root logger once (`configure_logging`); gunicorn's workers and the master's
sidecars are forked from it and inherit the handler. gunicorn's own loggers (`gunicorn.error`,
`gunicorn.access`) go through the same handler via `GunicornJsonLogger`, its `logger_class`.

A line holds `timestamp` (ISO 8601 UTC, ms, Z), `level`, `logger`, `message`, `service`, `pod_id`,
`process` (cli, master, worker, or the sidecar's name), `pid`, `request_id` when the line belongs to
a request, the fields a call passed with `extra=`, and `exception` (the traceback) when there is one.

Secrets: no code logs a payload, a token or a secret; as a second line of defence every line is
scrubbed of the configured secret values, of `Bearer <token>`, of anything shaped like a JWT, and of
the credentials of any URL or libpq connection string in it (conf/redact.py: a library error may
echo a DSN).

The access log (SIRA_ACCESS_LOG=on, LOG_LEVEL info or debug) is handed over by gunicorn after the
response has been sent, so it never delays the answer it describes; its lines are built without a
LogRecord and written in batches (``AccessLog``). Off, gunicorn does not even collect its fields.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar

import orjson
from gunicorn import glogging

from conf.redact import redact_text, secrets_in
from conf.secret_files import file_secret_values
from conf.settings import SETTINGS

SERVICE = "sira-inference"
MASK = "****"
MIN_SECRET_CHARS = 8  # shorter values would mask ordinary words
USER_AGENT_MAX = 200
ACCESS_LOGGER = "gunicorn.access"
UNTRUSTED_FIELDS = ("path", "user_agent")  # what a client chooses in an access line
PIPE_BUF = 4096  # a write() to a pipe up to this size is never interleaved with another's (POSIX)
ACCESS_LINE_ROOM = 512  # a batch is written before it could outgrow PIPE_BUF with one more typical line
ACCESS_FLUSH_S = 0.2  # the longest an access line waits for its batch

# The request id of the request this code runs for; set by app.http.middleware.RequestIdMiddleware. In a
# worker it stays set on the connection's task until the next request on that connection.
REQUEST_ID: ContextVar[str | None] = ContextVar("sira_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


class ProcessRole:
    """Which SIRA process this is, for the `process` field.

    A role is named for one pid: a child forked after `set` that names no role of its own is an
    HTTP worker (gunicorn forks workers without telling us; sidecars call `set` after their fork).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.name = "cli"

    def set(self, name: str) -> None:
        self.pid = os.getpid()
        self.name = name

    def of(self, pid: int) -> str:
        return self.name if pid == self.pid else "worker"


PROCESS_ROLE = ProcessRole()


def one_line(exc: BaseException) -> str:
    """An exception for one log line or the dependency board: its type and the first line of its text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def set_process_role(name: str) -> None:
    """Name this process in every line it logs from now on (master, supervisor, writer...)."""
    PROCESS_ROLE.set(name)


class Redactor:
    """Masks secrets in URLs and connection strings, secret values, bearer tokens and JWT-shaped strings in a line."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets: tuple[str, ...] = ()
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Mask these values too (a secret file re-read on SIGHUP); the ones masked so far stay masked."""
        forms = set(self.secrets)
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_CHARS:
                forms.add(secret)
                forms.add(orjson.dumps(secret).decode()[1:-1])  # as it appears inside a JSON string
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = tuple(sorted(forms, key=len, reverse=True))

    def __call__(self, line: str) -> str:
        line = redact_text(line)  # first: a short password in a URL is masked by its place, not its value
        for secret in self.secrets:
            if secret in line:
                line = line.replace(secret, MASK)
        if "earer" in line or "EARER" in line:
            line = _BEARER.sub(r"\1" + MASK, line)
        if "eyJ" in line:
            line = _JWT.sub(MASK, line)
        return line


def redacted_before_encoding(message: str, fields: dict) -> tuple[str, dict]:
    """The message and string fields with the secrets of their URLs and connection strings masked.

    Done before JSON encoding as well as after: a quoted libpq value (`password='a b\\'c'`) is
    only delimited reliably before its quotes and backslashes are escaped for JSON.
    """
    return redact_text(message), {key: redact_text(value) if isinstance(value, str) else value
                                  for key, value in fields.items()}


_formatted_second: list = [-1, ""]  # the last second formatted: most lines share it


def utc_iso(created: float) -> str:
    """The API's timestamp format (ISO 8601 UTC, milliseconds, Z) for a record's creation time."""
    second = int(created)
    if second != _formatted_second[0]:
        _formatted_second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    return f"{_formatted_second[1]}{int((created - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for the fields)."""

    def __init__(self, redactor: Redactor | None = None, pod_id: str | None = None,
                 role: ProcessRole = PROCESS_ROLE):
        super().__init__()
        self.redactor = redactor or Redactor()
        self.pod_id = pod_id or os.environ.get("HOSTNAME") or socket.gethostname()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        fields = {key: value for key, value in record.__dict__.items() if key not in _RECORD_ATTRS}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return self.line(record.created, record.levelname.lower(), record.name, record.getMessage(),
                         record.process, fields)

    def line(self, created: float, level: str, logger: str, message: str, pid: int, fields: dict,
             redact: bool = True) -> str:
        """One log line (no newline): the common fields, the request id, then `fields`, scrubbed unless told."""
        if redact:
            message, fields = redacted_before_encoding(message, fields)
        entry = {
            "timestamp": utc_iso(created),
            "level": level,
            "logger": logger,
            "message": message,
            "service": SERVICE,
            "pod_id": self.pod_id,
            "process": self.role.of(pid),
            "pid": pid,
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(fields)
        line = orjson.dumps(entry, default=str).decode()
        return self.redactor(line) if redact else line


class AccessLog:
    """Access lines built without a LogRecord and written in batches, after the responses they describe.

    A line joins a buffer that is written once it nears PIPE_BUF bytes or ACCESS_FLUSH_S after its
    first line (at once outside an event loop), in write()s of at most PIPE_BUF bytes cut at line
    ends, so that no other process's write to the same pipe can land inside a line. One write() per
    dozen lines instead of one per line: measured, the writes were most of the access log's cost.
    Not thread safe: one per process.
    """

    def __init__(self, formatter: JsonFormatter, write: Callable[[bytes], None]):
        self.formatter = formatter
        self.write = write
        self.pid = os.getpid()
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.scheduled: asyncio.TimerHandle | None = None

    def add(self, message: str, fields: dict) -> None:
        """`message` and the fields named in UNTRUSTED_FIELDS are scrubbed: the rest are the server's own."""
        if self.pid != os.getpid():  # inherited through a fork: the parent's lines are not ours to write
            self.pid, self.pending, self.pending_bytes, self.scheduled = os.getpid(), [], 0, None
        redact = self.formatter.redactor
        for name in UNTRUSTED_FIELDS:
            if name in fields:
                fields[name] = redact(fields[name])
        line = self.formatter.line(time.time(), "info", ACCESS_LOGGER, redact(message), self.pid, fields,
                                   redact=False)
        data = line.encode() + b"\n"
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= PIPE_BUF - ACCESS_LINE_ROOM:
            self.flush()
        elif self.scheduled is None:
            try:
                self.scheduled = asyncio.get_running_loop().call_later(ACCESS_FLUSH_S, self.flush)
            except RuntimeError:  # no event loop: nothing would come back to flush
                self.flush()

    def flush(self) -> None:
        if self.scheduled is not None:
            self.scheduled.cancel()
            self.scheduled = None
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        chunk = b""
        for line in pending:
            if chunk and len(chunk) + len(line) > PIPE_BUF:
                self.write(chunk)
                chunk = b""
            chunk += line
        if chunk:
            self.write(chunk)


def writer_for(stream) -> Callable[[bytes], None]:
    """Raw writes to the stream's file descriptor (all bytes, one write() when they fit), or via the stream."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO in tests, a captured stream
        def write_text(data: bytes) -> None:
            stream.write(data.decode())
            stream.flush()

        return write_text

    def write_fd(data: bytes) -> None:
        stream.flush()  # what the logging handler buffered goes first
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    return write_fd


def json_handler(level: int, secrets: Iterable[str] = (), stream=None) -> logging.Handler:
    """The one handler of every process; its level also holds back loggers that set their own (gunicorn's)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(JsonFormatter(Redactor(secrets)))
    return handler


_access_log: AccessLog | None = None  # set by configure_logging when its level lets info lines through


def configure_logging(level: str, secrets: Iterable[str] = (), stream=None) -> None:
    """The root logger writes JSON lines at `level` (LOG_LEVEL); replaces any earlier setup."""
    global _access_log
    numeric_level = getattr(logging, level.upper())
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = json_handler(numeric_level, secrets, stream)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    logging.captureWarnings(True)
    _access_log = AccessLog(handler.formatter, writer_for(handler.stream)) if numeric_level <= logging.INFO else None


def mask_secrets(values: Iterable[str]) -> None:
    """Every line this process logs from now on masks these values too (secrets re-read from files)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.redactor.add(values)


def access_log_enabled(access_log: bool, level: str) -> bool:
    """SIRA_ACCESS_LOG=on writes at info: with LOG_LEVEL warning or above gunicorn need not even collect it."""
    return access_log and getattr(logging, level.upper()) <= logging.INFO


def secret_values(settings) -> list[str]:
    """The values of the secret settings, of the secret files and of the credentials in URLs, to mask in every line.

    A URL's credentials are taken wherever they sit (userinfo, query, as written and decoded), and
    from every setting: a line may show the password alone, outside the URL it came from.
    """
    values = []
    for setting in SETTINGS:
        value = getattr(settings, setting.attr, None)
        if isinstance(value, str):
            if setting.secret:
                values.append(value)
            values.extend(secrets_in(value))  # DATABASE_URL's password, S3_ENDPOINT_URL's token...
    values.extend(file_secret_values(settings))  # JWT_SECRET_FILE, INTERNAL_SERVICE_TOKEN_FILE
    url = getattr(settings, "database_url", None)
    if url:
        values.extend(database_passwords(url))
    return values


def database_passwords(url: str) -> list[str]:
    """The password and sslpassword as libpq reads them from the URL (decoded, from userinfo or query)."""
    import psycopg
    from psycopg import conninfo

    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.Error:  # a malformed URL was refused by conf.settings already
        return []
    return [str(params[key]) for key in ("password", "sslpassword") if params.get(key)]


class GunicornJsonLogger(glogging.Logger):
    """gunicorn's `logger_class`: its error log through the root handler, its access log as AccessLog lines.

    gunicorn's access log is on when its `accesslog` setting is set (the master sets it from
    SIRA_ACCESS_LOG); gunicorn calls `access` after the response's last byte was written. The
    lines follow LOG_LEVEL: none above info.
    """

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in [h for h in log.handlers if getattr(h, "_gunicorn", False)]:
                log.removeHandler(handler)
            log.propagate = True

    def access(self, resp, req, environ, request_time) -> None:
        if not self.access_log_enabled or _access_log is None:
            return
        status = resp.status
        if isinstance(status, str):
            status = int(status.split(None, 1)[0])
        method = environ.get("REQUEST_METHOD", "-")
        path = environ.get("PATH_INFO", "-")  # never the query string
        fields = {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(request_time.seconds * 1000 + request_time.microseconds / 1000, 3),
            "bytes": getattr(resp, "sent", None),
            "remote_addr": environ.get("REMOTE_ADDR", "-"),
            "user_agent": environ.get("HTTP_USER_AGENT", "-")[:USER_AGENT_MAX],
            "request_id": None,  # gunicorn's own answers (a malformed request) have none
        }
        for name, value in resp.headers:
            if name.lower() == "x-request-id":
                fields["request_id"] = value
                break
        _access_log.add(f"{method} {path} {status}", fields)
