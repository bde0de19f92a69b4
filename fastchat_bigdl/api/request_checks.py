"""Checks of the OpenAI API server's requests (chat, completions, embeddings), run by
``common.validation.ValidateRequests`` before FastChat's handlers see a request."""
from __future__ import annotations

import json
from typing import Any

from fastchat.constants import ErrorCode

from fastchat_bigdl.api.tool_calling.spec import tool_request, uses_tools_or_json
from fastchat_bigdl.common.errors import Invalid
from fastchat_bigdl.common.validation import check_number, check_stop, is_number

MAX_N = 8
MAX_LOGIT_BIAS = 300
CHAT_ROLES = ("system", "user", "assistant", "tool", "function")


def _check_common(data: dict) -> None:
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise Invalid("'model' must be the name of a served model (see GET /v1/models)")
    check_number(data, "max_tokens", integer=True, low=1, high=1 << 20)
    check_number(data, "n", integer=True, low=1, high=MAX_N)
    check_number(data, "temperature", low=0, high=2)
    check_number(data, "top_p", low=0, high=1)
    check_number(data, "top_k", integer=True)
    check_number(data, "presence_penalty", low=-2, high=2)
    check_number(data, "frequency_penalty", low=-2, high=2)
    check_number(data, "seed", integer=True, low=-(1 << 63), high=(1 << 64) - 1)
    check_stop(data)
    options = data.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise Invalid("'stream_options' must be an object like {'include_usage': true}")
    if "stream" in data and data["stream"] is not None and not isinstance(data["stream"], bool):
        raise Invalid("'stream' must be true or false")
    bias = data.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or not all(is_number(v) and -100 <= v <= 100 for v in bias.values()):
            raise Invalid("'logit_bias' must map token ids to numbers between -100 and 100")
        if len(bias) > MAX_LOGIT_BIAS:
            raise Invalid(f"'logit_bias' may have at most {MAX_LOGIT_BIAS} entries", ErrorCode.PARAM_OUT_OF_RANGE)


def _check_content(i: int, message: dict) -> None:
    content = message.get("content")
    if isinstance(content, str):
        return
    if isinstance(content, list) and content:
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image_url" and isinstance(part.get("image_url"), dict):
                continue
            raise Invalid(f"messages[{i}].content parts must be {{'type': 'text', 'text': str}} "
                          "or {'type': 'image_url', 'image_url': {...}}")
        return
    raise Invalid(f"messages[{i}].content must be a string (or a list of content parts), "
                  f"not {json.dumps(content)[:40]}")


def check_chat(data: dict) -> None:
    _check_common(data)
    check_number(data, "max_completion_tokens", integer=True, low=1, high=1 << 20)
    newer, older = data.get("max_completion_tokens"), data.get("max_tokens")
    if newer is not None and older is not None and newer != older:
        raise Invalid("'max_completion_tokens' (the newer name of 'max_tokens') and 'max_tokens' disagree; send one")
    _check_chat_logprobs(data)
    messages = data.get("messages")
    if isinstance(messages, str) and messages:
        return  # FastChat's extension: a raw prompt
    if not isinstance(messages, list) or not messages:
        raise Invalid("'messages' must be a non-empty list of {'role', 'content'} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Invalid(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise Invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, not {json.dumps(role)[:40]}")
        if role == "assistant" and message.get("content") is None:
            continue  # a turn that only called tools, or an empty reply replayed (ag2 sends null for it)
        _check_content(i, message)
    if uses_tools_or_json(data):
        tool_request(data)


def _check_chat_logprobs(data: dict) -> None:
    logprobs = data.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise Invalid("'logprobs' must be true or false on chat completions (the number of alternatives is "
                      "'top_logprobs')")
    check_number(data, "top_logprobs", integer=True, low=0, high=20)
    if data.get("top_logprobs") is not None and not logprobs:
        raise Invalid("'top_logprobs' needs 'logprobs': true")


def check_completion(data: dict) -> None:
    _check_common(data)
    prompt = data.get("prompt")
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
    if not ok:
        raise Invalid("'prompt' must be a string or a non-empty list of strings")
    check_number(data, "logprobs", integer=True, low=0, high=5)


def check_embeddings(data: dict) -> None:
    value = data.get("input")
    ok = isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
    if not ok:
        raise Invalid("'input' must be a string or a non-empty list of strings")


OPENAI_CHECKS = {
    "/v1/chat/completions": check_chat,
    "/v1/completions": check_completion,
    "/v1/embeddings": check_embeddings,
}


def _empty_replies_as_text(data: dict) -> dict:
    """An assistant turn without content and without calls is an empty reply: FastChat's
    handler needs it as "" (its conversation reads None as "the model speaks next")."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not any(_empty_reply(m) for m in messages):
        return data
    return {**data, "messages": [{**m, "content": ""} if _empty_reply(m) else m for m in messages]}


def _empty_reply(message: Any) -> bool:
    return (isinstance(message, dict) and message.get("role") == "assistant" and message.get("content") is None
            and not message.get("tool_calls") and not message.get("function_call"))


def chat_defaults(default_max_tokens: int):
    """What a chat request without ``max_tokens`` gets (and empty replies given as null
    get ""): its ``max_completion_tokens`` (the
    name newer OpenAI clients send), else ``default_max_tokens`` (0: nothing, so FastChat
    fills the rest of the context)."""

    def fill(data: dict) -> dict:
        data = _empty_replies_as_text(data)
        if data.get("max_tokens") is None and data.get("max_completion_tokens") is not None:
            return {**data, "max_tokens": data["max_completion_tokens"]}  # OpenAI's newer name
        if default_max_tokens > 0 and data.get("max_tokens") is None:
            return {**data, "max_tokens": default_max_tokens}
        return data

    return fill
