"""Keep a growing agent chat inside the model's context, and survive a lost worker.

FastChat answers a prompt longer than the context with error 40303, stating both token
counts. The transports here catch exactly that answer, drop the oldest turns (never the
system message or the newest message) by the stated overshoot plus room to answer, and
resend. Nothing is trimmed while the chat fits, and the server does the counting, so no
tokenizer is needed here. Used by openai 0.28 (legacy AutoGen) through a requests adapter
and by openai>=1 clients (classic AutoGen, ag2, agentchat) through a transport of the HTTP
library their SDK sends with: httpx up to openai 2.x, httpx2 from openai 3 on (openai 3
depends on httpx2 only and ag2 1.x types its ``http_client`` as ``httpx2.AsyncClient``).
httpx2 kept httpx's transport API, so one implementation serves both; the classes are
made per library when first asked for, and neither library is imported before that.

The same transports retry a request once when the API server says its worker died or is
unreachable (HTTP 503, code 50006): FastChat's controller dispatches the retry to another
registered worker, so an agent chat loses no turn when one of several workers goes away.
"""
from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import re
import time
from types import SimpleNamespace
from typing import List, Optional

CONTEXT_OVERFLOW = 40303  # FastChat's ErrorCode.CONTEXT_OVERFLOW
WORKER_LOST = 50006  # FastChat's CONTROLLER_WORKER_TIMEOUT, as fastchat_bigdl's API server answers it
MAX_RESENDS = 6
RETRY_DELAY = 0.5
_COUNTS = re.compile(r"maximum context length is (\d+) tokens\. However, your messages resulted in (\d+) tokens")


def overflow_counts(error_body: bytes) -> Optional[tuple]:
    """(context_length, prompt_tokens) from a FastChat 40303 answer, else None."""
    try:
        body = json.loads(error_body)
    except (ValueError, TypeError):
        return None
    if not isinstance(body, dict) or body.get("code") != CONTEXT_OVERFLOW:
        return None
    match = _COUNTS.search(str(body.get("message", "")))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _chars(message: dict) -> int:
    content = message.get("content")
    return len(content) if isinstance(content, str) else len(json.dumps(content or ""))


def trim_messages(messages: List[dict], context_length: int, prompt_tokens: int) -> Optional[List[dict]]:
    """Drop the oldest turns so the prompt fits with room to answer; None if it cannot.

    Token counts are spread over characters pro rata, which is good enough here because
    the server re-checks and the caller resends until it fits.
    """
    head = [m for m in messages[:1] if m.get("role") == "system"]
    body = messages[len(head):]
    if len(body) <= 1:
        return None
    reserve = min(256, context_length // 4)  # leave the model room to answer
    excess = prompt_tokens - (context_length - reserve)
    tokens_per_char = prompt_tokens / max(1, sum(_chars(m) for m in messages))
    dropped, removed = 0, 0.0
    while dropped < len(body) - 1 and (removed < excess or dropped == 0):
        removed += _chars(body[dropped]) * tokens_per_char
        dropped += 1
    # Start on a user turn: many chat templates expect user/assistant alternation.
    while dropped < len(body) - 1 and body[dropped].get("role") != "user":
        dropped += 1
    return head + body[dropped:]


def _retrimmed(request_body: bytes, error_body: bytes) -> Optional[bytes]:
    counts = overflow_counts(error_body)
    if counts is None:
        return None
    try:
        payload = json.loads(request_body)
    except (ValueError, TypeError):
        return None
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        return None
    trimmed = trim_messages(messages, *counts)
    if trimmed is None:
        return None
    payload["messages"] = trimmed
    return json.dumps(payload).encode()


def worker_lost(status: int, body: bytes) -> bool:
    if status != 503:
        return False
    try:
        return json.loads(body).get("code") == WORKER_LOST
    except (ValueError, TypeError, AttributeError):
        return False


def _is_chat(url: str) -> bool:
    return str(url).rstrip("/").endswith("/chat/completions")


class _TrimmingTransport:
    """The sync transport's logic; transport_classes() mixes it into the library's
    BaseTransport (httpx and httpx2 share that API: one implementation serves both)."""

    library = None  # the httpx or httpx2 module, set on the made class

    def __init__(self, inner=None):
        self.inner = inner or self.library.HTTPTransport()

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        if response.status_code == 503 and worker_lost(503, response.read()):
            response.close()
            time.sleep(RETRY_DELAY)
            response = self.inner.handle_request(request)
        if not _is_chat(request.url):
            return response
        for _ in range(MAX_RESENDS):
            if response.status_code != 400:
                return response
            error = response.read()
            content = _retrimmed(request.read(), error)
            if content is None:
                return response
            response.close()
            request = _resend(request, content)
            response = self.inner.handle_request(request)
        return response

    def close(self):
        self.inner.close()


class _AsyncTrimmingTransport:
    """The same for the async clients (autogen-agentchat, ag2 1.x)."""

    library = None

    def __init__(self, inner=None):
        self.inner = inner or self.library.AsyncHTTPTransport()

    async def handle_async_request(self, request):
        response = await self.inner.handle_async_request(request)
        if response.status_code == 503 and worker_lost(503, await response.aread()):
            await response.aclose()
            await asyncio.sleep(RETRY_DELAY)
            response = await self.inner.handle_async_request(request)
        if not _is_chat(request.url):
            return response
        for _ in range(MAX_RESENDS):
            if response.status_code != 400:
                return response
            error = await response.aread()
            content = _retrimmed(await request.aread(), error)
            if content is None:
                return response
            await response.aclose()
            request = _resend(request, content)
            response = await self.inner.handle_async_request(request)
        return response

    async def aclose(self):
        await self.inner.aclose()


class _SharedOnCopy:
    """AutoGen deep-copies llm_config; share the client instead of copying sockets."""

    def __deepcopy__(self, memo):
        return self


def _resend(request, content: bytes):
    """The request again with a new body (same library: the request's own class)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    return type(request)(request.method, request.url, headers=headers, content=content,
                         extensions=request.extensions)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def http_library() -> str:
    """The HTTP library the installed openai SDK sends with, read from package metadata:
    httpx2 from openai 3 on, httpx before; if that one is missing (or openai is), the
    other. Raises ImportError when neither is installed (openai 0.28 has neither)."""
    try:
        major = int(importlib.metadata.version("openai").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        major = None
    order = ("httpx", "httpx2") if major is not None and major < 3 else ("httpx2", "httpx")
    for name in order:
        if _installed(name):
            return name
    raise ImportError("history limiting for openai>=1 needs httpx2 (openai 3+) or httpx (openai 1.x, 2.x)")


def transport_classes(library: Optional[str] = None) -> SimpleNamespace:
    """The trimming transports and shared clients on ``library`` ("httpx" or "httpx2";
    default: http_library()). Made once per library, so isinstance checks hold."""
    return _made(library or http_library())


@functools.lru_cache(maxsize=None)
def _made(library: str) -> SimpleNamespace:
    http = importlib.import_module(library)

    def made(name, mixin, base):
        return type(name, (mixin, base), {"library": http, "__module__": __name__, "__qualname__": name})

    return SimpleNamespace(
        library=http,
        transport=made("HistoryTrimmingTransport", _TrimmingTransport, http.BaseTransport),
        async_transport=made("AsyncHistoryTrimmingTransport", _AsyncTrimmingTransport, http.AsyncBaseTransport),
        client=made("CopyableClient", _SharedOnCopy, http.Client),
        async_client=made("CopyableAsyncClient", _SharedOnCopy, http.AsyncClient),
    )


def trimming_client(timeout: float, library: Optional[str] = None):
    """A sync client (httpx2.Client or httpx.Client, see http_library()) that trims."""
    made = transport_classes(library)
    return made.client(transport=made.transport(), timeout=timeout)


def async_trimming_client(timeout: float, library: Optional[str] = None):
    """The async client (httpx2.AsyncClient or httpx.AsyncClient) that trims."""
    made = transport_classes(library)
    return made.async_client(transport=made.async_transport(), timeout=timeout)


def trimming_requests_session():
    """A requests.Session for openai 0.28 (``openai.requestssession``) that does the same."""
    import requests
    from requests.adapters import HTTPAdapter

    class HistoryTrimmingAdapter(HTTPAdapter):
        def send(self, request, **kwargs):
            response = super().send(request, **kwargs)
            if worker_lost(response.status_code, response.content):
                time.sleep(RETRY_DELAY)
                response = super().send(request, **kwargs)
            if not _is_chat(request.url):
                return response
            for _ in range(MAX_RESENDS):
                if response.status_code != 400:
                    return response
                content = _retrimmed(request.body, response.content)
                if content is None:
                    return response
                request = request.copy()
                request.prepare_body(data=content, files=None)
                response = super().send(request, **kwargs)
            return response

    session = requests.Session()
    adapter = HistoryTrimmingAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
