"""Where the local OpenAI-compatible API is, and whether it is ready (stdlib only)."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import List, Optional, Tuple

from autogen_local.netenv import LOOPBACK_HOSTS

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
BASE_URL_ENV = "FASTCHAT_BIGDL_BASE_URL"
DEFAULT_API_KEY = "EMPTY"  # FastChat accepts any key unless started with --api-keys
DEFAULT_TIMEOUT = 600.0  # local decode is slow: never the 60 s of the stock clients


class EndpointNotReady(RuntimeError):
    """The local server did not become ready; the message says what was seen."""


class ModelChoiceError(ValueError):
    """model=None but the server lists zero or several models."""


def resolve_base_url(base_url: Optional[str] = None) -> str:
    return (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")


def resolve_api_key(api_key: Optional[str] = None) -> str:
    return api_key or os.environ.get("OPENAI_API_KEY") or DEFAULT_API_KEY


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _opener_for(url: str):
    """Loopback never through a proxy, even one set after import (which is when the
    environment's NO_PROXY was merged); other hosts as the environment says."""
    if urllib.parse.urlsplit(url).hostname in LOOPBACK_HOSTS:
        return _DIRECT
    return urllib.request.build_opener()


def _request(url: str, api_key: str, body: Optional[dict] = None, timeout: float = 10.0) -> Tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={
        "Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    try:
        with _opener_for(url).open(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"{}")
        except ValueError:
            return err.code, {}


def list_models(base_url: Optional[str] = None, api_key: Optional[str] = None) -> List[str]:
    status, body = _request(resolve_base_url(base_url) + "/models", resolve_api_key(api_key))
    if status != 200:
        raise EndpointNotReady(f"GET {resolve_base_url(base_url)}/models answered {status}: {body}")
    return [m["id"] for m in body.get("data", [])]


def only_model(models: List[str], base_url: str) -> str:
    if len(models) == 1:
        return models[0]
    if not models:
        raise ModelChoiceError(f"{base_url}/models lists no model yet; is a worker running?")
    raise ModelChoiceError(
        f"{base_url}/models lists several models ({', '.join(models)}); pass model=... to choose one"
    )


def _completes_one_token(base_url: str, api_key: str, model: str) -> Tuple[bool, str]:
    status, body = _request(base_url + "/chat/completions", api_key, {
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, timeout=120)
    return status == 200, f"{status} {body.get('message', '')}".strip()


def wait_ready(base_url: Optional[str] = None, model: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
               api_key: Optional[str] = None, interval: float = 0.5) -> str:
    """Poll until ``/models`` lists ``model`` (or, if None, exactly one model) and a
    1-token chat completion succeeds; return the model name.

    This is what keeps FastChat's 40301 "Only ... allowed now" (the chat started before
    the worker registered) from ever reaching an agent.
    """
    base_url, api_key = resolve_base_url(base_url), resolve_api_key(api_key)
    deadline = time.monotonic() + timeout
    seen: List[str] = []
    last = "no answer"
    while True:
        try:
            seen = list_models(base_url, api_key)
            name = model or only_model(seen, base_url)
            if name in seen:
                ok, last = _completes_one_token(base_url, api_key, name)
                if ok:
                    return name
        except ModelChoiceError as exc:
            if len(seen) > 1:
                raise
            last = str(exc)
        except (OSError, EndpointNotReady, ValueError) as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise EndpointNotReady(
                f"{base_url} was not ready after {timeout:.0f} s: expected model "
                f"{model or '(the only one)'}, /models listed {seen or 'nothing'}; last answer: {last}"
            )
        time.sleep(interval)
