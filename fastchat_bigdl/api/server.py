"""FastChat's OpenAI API server (same flags, routes and behaviour), with request validation
in front of it so bad input gets a 4xx in FastChat's error schema instead of a 500 and a
stack trace, clear errors for failures behind it, OpenAI tool calling (``tools``,
``tool_choice``, legacy ``functions``) with schema-constrained calls, ``seed`` and the usage
chunk on completions too, and ``/v1/responses``."""
from __future__ import annotations

import os

from fastapi import FastAPI
from fastchat.serve import openai_api_server as upstream

from fastchat_bigdl.api import API_KEYS_ENV, DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS_ENV
from fastchat_bigdl.api.completions import RouteCompletions, router as completions_router
from fastchat_bigdl.api.pydantic_compat import adapt_fastchat_protocol
from fastchat_bigdl.api.request_checks import OPENAI_CHECKS, chat_defaults
from fastchat_bigdl.api.responses import router as responses_router
from fastchat_bigdl.api.server_errors import ClearServerErrors
from fastchat_bigdl.api.tool_calling.route import RouteToolRequests, router as tool_router
from fastchat_bigdl.common.app_runner import run_app
from fastchat_bigdl.common.logs import log_to_file, plain_console
from fastchat_bigdl.common.netenv import bypass_proxy_for_loopback
from fastchat_bigdl.common.validation import ValidateRequests


def default_max_tokens() -> int:
    value = os.environ.get(DEFAULT_MAX_TOKENS_ENV, str(DEFAULT_MAX_TOKENS))
    try:
        tokens = int(value)
    except ValueError:
        tokens = -1
    if tokens < 0:
        raise SystemExit(f"fastchat_bigdl.openai_api_server: error: ${DEFAULT_MAX_TOKENS_ENV} must be a "
                         f"whole number of tokens (0: no cap), not {value!r}")
    return tokens


def build_app() -> FastAPI:
    """FastChat's app with this package's routes and middleware (added once; the
    middleware reads the default max_tokens from the environment now)."""
    app = upstream.app
    if not getattr(app.state, "fastchat_bigdl", False):
        adapt_fastchat_protocol()  # FastChat's streams on pydantic 2
        app.include_router(tool_router)  # tool calling; requests reach it through RouteToolRequests
        app.include_router(responses_router)  # /v1/responses, over the chat completions above
        app.include_router(completions_router)  # seeded completions, through RouteCompletions
        app.add_middleware(RouteToolRequests)  # inside ValidateRequests: routes on the body it parsed
        app.add_middleware(RouteCompletions)  # likewise
        app.add_middleware(ValidateRequests, checks=OPENAI_CHECKS,
                           defaults={"/v1/chat/completions": chat_defaults(default_max_tokens())})
        app.add_middleware(ClearServerErrors)
        app.state.fastchat_bigdl = True
    return app


def main() -> None:
    bypass_proxy_for_loopback()  # before any HTTP client exists
    with plain_console():
        app = build_app()
        args = upstream.create_openai_api_server()  # FastChat's parser and settings
    log_to_file("openai_api_server.log")
    keys = os.environ.get(API_KEYS_ENV)
    if keys and not args.api_keys:  # given by environment so they stay out of argv and logs
        upstream.app_settings.api_keys = [k for k in keys.split(",") if k]
    run_app(app, args)
