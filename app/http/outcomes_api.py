"""POST /v1/outcomes: labels of payment events (fraud or legit), answered item by item (app/outcomes.py).

The body is ``{"outcomes": [...]}``, at most ``SIRA_OUTCOMES_BATCH_MAX`` items; a body that is not
that is 400 (413 when too large), and nothing of it is kept. Otherwise the answer is 200 with one
entry per item, in order: ``kept``, ``duplicate``, or the item's error in the error schema with its
``status`` (400 a wrong item, 404 an event no prediction was logged for), and the counts. The good
items are kept whatever the others did.
"""

from __future__ import annotations

import logging

from app.db import Database
from app.errors import InvalidRequest
from app.http.requests import read_json_object
from app.outcomes import record_outcomes

log = logging.getLogger("sira.outcomes")

ITEM_MAX_BYTES = 512  # a generous outcome, with its JSON punctuation: the body's size limit follows the count


class OutcomesResource:
    auth_actions = {"POST": "outcomes:write"}

    def __init__(self, database: Database, batch_max: int):
        self.database = database
        self.batch_max = batch_max

    async def on_post(self, req, resp):
        body = await read_json_object(req, 1024 + self.batch_max * ITEM_MAX_BYTES)
        items = body.get("outcomes")
        if set(body) != {"outcomes"} or not isinstance(items, list) or not items:
            raise InvalidRequest('the body must be {"outcomes": [...]} with at least one outcome',
                                 {"field": "outcomes"})
        if len(items) > self.batch_max:
            raise InvalidRequest(f"at most {self.batch_max} outcomes in one request, got {len(items)}",
                                 {"field": "outcomes", "limit": self.batch_max, "count": len(items)})
        request_id = getattr(req.context, "request_id", None)
        async with self.database.connection() as conn:
            answers = await record_outcomes(conn, items, request_id)
        counts = {status: sum(1 for answer in answers if answer["status"] == status)
                  for status in ("kept", "duplicate")}
        errors = len(answers) - counts["kept"] - counts["duplicate"]
        if errors:
            log.info("outcomes: %d kept, %d duplicates, %d refused (request %s)", counts["kept"],
                     counts["duplicate"], errors, request_id)
        resp.media = {"results": answers, **counts, "errors": errors}
