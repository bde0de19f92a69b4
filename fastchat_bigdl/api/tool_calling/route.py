"""``/v1/chat/completions`` for requests that use tools or ask for JSON, and for models
whose chats only their own chat template renders right.

FastChat's own handler drops ``tools`` and ``response_format``, cannot render tool
messages, and renders prompts only through FastChat's conversation templates, so such
requests (``spec.uses_tools_or_json``, ``renders_with_template``) are routed here by
``RouteToolRequests``, as are those with what it drops: ``seed`` (sent to the worker, which
samples with the request's own generator) and ``stream_options.include_usage``. Every
other request goes to FastChat's handler unchanged. This handler reuses FastChat's API key
check, model check, worker lookup, context-length check and worker client; it renders
the prompt with tools (``prompt``), sends the tool-call grammar with the generation
parameters (the worker enforces it) and answers with OpenAI ``tool_calls``, or with the
JSON ``response_format`` asked for. Calls are constrained and read in the model's own
format (``formats``) when its chat template has one.
"""
from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any, AsyncIterator, Dict, List, Optional

import shortuuid
from fastapi import APIRouter, Depends, Request
from fastchat.constants import ErrorCode
from fastapi.responses import StreamingResponse
from jinja2.exceptions import TemplateError
from fastchat.protocol.openai_api_protocol import ChatCompletionRequest
from fastchat.serve import openai_api_server as upstream

from fastchat_bigdl.api.choices import add_usage, choice_params, no_usage, wants_usage_chunk
from fastchat_bigdl.common.errors import error_response
from fastchat_bigdl.api.tool_calling.formats import ToolFormat
from fastchat_bigdl.api.tool_calling.grammar import output_grammar
from fastchat_bigdl.api.tool_calling.parse import ParsedReply, StreamSplitter, parse_reply
from fastchat_bigdl.api.tool_calling.prompt import Prompt, render_prompt
from fastchat_bigdl.api.tool_calling.spec import ToolRequest, tool_request, uses_tools_or_json
from fastchat_bigdl.common.validation import PARSED_BODY, RouteOnParsedBody

CHAT_PATH = "/v1/chat/completions"
TOOLS_PATH = "/fastchat_bigdl/v1/chat/completions_with_tools"
DEFAULTS = {name: f.default for name, f in ChatCompletionRequest.__fields__.items()}
_template_info: Dict[tuple, Optional[Dict[str, Any]]] = {}

router = APIRouter()


async def chat_template_info(worker_addr: str, model: str) -> Optional[Dict[str, Any]]:
    """The worker's Jinja chat template and special tokens (None from a worker that is
    not fastchat_bigdl's, which also cannot enforce grammars)."""
    key = (worker_addr, model)
    if key not in _template_info:
        import httpx

        async with httpx.AsyncClient() as client:
            response = await client.post(worker_addr + "/worker_get_chat_template", json={"model": model},
                                         timeout=upstream.WORKER_API_TIMEOUT)
        _template_info[key] = response.json() if response.status_code == 200 else None
    return _template_info[key]


def _param(data: dict, name: str):
    value = data.get(name)
    return DEFAULTS.get(name) if value is None else value


def _reply_of(text: str, finish_reason: Optional[str], names: List[str], fmt: ToolFormat) -> ParsedReply:
    # A call cut off by max_tokens stays text: a partial call would not parse.
    return ParsedReply(text) if finish_reason == "length" else parse_reply(text, names, fmt)


def _message(reply: ParsedReply, request: ToolRequest) -> (Dict[str, Any], Optional[str]):
    """The assistant message for a reply, and the finish reason calls imply."""
    message: Dict[str, Any] = {"role": "assistant", "content": reply.content}
    if not reply.calls:
        return message, None
    if request.legacy:
        call = reply.calls[0]
        message["function_call"] = {"name": call["name"], "arguments": call["arguments"]}
        return message, "function_call"
    message["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["name"], "arguments": c["arguments"]}} for c in reply.calls]
    return message, "tool_calls"


def _chunk(completion_id: str, model: str, index: int, delta: dict, finish_reason=None, logprobs=None) -> str:
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def chat_logprobs(worker_logprobs: Optional[dict], start: int = 0) -> Optional[dict]:
    """OpenAI's chat ``logprobs`` ({"content": [{token, logprob, bytes, top_logprobs}]})
    from the worker's completion-style ones, for the tokens from ``start`` on."""
    if worker_logprobs is None:
        return None
    tokens = worker_logprobs["tokens"][start:]
    values = worker_logprobs["token_logprobs"][start:]
    tops = worker_logprobs.get("top_logprobs") or [{}] * len(worker_logprobs["tokens"])
    return {"content": [{"token": token, "logprob": value, "bytes": list(token.encode("utf-8")),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                          for t, lp in (top or {}).items()]}
                        for token, value, top in zip(tokens, values, tops[start:])]}


class _LogprobsSent:
    """How many tokens' logprobs a streamed choice has sent: each chunk carries the new ones."""

    def __init__(self, wanted: bool):
        self.wanted, self.sent, self.latest = wanted, 0, None

    def update(self, content: dict) -> None:
        self.latest = content.get("logprobs") or self.latest

    def new(self) -> Optional[dict]:
        if not self.wanted or self.latest is None:
            return None
        new = chat_logprobs(self.latest, self.sent)
        self.sent = len(self.latest["tokens"])
        return new


def _call_deltas(message: Dict[str, Any]) -> List[Dict[str, Any]]:
    if "function_call" in message:
        return [{"function_call": message["function_call"]}]
    return [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(message.get("tool_calls", []))]


def _usage_chunk(completion_id: str, model: str, usage: Dict[str, int]) -> str:
    """``stream_options.include_usage``: the last chunk, with the usage and no choices."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage}
    return f"data: {json.dumps(body)}\n\n"


async def _stream(model: str, gen_params: dict, n: int, worker_addr: str, request: ToolRequest,
                  names: List[str], fmt: ToolFormat, include_usage: bool = False) -> AsyncIterator[str]:
    completion_id = f"chatcmpl-{shortuuid.random()}"
    usage = no_usage()
    for index in range(n):
        yield _chunk(completion_id, model, index, {"role": "assistant"})
        splitter, text, finish_reason, content = StreamSplitter(fmt), "", None, {}
        logprobs = _LogprobsSent(gen_params.get("logprobs") is not None)
        async for content in upstream.generate_completion_stream(choice_params(gen_params, index), worker_addr):
            if content.get("error_code", 0) != 0:
                error = {"object": "error", "message": content["text"], "code": content["error_code"]}
                yield f"data: {json.dumps(error, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
                return
            text = content["text"].replace("\ufffd", "")
            finish_reason = content.get("finish_reason") or finish_reason
            logprobs.update(content)
            delta = splitter.content_delta(text)
            if delta:
                yield _chunk(completion_id, model, index, {"content": delta}, logprobs=logprobs.new())
        reply = _reply_of(text, finish_reason, names, fmt)
        message, call_finish = _message(reply, request)
        if not reply.calls and len(text) > splitter.sent:  # held back but not a call after all
            yield _chunk(completion_id, model, index, {"content": text[splitter.sent:]}, logprobs=logprobs.new())
        for delta in _call_deltas(message):
            yield _chunk(completion_id, model, index, delta)
        yield _chunk(completion_id, model, index, {}, call_finish or finish_reason or "stop", logprobs=logprobs.new())
        add_usage(usage, content)
    if include_usage:
        yield _usage_chunk(completion_id, model, usage)
    yield "data: [DONE]\n\n"


def _generation_params(data: dict, rendered: Prompt, template: Optional[dict], request: ToolRequest) -> dict:
    """The worker's generation parameters, with the grammar for the reply (a worker that
    is not fastchat_bigdl's, ``template`` None, gets none) and the stops of whatever
    rendered the prompt."""
    offered, fmt = request.offered(), rendered.fmt
    structured = request.constrained or request.reply is not None
    gen_params = {
        "model": data["model"], "prompt": rendered.text, "echo": False,
        "logprobs": int(data.get("top_logprobs") or 0) if data.get("logprobs") else None,
        "temperature": _param(data, "temperature"), "top_p": _param(data, "top_p"), "top_k": _param(data, "top_k"),
        "presence_penalty": _param(data, "presence_penalty"),
        "frequency_penalty": _param(data, "frequency_penalty"),
        "stop_token_ids": rendered.stop_token_ids,
    }
    if data.get("seed") is not None:
        gen_params["seed"] = int(data["seed"])
    stop = rendered.stop
    stops = set([stop] if isinstance(stop, str) else stop or [])
    if not structured:  # a user stop string must not cut output whose shape the grammar guarantees
        user_stop = data.get("stop")
        stops.update([user_stop] if isinstance(user_stop, str) else user_stop or [])
    gen_params["stop"] = sorted(stops)
    if fmt.opener_is_special_token and offered:
        gen_params["skip_special_tokens"] = False  # the call opens with a special token
    opener_id = (template or {}).get("special_tokens", {}).get(fmt.opener)
    grammar = output_grammar(offered, forced=request.constrained, reply=request.reply, fmt=fmt,
                             opener_token_id=opener_id)
    if grammar and template is not None:
        gen_params["grammar"] = grammar
    return gen_params


@router.post(TOOLS_PATH, dependencies=[Depends(upstream.check_api_key)])
async def chat_completions_with_tools(raw: Request):
    data = raw.scope.get("state", {}).get(PARSED_BODY) or await raw.json()  # checked on the way in
    request = tool_request(data)
    model = data["model"]
    error = await upstream.check_model(SimpleNamespace(model=model))
    if error is not None:
        return error
    worker_addr = await upstream.get_worker_address(model)
    conv = await upstream.get_conv(model, worker_addr)
    template = await chat_template_info(worker_addr, model)
    offered = request.offered()
    structured = request.constrained or request.reply is not None  # the grammar decides the shape
    if structured and template is None:
        what = "a JSON response_format" if request.reply is not None else f"tool_choice {request.choice!r}"
        return error_response(ErrorCode.VALIDATION_TYPE_ERROR,
                              f"{what} needs a fastchat_bigdl worker (--bigdl_load), which enforces the "
                              "output format; this worker cannot")
    try:
        rendered = render_prompt(conv, template, data["messages"], request)
    except TemplateError as exc:
        return error_response(ErrorCode.VALIDATION_TYPE_ERROR, f"the model's chat template refused these messages: {exc}")
    prompt, fmt = rendered.text, rendered.fmt
    gen_params = _generation_params(data, rendered, template, request)
    max_new_tokens, error = await upstream.check_length(SimpleNamespace(model=model), prompt,
                                                        data.get("max_tokens"), worker_addr)
    if error is not None:
        return error
    gen_params["max_new_tokens"] = max_new_tokens
    names = [t.name for t in offered]
    n = _param(data, "n")
    if data.get("stream"):
        return StreamingResponse(_stream(model, gen_params, n, worker_addr, request, names, fmt,
                                         include_usage=wants_usage_chunk(data)), media_type="text/event-stream")
    results = await asyncio.gather(*(upstream.generate_completion(choice_params(gen_params, i), worker_addr)
                                     for i in range(n)))
    choices, usage = [], no_usage()
    for index, content in enumerate(results):
        if content["error_code"] != 0:
            return error_response(content["error_code"], content["text"])
        finish_reason = content.get("finish_reason") or "stop"
        reply = _reply_of(content["text"], finish_reason, names, fmt)
        message, call_finish = _message(reply, request)
        choices.append({"index": index, "message": message, "finish_reason": call_finish or finish_reason,
                        "logprobs": chat_logprobs(content.get("logprobs")) if data.get("logprobs") else None})
        add_usage(usage, content)
    return {"id": f"chatcmpl-{shortuuid.random()}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage}


_needs_template: Dict[str, bool] = {}


def needs_this_handler(data: dict) -> bool:
    """Tools or JSON (``spec.uses_tools_or_json``), or what FastChat's handler drops: a
    ``seed``, ``stream_options.include_usage``, ``logprobs``."""
    return (uses_tools_or_json(data) or data.get("seed") is not None or wants_usage_chunk(data)
            or bool(data.get("logprobs")))


async def renders_with_template(model: Any) -> bool:
    """Whether ``model``'s worker asks for its chats to be rendered by its own chat
    template (FastChat's conversation templates render them differently). Known once a
    worker has answered; False while none serves the model (FastChat's handler then
    gives its usual error)."""
    if not isinstance(model, str):
        return False
    if model not in _needs_template:
        try:
            worker_addr = await upstream.get_worker_address(model)
            info = await chat_template_info(worker_addr, model) if worker_addr else None
        except Exception:  # no worker yet, or one that went away
            return False
        _needs_template[model] = bool(info and info.get("render_with_template"))
    return _needs_template[model]


class RouteToolRequests(RouteOnParsedBody):
    """Chat completions that use tools or ask for JSON, and every chat of a model whose
    prompts its own template must render, go to this module's route; everything else to
    FastChat's handler."""

    path, target = CHAT_PATH, TOOLS_PATH

    async def wants(self, data: dict) -> bool:
        return needs_this_handler(data) or await renders_with_template(data.get("model"))
