"""Give AutoGen the local defaults at run time, reversibly, without touching a file."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional

from autogen_local.endpoint import DEFAULT_TIMEOUT, resolve_api_key, resolve_base_url
from autogen_local.flavor import LEGACY, detect_flavor
from autogen_local.netenv import bypass_proxy_for_loopback

OPENAI_PUBLIC_BASE = "https://api.openai.com/v1"
_undo: List[Callable[[], None]] = []


def _set_attr(obj, name: str, value) -> None:
    old = getattr(obj, name)
    setattr(obj, name, value)
    _undo.append(lambda: setattr(obj, name, old))


def _set_env(name: str, value: str) -> None:
    old = os.environ.get(name)
    os.environ[name] = value
    _undo.append(lambda: os.environ.pop(name, None) if old is None else os.environ.__setitem__(name, old))


def _forget_cached_session() -> None:
    """openai 0.28 caches its requests session per thread; drop this thread's so the
    (un)patched ``openai.requestssession`` takes effect on the next call."""
    from openai import api_requestor

    context = getattr(api_requestor, "_thread_context", None)
    if context is not None and hasattr(context, "session"):
        context.session.close()
        del context.session


def is_patched() -> bool:
    return bool(_undo)


def patch(base_url: Optional[str] = None, api_key: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
          flavor: Optional[str] = None, history_limit: bool = True) -> str:
    """Point AutoGen's defaults at the local server; returns what was done.

    Legacy pyautogen 0.1.x (openai<1): ``openai.api_key`` (if unset) / ``openai.api_base``
    (if still OpenAI's) and ``Completion.request_timeout`` get the local values, and
    openai's requests session drops the oldest turns on context overflow. This is what
    users did by editing ``autogen/oai/completion.py``.
    Classic / agentchat (openai>=1): OPENAI_API_KEY and OPENAI_BASE_URL are set where
    unset, which is all a plain ``config_list`` without a key needs; ``config()`` /
    ``model_client()`` are the better way there.
    Idempotent; ``unpatch()`` or the ``patched()`` context manager restores everything.
    """
    if is_patched():
        return "already patched"
    bypass_proxy_for_loopback()
    base_url, api_key = resolve_base_url(base_url), resolve_api_key(api_key)
    if (flavor or detect_flavor()) == LEGACY:
        import openai
        from autogen import oai

        if not openai.api_key:
            _set_attr(openai, "api_key", api_key)
        if openai.api_base in (None, OPENAI_PUBLIC_BASE):
            _set_attr(openai, "api_base", base_url)
        _set_attr(oai.Completion, "request_timeout", timeout)
        if history_limit:
            from autogen_local.history import trimming_requests_session

            _set_attr(openai, "requestssession", trimming_requests_session())
        _forget_cached_session()
        _undo.append(_forget_cached_session)
        return f"legacy AutoGen: openai.api_base={openai.api_base}, request_timeout={timeout}"
    if not os.environ.get("OPENAI_API_KEY"):
        _set_env("OPENAI_API_KEY", api_key)
    if not os.environ.get("OPENAI_BASE_URL"):
        _set_env("OPENAI_BASE_URL", base_url)
    return (f"openai>=1 AutoGen: OPENAI_BASE_URL={os.environ['OPENAI_BASE_URL']}; "
            "pass autogen_local.config() as llm_config for timeouts and history limiting")


def unpatch() -> None:
    while _undo:
        _undo.pop()()


@contextlib.contextmanager
def patched(**kwargs):
    already = is_patched()
    patch(**kwargs)
    try:
        yield
    finally:
        if not already:
            unpatch()
