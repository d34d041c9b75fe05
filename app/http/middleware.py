"""Request id for every request and response (the client's X-Request-ID when it is sane)."""

from __future__ import annotations

import itertools
import os
import re

from conf.logs import REQUEST_ID

SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class RequestIdMiddleware:
    """Sets req.context.request_id and echoes it in X-Request-ID.

    A generated id is a per-process random prefix plus a counter: unique across workers and
    restarts, and cheaper than a uuid4 per request.
    """

    def __init__(self):
        self.prefix = os.urandom(6).hex() + "-"
        self.counter = itertools.count(1)

    async def process_request(self, req, resp):
        given = req.get_header("X-Request-ID")
        if given is not None and SANE_REQUEST_ID.fullmatch(given):
            req.context.request_id = given
        else:
            req.context.request_id = self.prefix + str(next(self.counter))
        REQUEST_ID.set(req.context.request_id)  # every log line of this request carries it

    async def process_response(self, req, resp, resource, req_succeeded):
        request_id = getattr(req.context, "request_id", None)
        if request_id is not None:
            resp.set_header("X-Request-ID", request_id)
        REQUEST_ID.set(None)  # the connection's next lines belong to no request until the next one
