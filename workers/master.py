"""`sira serve`: the gunicorn master run as our own BaseApplication.

Before gunicorn starts, the master prepares everything the workers share: the database (embedded
or DATABASE_URL), migrations, the demo model on a first start, verified local model files. Workers
are forked afterwards and each builds its Falcon app (and its ONNX sessions) once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import psycopg
from gunicorn.app.base import BaseApplication

from app.auth import Authenticator, KeyRing
from app.config import AppConfig
from conf.secrets import jwt_secret_or_generate
from conf.settings import Settings
from workers import registry
from workers.arbiter import Sidecar, SiraArbiter
from workers.bootstrap import ensure_demo_model
from workers.model_files import sync_production_files
from workers.modelstore import LocalModelStore
from workers.paths import MASTER_PIDFILE, MODELS_DIR, STORE_DIR, data_path

log = logging.getLogger("sira.master")

# Signals that stop a worker. One that arrives while a worker boots (before its event loop runs)
# is lost by the asgi worker, and the master then waits out the whole graceful timeout; so a worker
# blocks them from fork until its loop runs, and they are delivered then.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}


def block_stop_signals(server, worker) -> None:
    """gunicorn post_fork hook, in the new worker."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def unblock_stop_signals_once_running(worker) -> None:
    """gunicorn post_worker_init hook: unblock as the worker's event loop's first act."""
    worker.loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, STOP_SIGNALS)


def build_authenticator(settings: Settings) -> Authenticator:
    secret = jwt_secret_or_generate(settings.jwt_secret, settings.data_dir)
    keyring = KeyRing.from_config(secret, settings.jwt_secret_kid, settings.jwt_public_keys)
    return Authenticator(keyring, settings.internal_service_token,
                         issuer=settings.jwt_issuer, audience=settings.jwt_audience)


def prepare_models(settings: Settings, dsn: str) -> tuple[list, list[str]]:
    """Demo model on first start, then verified local copies of every production model."""
    store = LocalModelStore(data_path(settings.data_dir, STORE_DIR))
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_demo_model(conn, store)
        production = registry.production_models(conn)
        products = registry.registered_products(conn)
    files = sync_production_files(store, production, data_path(settings.data_dir, MODELS_DIR))
    return files, products


class SiraApplication(BaseApplication):
    """gunicorn configured from conf/ (plus an optional ops config file), serving app.main."""

    def __init__(self, settings: Settings, app_config: AppConfig, sidecars: list[Sidecar] | None = None):
        self.settings = settings
        self.app_config = app_config
        self.sidecars = sidecars or []
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options = {
            "bind": [settings.bind],
            "workers": settings.workers,
            "worker_class": "asgi",
            "asgi_loop": "uvloop",
            "http_parser": "fast",
            "keepalive": settings.keepalive_s,
            "pidfile": data_path(settings.data_dir, MASTER_PIDFILE),
            "proc_name": "sira",
            "loglevel": settings.log_level.lower(),
            "accesslog": None,
            "graceful_timeout": 30,
            "timeout": 30,
            "limit_request_line": 8190,
            "limit_request_fields": 100,
            "limit_request_field_size": 16384,
            "post_fork": block_stop_signals,
            "post_worker_init": unblock_stop_signals_once_running,
            # `sira reload` is the control interface; gunicorn's control socket would add a thread
            # to the master (forks happen beside it) and one shared socket path for every instance.
            "control_socket_disable": True,
        }
        for name, value in options.items():
            self.cfg.set(name, value)
        if settings.gunicorn_config:
            self.load_config_from_file(settings.gunicorn_config)

    def run(self):
        """gunicorn's BaseApplication.run, with SIRA's arbiter (sidecars, SIGHUP as a model re-sync)."""
        try:
            SiraArbiter(self, self.sidecars).run()
        except RuntimeError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr)
            sys.exit(1)

    def load(self):
        """Runs in each worker after the fork: only here may onnxruntime be imported (app/config.py)."""
        from app.main import create_app

        return create_app(self.app_config)


def serve(settings: Settings, dsn: str) -> None:
    """Prepare shared state, then hand the process to gunicorn's arbiter until it stops."""
    os.makedirs(data_path(settings.data_dir), exist_ok=True)
    model_files, products = prepare_models(settings, dsn)
    app_config = AppConfig(
        model_files=model_files,
        expected_products=products,
        authenticator=build_authenticator(settings),
        max_body_bytes=settings.max_body_bytes,
        batch_max=settings.batch_max,
    )
    SiraApplication(settings, app_config).run()
