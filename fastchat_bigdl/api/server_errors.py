"""Failures behind the OpenAI API server, as clear errors in FastChat's schema."""
from __future__ import annotations

import json
import logging
from typing import Optional

from fastchat.constants import ErrorCode

from fastchat_bigdl.common.errors import error_response

logger = logging.getLogger(__name__)


class ClearServerErrors:
    """Failures behind the API server (a worker that died or cannot be reached) become a
    clear error in FastChat's schema instead of a bare 500 or a cut connection: before the
    answer started, HTTP 503 (unreachable worker) or 500 (anything else, details in the
    server log); in the middle of an event stream, an error event and ``[DONE]``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "event_stream": False, "finished": False}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                headers = dict(message.get("headers") or [])
                state["event_stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["finished"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - reported to the client below, logged here
            logger.exception("request to %s failed", scope.get("path"))
            unreachable = _is_transport_error(exc)
            code = ErrorCode.CONTROLLER_WORKER_TIMEOUT if unreachable else ErrorCode.INTERNAL_ERROR
            message = ("the model worker stopped or cannot be reached; retry shortly (a restarted or "
                       "another worker takes over once registered)") if unreachable else (
                f"internal error ({type(exc).__name__}); the server log has the details")
            if not state["started"]:
                return await error_response(code, message, status=503 if unreachable else 500)(scope, receive, send)
            if state["event_stream"] and not state["finished"]:
                error = {"object": "error", "code": int(code), "message": message}
                await send({"type": "http.response.body", "more_body": False,
                            "body": f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()})
                return
            raise


def _is_transport_error(exc: Optional[BaseException]) -> bool:
    """Whether a failure to reach a worker is behind ``exc`` (through causes and the
    exception groups that streaming responses raise)."""
    import httpx

    if exc is None:
        return False
    if isinstance(exc, (httpx.TransportError, ConnectionError)):
        return True
    if any(_is_transport_error(e) for e in getattr(exc, "exceptions", ())):
        return True
    return _is_transport_error(exc.__cause__ or exc.__context__)
