"""SIRA's HTTP worker: gunicorn's asgi worker, failing closed on TLS and bounding slow clients.

What gunicorn 27's asgi worker does on its own, read in gunicorn/workers/gasgi.py and
gunicorn/asgi/protocol.py and seen on a live server:

- TLS: every listener is wrapped with the context of `gunicorn.sock.ssl_context`; but when that
  context fails to build, the worker logs the error and serves *cleartext* on the https port.
  `SiraAsgiWorker` exits instead (WORKER_BOOT_ERROR, so the master stops).
- A new connection has no deadline for its first request: the keep-alive timer is armed only
  after a response, so a client that connects and sends nothing, or sends its headers a byte at
  a time (slowloris), holds the connection forever. `SiraProtocol` closes a connection that has
  not sent its first request's headers within SIRA_HEADER_TIMEOUT_S. Later requests on the
  connection are bounded by the keep-alive timer, which runs until their headers are in.
- A request body: each wait for the next chunk is bounded by gunicorn's `timeout` (30 s), the
  whole body by nothing, so a byte every 29 s holds the request forever. `SiraProtocol` gives a
  body SIRA_BODY_TIMEOUT_S from the moment it is found unfinished after a read (a body that comes
  with its headers never arms the timer); past it the app's `receive` returns `http.disconnect`,
  which app/http/body_deadline.py answers with 408.
- The TLS handshake itself is bounded by asyncio's default ssl_handshake_timeout (60 s).
- `worker_connections` is not enforced by this worker: idle connections cost memory and a file
  descriptor each until the header timeout closes them.
- SIGHUP: gunicorn's asgi worker leaves it at its default action (the worker dies). The master
  sends it to ask for the secret files to be re-read (workers/credentials.py); `SiraAsgiWorker`
  handles it in its event loop, between requests, by calling the app's `reload_secrets`.
"""

from __future__ import annotations

import signal

from gunicorn import sock
from gunicorn.arbiter import Arbiter
from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi
from gunicorn.workers.gasgi import ASGIWorker

HEADER_TIMEOUT_S = 10.0  # SIRA_HEADER_TIMEOUT_S's default; the serving app sets its own
BODY_TIMEOUT_S = 10.0  # SIRA_BODY_TIMEOUT_S's default


class SiraProtocol(ASGIProtocol):
    """gunicorn's HTTP/1 protocol with deadlines for the first request's headers and for every body."""

    header_timeout_s = HEADER_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S

    @classmethod
    def _check_h1c_protocol_available(cls):
        # gunicorn caches the C parser's capabilities on the class this is called on, but reads
        # them from ASGIProtocol: probe (and cache) on ASGIProtocol itself.
        return ASGIProtocol._check_h1c_protocol_available()

    def connection_made(self, transport):
        self._first_request_timer = None
        self._body_timer = None
        super().connection_made(transport)
        if self._callback_parser is not None and not self._closed:
            self._first_request_timer = self.worker.loop.call_later(self.header_timeout_s,
                                                                    self._first_request_timed_out)

    def _on_headers_complete(self):
        self._cancel_first_request_timer()
        return super()._on_headers_complete()

    def data_received(self, data):
        super().data_received(data)
        receiver = self._body_receiver
        if receiver is not None and self._body_timer is None and not receiver._complete and not self._closed:
            self._body_timer = self.worker.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def _on_message_complete(self):
        self._cancel_body_timer()
        super()._on_message_complete()

    def connection_lost(self, exc):
        self._cancel_first_request_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def _cancel_body_timer(self):
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self):
        """The app's next (or pending) receive returns http.disconnect, as when gunicorn's chunk wait expires."""
        self._body_timer = None
        receiver = self._body_receiver
        if receiver is not None and not receiver._complete:
            self.log.debug("request body unfinished after %.1fs", self.body_timeout_s)
            receiver._body_wait_expired = True
            receiver._wake_waiter()

    def _cancel_first_request_timer(self):
        if self._first_request_timer is not None:
            self._first_request_timer.cancel()
            self._first_request_timer = None

    def _first_request_timed_out(self):
        """Close the connection, as gunicorn's keep-alive timer does for an idle one."""
        self._first_request_timer = None
        self.log.debug("closing a connection that sent no complete request headers in %.1fs",
                       self.header_timeout_s)
        self._keepalive_timeout()


class SiraAsgiWorker(ASGIWorker):
    """The asgi worker with SiraProtocol, and no cleartext fallback when TLS is configured."""

    def init_process(self):
        SiraProtocol.header_timeout_s = getattr(self.app, "header_timeout_s", HEADER_TIMEOUT_S)
        SiraProtocol.body_timeout_s = getattr(self.app, "body_timeout_s", BODY_TIMEOUT_S)
        # gasgi creates each connection's protocol by this module-level name (`_serve`); rebinding
        # it here, after the fork, changes this worker process only.
        gasgi.ASGIProtocol = SiraProtocol
        super().init_process()

    def init_signals(self):
        super().init_signals()
        self.loop.add_signal_handler(signal.SIGHUP, self.handle_hup_signal)

    def handle_hup_signal(self):
        """Runs as a loop callback, not in the signal handler: a few small files are read."""
        reload_secrets = getattr(self.app, "reload_secrets", None)
        if reload_secrets is not None:
            reload_secrets()

    def _get_ssl_context(self):
        if not self.cfg.is_ssl:
            return None
        try:
            return sock.ssl_context(self.cfg)
        except Exception as exc:  # noqa: BLE001 (OpenSSL, a file, an ssl_context hook: never serve cleartext)
            self.log.error("cannot build the TLS context, not serving: %s", exc)
            raise SystemExit(Arbiter.WORKER_BOOT_ERROR) from None
