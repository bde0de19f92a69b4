"""``/v1/completions`` for what FastChat's handler drops: ``seed`` and
``stream_options.include_usage``.

FastChat's ``CompletionRequest`` has neither field, so a seeded completion was sampled
without its seed (two identical requests, two answers) and a stream never carried the
usage chunk. ``RouteCompletions`` sends such requests here; every other completion goes
to FastChat's handler unchanged. This handler is FastChat's, reassembled from its own
parts (model, request and length checks, ``get_gen_params``, the worker client, the
response models); what it adds is the seed in each choice's parameters (choice ``i`` of
a request gets ``seed + i``, as chat completions do, so the choices differ and each is
reproducible) and the usage chunk.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, List

import shortuuid
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from fastchat.protocol.openai_api_protocol import CompletionRequest
from fastchat.serve import openai_api_server as upstream

from fastchat_bigdl.api.choices import add_usage, choice_params, no_usage, wants_usage_chunk
from fastchat_bigdl.common.errors import error_response
from fastchat_bigdl.common.validation import PARSED_BODY, RouteOnParsedBody

COMPLETIONS_PATH = "/v1/completions"
SEEDED_PATH = "/fastchat_bigdl/v1/completions_seeded"

router = APIRouter()


class RouteCompletions(RouteOnParsedBody):
    """Completions with a seed or asking for the usage chunk go to this module's route."""

    path, target = COMPLETIONS_PATH, SEEDED_PATH

    async def wants(self, data: dict) -> bool:
        return data.get("seed") is not None or wants_usage_chunk(data)


async def _choice_params(request: CompletionRequest, worker_addr: str, seed) -> List[dict]:
    """The worker parameters of every choice, in OpenAI's order (each prompt's ``n``)."""
    params = []
    for text in request.prompt:
        base = await upstream.get_gen_params(
            request.model, worker_addr, text, temperature=request.temperature, top_p=request.top_p,
            top_k=request.top_k, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, max_tokens=request.max_tokens,
            logprobs=request.logprobs, echo=request.echo, stop=request.stop)
        if seed is not None:
            base["seed"] = int(seed)
        params.extend([base] * request.n)
    return [choice_params(p, index) for index, p in enumerate(params)]


@router.post(SEEDED_PATH, dependencies=[Depends(upstream.check_api_key)])
async def seeded_completions(raw: Request):
    data = raw.scope.get("state", {}).get(PARSED_BODY) or await raw.json()  # checked on the way in
    request = CompletionRequest(**{k: v for k, v in data.items() if k in CompletionRequest.__fields__})
    error = await upstream.check_model(request) or upstream.check_requests(request)
    if error is not None:
        return error
    request.prompt = upstream.process_input(request.model, request.prompt)
    worker_addr = await upstream.get_worker_address(request.model)
    for text in request.prompt:
        max_tokens, error = await upstream.check_length(request, text, request.max_tokens, worker_addr)
        if error is not None:
            return error
        if isinstance(max_tokens, int) and max_tokens < request.max_tokens:
            request.max_tokens = max_tokens
    params = await _choice_params(request, worker_addr, data.get("seed"))
    if request.stream:
        return StreamingResponse(_stream(request.model, params, worker_addr, wants_usage_chunk(data)),
                                 media_type="text/event-stream")
    results = await asyncio.gather(*(upstream.generate_completion(p, worker_addr) for p in params))
    choices, usage = [], no_usage()
    for index, content in enumerate(results):
        if content["error_code"] != 0:
            return error_response(content["error_code"], content["text"])
        choices.append({"index": index, "text": content["text"], "finish_reason": content.get("finish_reason", "stop"),
                        "logprobs": _logprobs(content.get("logprobs"))})
        add_usage(usage, content)
    return {"id": f"cmpl-{shortuuid.random()}", "object": "text_completion", "created": int(time.time()),
            "model": request.model, "choices": choices, "usage": usage}


def _logprobs(worker_logprobs, start: int = 0):
    """OpenAI's completion logprobs (FastChat's shape) for the tokens from ``start`` on."""
    if not worker_logprobs:
        return None
    return {key: values[start:] if isinstance(values, list) else values for key, values in worker_logprobs.items()}


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(model: str, params: List[dict], worker_addr: str, include_usage: bool) -> AsyncIterator[str]:
    """Each choice in turn, as FastChat streams completions; the usage chunk last if asked."""
    head = {"id": f"cmpl-{shortuuid.random()}", "object": "text_completion", "created": int(time.time()),
            "model": model}
    usage = no_usage()
    for index, choice in enumerate(params):
        sent, tokens_sent, finish_reason, content = "", 0, None, {}
        async for content in upstream.generate_completion_stream(choice, worker_addr):
            if content.get("error_code", 0) != 0:
                yield _event({"object": "error", "message": content["text"], "code": content["error_code"]})
                yield "data: [DONE]\n\n"
                return
            text = content["text"].replace("\ufffd", "")
            finish_reason = content.get("finish_reason") or finish_reason
            if len(text) > len(sent):
                logprobs = _logprobs(content.get("logprobs"), tokens_sent)
                tokens_sent += len(logprobs["tokens"]) if logprobs else 0
                yield _event({**head, "choices": [{"index": index, "text": text[len(sent):], "finish_reason": None,
                                                   "logprobs": logprobs}]})
                sent = text
        yield _event({**head, "choices": [{"index": index, "text": "", "finish_reason": finish_reason or "stop",
                                          "logprobs": None}]})
        add_usage(usage, content)
    if include_usage:
        yield _event({**head, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"
