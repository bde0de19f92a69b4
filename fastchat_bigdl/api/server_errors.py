"""Failures behind the OpenAI API server, as clear errors in FastChat's schema."""
from __future__ import annotations

import json
import logging
from typing import List, Optional

from fastchat.constants import ErrorCode

from fastchat_bigdl.common.errors import error_response

logger = logging.getLogger(__name__)


class ClearServerErrors:
    """Failures behind the API server (a worker that died or cannot be reached) become a
    clear error in FastChat's schema instead of a bare 500 or a cut connection: before the
    answer started, HTTP 503 (unreachable worker) or 500 (anything else, details in the
    server log); in the middle of an event stream, an error event and ``[DONE]``.

    A request whose worker cannot be reached before anything was answered is not lost
    while another worker serves the model: the controller, which keeps handing out a dead
    worker until its heartbeat expires (90 s), is asked to re-check its workers at once
    (FastChat's ``/refresh_all_workers`` drops those that do not answer), and the request
    is sent again."""

    def __init__(self, app, max_retries: int = 2):
        self.app, self.max_retries = app, max_retries

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received: List[dict] = []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                received.append(message)
            return message

        for attempt in range(self.max_retries + 1):
            replay = recording_receive if attempt == 0 else _replay(received, receive)
            if not await self._serve(scope, replay, send, received, last=attempt == self.max_retries):
                return

    async def _serve(self, scope, receive, send, received: List[dict], last: bool) -> bool:
        """Serve once; True when the request should be sent again (its worker was
        unreachable, nothing was answered, and the controller still has another)."""
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
            return False
        except Exception as exc:  # noqa: BLE001 - reported to the client below, logged here
            unreachable = _is_transport_error(exc)
            if unreachable and not state["started"] and not last and await _another_worker_serves(received):
                logger.warning("%s: the worker could not be reached (%s); sent again to another worker",
                               scope.get("path"), type(exc).__name__)
                return True
            logger.exception("request to %s failed", scope.get("path"))
            code = ErrorCode.CONTROLLER_WORKER_TIMEOUT if unreachable else ErrorCode.INTERNAL_ERROR
            message = ("the model worker stopped or cannot be reached; retry shortly (a restarted or "
                       "another worker takes over once registered)") if unreachable else (
                f"internal error ({type(exc).__name__}); the server log has the details")
            if not state["started"]:
                await error_response(code, message, status=503 if unreachable else 500)(scope, receive, send)
                return False
            if state["event_stream"] and not state["finished"]:
                error = {"object": "error", "code": int(code), "message": message}
                await send({"type": "http.response.body", "more_body": False,
                            "body": f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()})
                return False
            raise


def _replay(messages: List[dict], receive):
    """A ``receive`` that hands out the recorded body again, then the client's next messages."""
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


async def _another_worker_serves(received: List[dict]) -> bool:
    """Have the controller drop workers that do not answer, then say whether one still
    serves the requested model (read from the body the request was sent with)."""
    import httpx
    from fastchat.serve.openai_api_server import app_settings

    try:
        model = json.loads(b"".join(m.get("body", b"") for m in received)).get("model")
    except (ValueError, AttributeError):
        return False
    if not isinstance(model, str):
        return False
    controller = app_settings.controller_address
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await client.post(controller + "/refresh_all_workers")
            response = await client.post(controller + "/get_worker_address", json={"model": model})
        return bool(response.json().get("address"))
    except (httpx.HTTPError, ValueError):
        return False


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
