"""Bounded waiting: FastChat's worker queues any number of requests behind its
``--limit-worker-concurrency`` slots, so an overloaded worker makes clients wait until
they time out. Past ``max_queued`` waiting requests this answers at once with FastChat's
ENGINE_OVERLOADED (42903) in the worker protocol; the API server turns it into a 4xx."""
from __future__ import annotations

import json

from fastchat.constants import ErrorCode
from starlette.responses import Response

GENERATE_ROUTES = {"/worker_generate_stream": b"\0", "/worker_generate": b""}


class AdmissionControl:
    def __init__(self, app, worker, max_queued: int):
        self.app, self.worker, self.max_queued = app, worker, max_queued

    def overloaded(self) -> bool:
        waiting = self.worker.get_queue_length() - self.worker.limit_worker_concurrency
        return waiting >= self.max_queued

    async def __call__(self, scope, receive, send):
        terminator = GENERATE_ROUTES.get(scope.get("path")) if scope["type"] == "http" else None
        if terminator is None or not self.overloaded():
            return await self.app(scope, receive, send)
        message = (f"The model is busy: {self.worker.limit_worker_concurrency} requests are running and "
                   f"{self.max_queued} are waiting. Retry in a moment.")
        body = json.dumps({"text": message, "error_code": int(ErrorCode.ENGINE_OVERLOADED)}).encode()
        await Response(body + terminator, media_type="application/json")(scope, receive, send)
