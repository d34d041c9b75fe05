"""The ceiling of SIRA's own stack: Falcon + gunicorn + onnxruntime, no auth, cache or log.

`asgi_app` runs on gunicorn's asgi worker (uvloop); `wsgi_app` on the sync or gthread workers, for
the worker-class comparison (bench/worker_classes.py).
"""

from __future__ import annotations

import falcon
import falcon.asgi
import falcon.media
import orjson

from bench.peers.common import load_demo_model, score_body

MODEL = load_demo_model()
HANDLER = falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)


class AsyncInfer:
    async def on_post(self, req, resp):
        resp.media = score_body(MODEL, await req.get_media())


class SyncInfer:
    def on_post(self, req, resp):
        resp.media = score_body(MODEL, req.get_media())


def configure(app):
    app.req_options.media_handlers = falcon.media.Handlers({falcon.MEDIA_JSON: HANDLER})
    app.resp_options.media_handlers = falcon.media.Handlers({falcon.MEDIA_JSON: HANDLER})
    return app


asgi_app = configure(falcon.asgi.App())
asgi_app.add_route("/v1/infer", AsyncInfer())
wsgi_app = configure(falcon.App())
wsgi_app.add_route("/v1/infer", SyncInfer())
