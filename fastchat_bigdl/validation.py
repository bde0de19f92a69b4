"""Request validation for FastChat's OpenAI API server and worker.

Malformed or hostile requests get HTTP 4xx in FastChat's error schema
(``{"object": "error", "message", "code"}``) before they reach code that would answer
500 with a stack trace (upstream does for role ``tool``, ``content: null``, invalid JSON
on the worker API, ...). Implemented as ASGI middleware so FastChat's own apps are
extended, not copied.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional, Tuple

from fastchat.constants import ErrorCode

from fastchat_bigdl.asgi_body import BodyTooLarge, read_body, replaying
from fastchat_bigdl.request_errors import Invalid, error_response
from fastchat_bigdl.tool_calling.grammar import grammar_problem
from fastchat_bigdl.tool_calling.spec import tool_request, uses_tools_or_json

MAX_BODY_BYTES = 4 << 20
MAX_DEPTH = 32
MAX_N = 8
MAX_STOPS = 16
MAX_LOGIT_BIAS = 300
# Where a checked request's parsed JSON body is handed to the apps behind (scope["state"]).
PARSED_BODY = "fastchat_bigdl.parsed_body"
CHAT_ROLES = ("system", "user", "assistant", "tool", "function")

Problem = Optional[Tuple[int, str]]


def _depth(value: Any, limit: int = MAX_DEPTH) -> int:
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_body(body: bytes) -> Dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise Invalid(f"the request JSON is nested too deeply (limit {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        raise Invalid(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Invalid(f"the request body must be a JSON object, not {type(data).__name__}")
    if _depth(data) > MAX_DEPTH:
        raise Invalid(f"the request JSON is nested too deeply (limit {MAX_DEPTH} levels)")
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_number(data: dict, key: str, integer: bool = False, low=None, high=None) -> None:
    if key not in data or data[key] is None:
        return
    value = data[key]
    if not (_is_int(value) if integer else _is_number(value)):
        kind = "an integer" if integer else "a number"
        raise Invalid(f"'{key}' must be {kind}, not {json.dumps(value)[:40]}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise Invalid(f"'{key}' must be {bounds}, not {value}", ErrorCode.PARAM_OUT_OF_RANGE)


def _check_stop(data: dict) -> None:
    stop = data.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise Invalid("'stop' must be a string or a list of strings")
    if len(stop) > MAX_STOPS:
        raise Invalid(f"'stop' may have at most {MAX_STOPS} strings", ErrorCode.PARAM_OUT_OF_RANGE)


def _check_common(data: dict) -> None:
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise Invalid("'model' must be the name of a served model (see GET /v1/models)")
    _check_number(data, "max_tokens", integer=True, low=1, high=1 << 20)
    _check_number(data, "n", integer=True, low=1, high=MAX_N)
    _check_number(data, "temperature", low=0, high=2)
    _check_number(data, "top_p", low=0, high=1)
    _check_number(data, "top_k", integer=True)
    _check_number(data, "presence_penalty", low=-2, high=2)
    _check_number(data, "frequency_penalty", low=-2, high=2)
    _check_stop(data)
    if "stream" in data and data["stream"] is not None and not isinstance(data["stream"], bool):
        raise Invalid("'stream' must be true or false")
    bias = data.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or not all(_is_number(v) and -100 <= v <= 100 for v in bias.values()):
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
        calls = role == "assistant" and (message.get("tool_calls") or message.get("function_call"))
        if calls and message.get("content") is None:
            continue  # an assistant turn that only called tools
        _check_content(i, message)
    if uses_tools_or_json(data):
        tool_request(data)


def check_completion(data: dict) -> None:
    _check_common(data)
    prompt = data.get("prompt")
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
    if not ok:
        raise Invalid("'prompt' must be a string or a non-empty list of strings")
    _check_number(data, "logprobs", integer=True, low=0, high=5)


def check_embeddings(data: dict) -> None:
    value = data.get("input")
    ok = isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
    if not ok:
        raise Invalid("'input' must be a string or a non-empty list of strings")


def check_worker_generate(data: dict) -> None:
    if not isinstance(data.get("prompt"), str):
        raise Invalid("'prompt' must be a string")
    for key in ("temperature", "top_p", "repetition_penalty"):
        _check_number(data, key, low=0)
    _check_number(data, "top_k", integer=True)
    _check_number(data, "max_new_tokens", integer=True, low=1)
    _check_stop(data)
    ids = data.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(_is_int(i) for i in ids)):
        raise Invalid("'stop_token_ids' must be a list of integers")
    if "echo" in data and not isinstance(data["echo"], bool):
        raise Invalid("'echo' must be true or false")
    grammar = data.get("grammar")
    if grammar is not None:
        problem = grammar_problem(grammar) if isinstance(grammar, str) else "it must be a string"
        if problem:
            raise Invalid(f"'grammar' is not a grammar this worker can enforce: {problem}")


def check_worker_count(data: dict) -> None:
    if not isinstance(data.get("prompt"), str):
        raise Invalid("'prompt' must be a string")


class ValidateRequests:
    """ASGI middleware: read the body of the listed POST routes, run the route's check,
    answer 4xx in FastChat's error schema, or pass the buffered body on unchanged (and
    its parsed JSON in ``scope["state"][PARSED_BODY]``, so nothing behind parses it again)."""

    def __init__(self, app, checks: Dict[str, Callable[[dict], None]], max_body: int = MAX_BODY_BYTES):
        self.app, self.checks, self.max_body = app, checks, max_body

    async def __call__(self, scope, receive, send):
        check = self.checks.get(scope.get("path")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if check is None:
            return await self.app(scope, receive, send)
        try:
            body = await read_body(receive, self.max_body)
        except BodyTooLarge:
            return await error_response(ErrorCode.PARAM_OUT_OF_RANGE,
                                        f"the request body exceeds {self.max_body >> 20} MiB",
                                        status=413)(scope, receive, send)
        if body is None:
            return
        try:
            data = parse_body(body)
            check(data)
        except Invalid as exc:
            return await error_response(exc.code, str(exc))(scope, receive, send)
        scope = {**scope, "state": {**scope.get("state", {}), PARSED_BODY: data}}
        await self.app(scope, replaying(body, receive), send)


OPENAI_CHECKS = {
    "/v1/chat/completions": check_chat,
    "/v1/completions": check_completion,
    "/v1/embeddings": check_embeddings,
}
WORKER_CHECKS = {
    "/worker_generate_stream": check_worker_generate,
    "/worker_generate": check_worker_generate,
    "/count_token": check_worker_count,
}
