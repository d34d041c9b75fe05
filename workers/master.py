"""`sira serve`: the gunicorn master run as our own BaseApplication.

Before gunicorn starts, the master prepares everything the workers share: the database (embedded
or DATABASE_URL), migrations, the demo model on a first start, the shared-memory segments (the
control block among them). Workers are forked afterwards and each builds its Falcon app once; the
supervisor sidecar (workers/supervisor.py) fetches and checks the models and publishes them in the
control block, and the workers load them from there (app/store/swap.py).
"""

from __future__ import annotations

import logging
import os
import runpy
import signal
import sys
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.config import Config as GunicornConfig

from app.auth.ratelimit import rate_limit_segment_name, shared_rate_limits
from app.config import AppConfig
from app.dependencies import DEPENDENCIES_FILE
from app.scoring.cache import cache_segment_name, shared_cache
from app.store.buckets import open_model_store
from app.telemetry.tracing import tracing_from_environment
from conf.datadir import MASTER_PIDFILE, MODELS_DIR, WRITER_PIDFILE, data_path
from conf.logs import GunicornJsonLogger, access_log_enabled, set_process_role
from conf.settings import ConfigError, Settings, check_metrics_bind
from conf.tls import gunicorn_tls_options
from shm.control import ControlBlock
from shm.counters import CounterBlock
from shm.model_stats import stats_cells
from shm.segment import CONTROL_KIND, MODEL_STATS_KIND, RINGS_KIND, remove_segment, segment_name
from workers.arbiter import Sidecar, SiraArbiter, remove_pidfile
from workers.bootstrap import prepare_database_at_start
from workers.credentials import build_authenticator, reload_credentials
from workers.instance import dead_predecessor_segments, new_instance_id
from workers.metrics import mark_worker_dead, prepare_multiprocess_dir, remove_multiprocess_dir
from workers.model_cleanup import IN_USE_DIR
from workers.model_sync import first_model_sync
from workers.slots import assign_worker_slot, take_worker_slot
from workers.supervisor import supervisor_sidecar
from workers.writer_process import prediction_log_config, prediction_log_segments, writer_sidecar

log = logging.getLogger("sira.master")

# A stop takes at most: this (in-flight requests finish) + the arbiter's STOP_TIMEOUT_S (the writer's
# drain, and its handoff to the bucket). deploy/k8s's terminationGracePeriodSeconds covers both and
# the preStop sleep; tests/integration/test_deploy_k8s.py computes it from these constants.
GRACEFUL_TIMEOUT_S = 30

# Signals that stop a worker. One that arrives while a worker boots (before its event loop runs)
# is lost by the asgi worker, and the master then waits out the whole graceful timeout; so a worker
# blocks them from fork until its loop runs, and they are delivered then.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
# SIGHUP (re-read the secret files) is held the same way: until the worker's loop handles it, its
# default action would kill the worker.
HELD_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}


def block_stop_signals(server, worker) -> None:
    """gunicorn post_fork hook, in the new worker."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


def set_up_new_worker(server, worker) -> None:
    """gunicorn post_fork hook, in the new worker: stop signals held, prediction-log slot taken."""
    block_stop_signals(server, worker)
    take_worker_slot(server, worker)


def unblock_stop_signals_once_running(worker) -> None:
    """gunicorn post_worker_init hook: unblock as the worker's event loop's first act."""
    worker.loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, HELD_SIGNALS)


def prepare_models(settings: Settings, dsn: str) -> bool:
    """Migrations and the demo model on a first start, and the folder of local model files.

    False when DATABASE_URL (or the model store) did not answer: the supervisor finishes the job
    once it does (workers/bootstrap.py), and the first sync serves the registry snapshot.
    The models themselves are fetched and checked by the supervisor's code: once in the master
    before the fork (`first_model_sync`, so workers boot with them), then by the supervisor sidecar.
    The master never loads a model (app/config.py).
    """
    os.makedirs(data_path(settings.data_dir, MODELS_DIR, IN_USE_DIR), exist_ok=True)
    return prepare_database_at_start(dsn, open_model_store(settings), external=bool(settings.database_url))


def read_ops_config(path: str) -> dict[str, Any]:
    """The gunicorn settings an ops config file (SIRA_GUNICORN_CONFIG) sets, each checked by gunicorn.

    A file that does not run, or sets a bad value, is a ConfigError (exit 2) naming the file.
    Names that are not gunicorn settings (imports, helpers) are ignored, as gunicorn does.
    """
    try:
        namespace = runpy.run_path(path)
    except Exception as exc:  # whatever the file raises: it is the operator's file
        raise ConfigError(f"SIRA_GUNICORN_CONFIG: {path} does not load ({type(exc).__name__}: {exc})") from None
    probe, options = GunicornConfig(), {}
    for name, value in namespace.items():
        if name in probe.settings:
            try:
                probe.set(name, value)
            except Exception as exc:  # gunicorn's validators raise ValueError or TypeError
                raise ConfigError(f"SIRA_GUNICORN_CONFIG: {path} sets {name} to a bad value ({exc})") from None
            options[name] = value
    return options


class SiraApplication(BaseApplication):
    """gunicorn configured from conf/ (plus an optional ops config file), serving app.http.assembly."""

    def __init__(self, settings: Settings, app_config: AppConfig, sidecars: list[Sidecar] | None = None):
        self.settings = settings
        self.app_config = app_config
        self.sidecars = sidecars or []
        self.worker_slot: int | None = None  # this worker's prediction-log ring, set after the fork
        self.header_timeout_s = settings.header_timeout_s  # read by workers/http_worker.py
        self.body_timeout_s = settings.body_timeout_s
        self.ops_options = read_ops_config(settings.gunicorn_config) if settings.gunicorn_config else {}
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options = {
            # METRICS_BIND: a second listener of the same workers; app/telemetry/metrics.py limits its paths.
            "bind": [settings.bind] + ([settings.metrics_bind] if settings.metrics_bind else []),
            "workers": settings.workers,
            # gunicorn's asgi worker, with header and body timeouts and no cleartext fallback (workers/http_worker.py)
            "worker_class": "workers.http_worker.SiraAsgiWorker",
            "asgi_loop": "uvloop",
            "http_parser": "fast",
            "keepalive": settings.keepalive_s,
            "pidfile": data_path(settings.data_dir, MASTER_PIDFILE),
            "proc_name": "sira",
            "loglevel": settings.log_level.lower(),
            # JSON lines through the root handler (conf/logs.py); the access log only when asked.
            "logger_class": GunicornJsonLogger,
            "accesslog": "-" if access_log_enabled(settings.access_log, settings.log_level) else None,
            "graceful_timeout": GRACEFUL_TIMEOUT_S,
            "timeout": 30,
            "limit_request_line": 8190,
            "limit_request_fields": 100,
            "limit_request_field_size": 16384,
            "pre_fork": assign_worker_slot,
            "post_fork": set_up_new_worker,
            "post_worker_init": unblock_stop_signals_once_running,
            "child_exit": mark_worker_dead,  # its live gauges leave /metrics; its counters stay
            # `sira reload` is the control interface; gunicorn's control socket would add a thread
            # to the master (forks happen beside it) and one shared socket path for every instance.
            "control_socket_disable": True,
            # TLS on every listener, METRICS_BIND's too (gunicorn wraps them all); conf/tls.py checked the files
            **gunicorn_tls_options(settings.tls_cert, settings.tls_key, settings.tls_ca, settings.tls_client_auth),
        }
        for name, value in options.items():
            self.cfg.set(name, value)
        for name, value in self.ops_options.items():
            self.cfg.set(name, value)

    def run(self):
        """gunicorn's BaseApplication.run, with SIRA's arbiter (sidecars, SIGHUP as a model re-sync)."""
        try:
            SiraArbiter(self, self.sidecars).run()
        except RuntimeError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr)
            sys.exit(1)

    def reload_secrets(self) -> bool:
        """SIGHUP, in the master and then in each worker: re-read the secret files (workers/credentials.py)."""
        return reload_credentials(self.settings, self.app_config.authenticator)

    def load(self):
        """Runs in each worker after the fork: only here may onnxruntime be imported (app/config.py)."""
        from app.http.assembly import create_worker_app

        return create_worker_app(self.app_config, self.settings.body_timeout_s, worker_slot=self.worker_slot)


def take_over_predecessors(instance_id: str) -> tuple[str, ...]:
    """What dead instances of this data dir left in /dev/shm: their rings to drain, the rest removed.

    Called with the data dir lock held (workers/instance.py), so none of them runs. Their queue rings
    may hold answered predictions that never reached Postgres: the writer drains them and then
    removes them. Every other segment (control block, cache, counters) only served the dead
    instance and goes now.
    """
    rings = []
    for left in dead_predecessor_segments(instance_id):
        if left.kind == RINGS_KIND:
            rings.append(left.name)
        else:
            remove_segment(left.name)
    if rings:
        log.warning("taking over the prediction rings a stopped instance of this data dir left: %s",
                    ", ".join(rings))
    return tuple(rings)


def serve(settings: Settings, dsn: str) -> None:
    """Prepare shared state, then hand the process to gunicorn's arbiter until it stops."""
    set_process_role("master")
    check_metrics_bind(settings.bind, settings.metrics_bind)  # --bind may have moved SIRA_BIND
    os.makedirs(data_path(settings.data_dir), exist_ok=True)
    # With the data dir lock held, a pidfile is a dead predecessor's: gunicorn would refuse to start if
    # its pid now named another process (pids restart with a container).
    remove_pidfile(data_path(settings.data_dir, MASTER_PIDFILE))
    metrics_folder = prepare_multiprocess_dir(settings.data_dir)  # before anything forks: children inherit it
    database_ready = prepare_models(settings, dsn)
    instance_id = new_instance_id(settings.data_dir)  # names this serve's shm segments
    adopted_rings = take_over_predecessors(instance_id)
    control_segment = segment_name(instance_id, CONTROL_KIND)
    model_stats_segment = segment_name(instance_id, MODEL_STATS_KIND)
    app_config = AppConfig(
        model_files=[],  # the workers serve the supervisor's generations (control_segment)
        expected_products=[],
        control_segment=control_segment,
        models_in_use_dir=data_path(settings.data_dir, MODELS_DIR, IN_USE_DIR),
        authenticator=build_authenticator(settings),
        max_body_bytes=settings.max_body_bytes,
        batch_max=settings.batch_max,
        outcomes_batch_max=settings.outcomes_batch_max,
        cache_segment=cache_segment_name(instance_id, settings.cache_max_items),
        model_stats_segment=model_stats_segment,
        canary_budget_ms=settings.canary_budget_ms,
        database_url=dsn,
        prediction_log=prediction_log_config(settings, dsn, instance_id, adopted_rings),
        metrics_port=int(settings.metrics_bind.rpartition(":")[2]) if settings.metrics_bind else None,
        metrics_on_main_port=settings.metrics_on_main_port,
        openapi_feature_specs=settings.openapi_feature_specs,
        rate_limit_segment=rate_limit_segment_name(instance_id),
        rate_limits=settings.rate_limits,
        dependencies_file=data_path(settings.data_dir, DEPENDENCIES_FILE),  # /readyz shows it
        tracing=tracing_from_environment(),  # only checked here: each worker sets the SDK up after the fork
    )
    writer = writer_sidecar(app_config.prediction_log, data_path(settings.data_dir, WRITER_PIDFILE))
    supervisor = supervisor_sidecar(settings, dsn, control_segment, model_stats_segment,
                                    bootstrap_pending=not database_ready)
    master_pid = os.getpid()
    try:
        with ControlBlock.create(control_segment) as control, \
                CounterBlock.create(model_stats_segment, stats_cells(settings.workers)), \
                shared_cache(app_config.cache_segment, settings.cache_max_items, settings.cache_ttl_ms), \
                shared_rate_limits(app_config.rate_limit_segment), \
                prediction_log_segments(app_config.prediction_log):
            first_model_sync(settings, dsn, control)  # workers boot with the models; the supervisor goes on
            SiraApplication(settings, app_config, [supervisor, writer]).run()
    finally:
        if os.getpid() == master_pid:  # forked workers unwind this stack too
            remove_multiprocess_dir(metrics_folder)
