"""llm_config for the installed AutoGen, pointed at the local FastChat API."""
from __future__ import annotations

from typing import Optional, Union

from autogen_local import history
from autogen_local.endpoint import (
    DEFAULT_TIMEOUT,
    list_models,
    only_model,
    resolve_api_key,
    resolve_base_url,
    wait_ready,
)
from autogen_local.flavor import AG2, AGENTCHAT, CLASSIC, LEGACY, detect_flavor
from autogen_local.netenv import bypass_proxy_for_loopback

# Local decode runs at tens of tokens a second and small models rarely stop on their own:
# without a cap, one agent turn can run to the end of the context (minutes).
DEFAULT_MAX_TOKENS = 512

# autogen-agentchat refuses model names it does not know unless told what they can do.
# fastchat-bigdl's API server calls tools and answers in JSON (constrained to the schema).
LOCAL_MODEL_INFO = {
    "vision": False,
    "function_calling": True,
    "json_output": True,
    "structured_output": True,
    "family": "unknown",
}


def _model(model: Optional[str], base_url: str, api_key: str, wait: Union[bool, float]) -> str:
    if wait:
        ready_timeout = DEFAULT_TIMEOUT if wait is True else float(wait)
        return wait_ready(base_url, model, timeout=ready_timeout, api_key=api_key)
    return model or only_model(list_models(base_url, api_key), base_url)


def config(
    model: Optional[str] = None,
    base_url: Optional[str] = None,
    api_key: Optional[str] = None,
    timeout: float = DEFAULT_TIMEOUT,
    wait: Union[bool, float] = True,
    *,
    flavor: Optional[str] = None,
    history_limit: bool = True,
    max_tokens: Optional[int] = DEFAULT_MAX_TOKENS,
    **extra,
) -> dict:
    """The llm_config the installed AutoGen expects, for the local server.

    base_url: argument, else $FASTCHAT_BIGDL_BASE_URL, else http://127.0.0.1:8000/v1.
    api_key: argument, else $OPENAI_API_KEY, else "EMPTY".
    model=None takes the only model the server lists. wait=True (or a number of
    seconds) first waits until the model answers. history_limit drops the oldest turns
    when the server says the chat no longer fits the context (classic, ag2, agentchat:
    an ``http_client`` here; legacy: through ``patch()``). max_tokens caps each reply
    (default 512; None sends no cap and the server's own default applies). ``extra`` is
    merged last.
    """
    bypass_proxy_for_loopback()
    base_url, api_key = resolve_base_url(base_url), resolve_api_key(api_key)
    model = _model(model, base_url, api_key, wait)
    flavor = flavor or detect_flavor()
    if flavor == LEGACY:
        llm_config = {
            "config_list": [{"model": model, "api_base": base_url, "api_key": api_key}],
            "request_timeout": timeout,
        }
    elif flavor == CLASSIC:
        entry = {"model": model, "base_url": base_url, "api_key": api_key, "price": [0, 0]}
        if history_limit:
            entry["http_client"] = history.trimming_client(timeout)
        llm_config = {"config_list": [entry], "timeout": timeout, "cache_seed": None}
    elif flavor in (AG2, AGENTCHAT):
        # keyword arguments of ag2's OpenAIConfig / autogen_ext's OpenAIChatCompletionClient
        llm_config = {"model": model, "base_url": base_url, "api_key": api_key, "timeout": timeout}
        if flavor == AGENTCHAT:
            llm_config["model_info"] = dict(LOCAL_MODEL_INFO)
        if history_limit:
            llm_config["http_client"] = history.async_trimming_client(timeout)
    else:
        raise ValueError(f"unknown AutoGen flavor {flavor!r}")
    if max_tokens is not None:  # a create() argument in every flavor's llm_config
        llm_config["max_tokens"] = max_tokens
    llm_config.update(extra)
    return llm_config


def model_client(model: Optional[str] = None, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: float = DEFAULT_TIMEOUT, wait: Union[bool, float] = True, **options):
    """An autogen-agentchat (0.4+) ``OpenAIChatCompletionClient`` for the local server;
    ``options`` (history_limit, max_tokens, extra keywords) as for ``config()``."""
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    return OpenAIChatCompletionClient(**config(model, base_url, api_key, timeout, wait, flavor=AGENTCHAT, **options))


def model_config(model: Optional[str] = None, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: float = DEFAULT_TIMEOUT, wait: Union[bool, float] = True, **options):
    """An ag2 (1.x) ``OpenAIConfig`` for the local server, ``ag2.Agent(..., config=model_config())``;
    ``options`` as for ``config()``."""
    from ag2.config.openai import OpenAIConfig

    return OpenAIConfig(**config(model, base_url, api_key, timeout, wait, flavor=AG2, **options))
