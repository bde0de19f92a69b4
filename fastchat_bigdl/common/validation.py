"""Request validation for FastChat's apps, as ASGI middleware (so FastChat's own apps are
extended, not copied): the body is read once, parsed and checked by the route's check
(``api.request_checks`` for the OpenAI API server, ``worker.request_checks`` for the
worker), and a malformed or hostile request gets HTTP 4xx in FastChat's error schema
(``{"object": "error", "message", "code"}``) before it reaches code that would answer
500 with a stack trace. This module holds the middleware and the checks both share.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional

import anyio

from fastchat.constants import ErrorCode

from fastchat_bigdl.common.asgi_body import BodyTooLarge, read_body, replaying
from fastchat_bigdl.common.errors import Invalid, error_response

MAX_BODY_BYTES = 4 << 20
MAX_DEPTH = 32
MAX_STOPS = 16
CHECK_SECONDS = 5.0
# Where a checked request's parsed JSON body is handed to the apps behind (scope["state"]).
PARSED_BODY = "fastchat_bigdl.parsed_body"

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


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_number(data: dict, key: str, integer: bool = False, low=None, high=None) -> None:
    if key not in data or data[key] is None:
        return
    value = data[key]
    if not (is_int(value) if integer else is_number(value)):
        kind = "an integer" if integer else "a number"
        raise Invalid(f"'{key}' must be {kind}, not {json.dumps(value)[:40]}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise Invalid(f"'{key}' must be {bounds}, not {value}", ErrorCode.PARAM_OUT_OF_RANGE)


def check_stop(data: dict) -> None:
    stop = data.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise Invalid("'stop' must be a string or a list of strings")
    if len(stop) > MAX_STOPS:
        raise Invalid(f"'stop' may have at most {MAX_STOPS} strings", ErrorCode.PARAM_OUT_OF_RANGE)


class ValidateRequests:
    """ASGI middleware: read the body of the listed POST routes, run the route's check,
    answer 4xx in FastChat's error schema, or pass the body on (and its parsed JSON in
    ``scope["state"][PARSED_BODY]``, so nothing behind parses it again).

    Checks run in a worker thread under a time limit: compiling a request's JSON schemas
    into a grammar takes about a millisecond per KiB, and in the event loop it would stall
    every other request's stream. ``defaults`` (route -> function) may fill in what a
    request left out; the body handed on is then the filled-in one."""

    def __init__(self, app, checks: Dict[str, Callable[[dict], None]], max_body: int = MAX_BODY_BYTES,
                 check_seconds: float = CHECK_SECONDS, defaults: Optional[Dict[str, Callable[[dict], dict]]] = None):
        self.app, self.checks, self.max_body, self.check_seconds = app, checks, max_body, check_seconds
        self.defaults = defaults or {}

    async def __call__(self, scope, receive, send):
        path = scope.get("path")
        check = self.checks.get(path) if scope["type"] == "http" and scope["method"] == "POST" else None
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
            await self._check(check, data)
        except Invalid as exc:
            return await error_response(exc.code, str(exc))(scope, receive, send)
        fill = self.defaults.get(path)
        if fill is not None:
            filled = fill(data)
            if filled is not data:
                data, body = filled, json.dumps(filled).encode()
        scope = {**scope, "state": {**scope.get("state", {}), PARSED_BODY: data}}
        await self.app(scope, replaying(body, receive), send)

    async def _check(self, check: Callable[[dict], None], data: dict) -> None:
        try:
            with anyio.fail_after(self.check_seconds):
                # Abandoned on time-out; llguidance's own fuel limits bound how long it runs on.
                await anyio.to_thread.run_sync(check, data, abandon_on_cancel=True)
        except TimeoutError:
            raise Invalid(f"checking the request took longer than {self.check_seconds:g} s; its tool or "
                          "response_format schemas are too large or complex to enforce",
                          ErrorCode.PARAM_OUT_OF_RANGE) from None


class RouteOnParsedBody:
    """ASGI middleware behind ``ValidateRequests``: a POST to ``path`` goes to the route at
    ``target`` when ``wants`` the body ValidateRequests parsed and checked; any other
    request, to FastChat's handler unchanged. Subclasses set the paths and ``wants``."""

    path = target = ""

    def __init__(self, app):
        self.app = app

    async def wants(self, data: dict) -> bool:
        raise NotImplementedError

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope.get("path") == self.path:
            data = scope.get("state", {}).get(PARSED_BODY)
            if data is not None and await self.wants(data):
                scope = dict(scope, path=self.target, raw_path=self.target.encode())
        await self.app(scope, receive, send)
