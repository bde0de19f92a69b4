"""``/v1/responses``: OpenAI's Responses API (what the OpenAI Agents SDK sends by default)
on top of this server's own chat completions.

A request is translated into a chat completions request (``chat_request``: input items
to messages, ``instructions`` to a system message, function tools, ``text.format`` to
``response_format``) and sent through the same app in-process (``_call_app``: its
validation, tool calling, FastChat's handler: one path, no second implementation), and
the answer translated back: a ``response`` object, or Responses events when streamed.
The server keeps no responses: ``previous_response_id`` is refused with what to do.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import shortuuid
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastchat.constants import ErrorCode
from fastchat.serve import openai_api_server as upstream

from fastchat_bigdl.common.asgi_body import replaying
from fastchat_bigdl.common.errors import Invalid, error_response

RESPONSES_PATH = "/v1/responses"
CHAT_PATH = "/v1/chat/completions"
PASSED_ON = ("model", "temperature", "top_p", "seed", "tool_choice", "parallel_tool_calls", "user", "metadata")

router = APIRouter()


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content} - {"input_text", "output_text", "text"}
        if not kinds:
            return "".join(str(p.get("text", "")) for p in content)
        raise Invalid(f"{where}: content parts of type {', '.join(sorted(map(str, kinds)))} are not supported "
                      "(text only)")
    raise Invalid(f"{where}: 'content' must be a string or a list of input_text parts")


def _messages(items: Any) -> List[Dict[str, Any]]:
    """Responses input items as chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise Invalid("'input' must be a string or a non-empty list of items")
    messages: List[Dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise Invalid(f"input[{i}] must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("user", "assistant", "system"):
                raise Invalid(f"input[{i}].role must be user, assistant, system or developer")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"input[{i}]")})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id")), "type": "function",
                    "function": {"name": str(item.get("name")), "arguments": str(item.get("arguments", "{}"))}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id")),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise Invalid(f"input[{i}]: items of type {kind!r} are not supported (message, function_call, "
                          "function_call_output)")
    return messages


def _tools(tools: Any) -> List[Dict[str, Any]]:
    if not isinstance(tools, list):
        raise Invalid("'tools' must be a list")
    chat_tools = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise Invalid(f"tools[{i}]: only function tools are supported here, not {kind!r}")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        chat_tools.append({"type": "function", "function": function})
    return chat_tools


def chat_request(data: Dict[str, Any]) -> Dict[str, Any]:
    """The chat completions request a Responses request stands for (Invalid if it cannot)."""
    if not isinstance(data, dict):
        raise Invalid("the body must be a JSON object")
    if data.get("previous_response_id"):
        raise Invalid("'previous_response_id': this server keeps no responses; send the whole conversation "
                      "in 'input' (earlier outputs as items)")
    messages = _messages(data.get("input"))
    if data.get("instructions"):
        messages.insert(0, {"role": "system", "content": _text_of(data["instructions"], "instructions")})
    chat: Dict[str, Any] = {k: data[k] for k in PASSED_ON if data.get(k) is not None}
    chat["messages"] = messages
    if data.get("max_output_tokens") is not None:
        chat["max_tokens"] = data["max_output_tokens"]
    if data.get("tools"):
        chat["tools"] = _tools(data["tools"])
    choice = chat.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    fmt = (data.get("text") or {}).get("format") if isinstance(data.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    if data.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


async def _call_app(app, path: str, body: Dict[str, Any], headers: List[Tuple[bytes, bytes]]):
    """POST ``body`` to ``path`` of ``app`` in-process: (status, the response's body
    chunks as they come). Streams, unlike httpx's ASGI transport."""
    queue: asyncio.Queue = asyncio.Queue()
    payload = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                         *headers], "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}

    async def never_disconnects():
        await asyncio.Event().wait()  # cancelled when the response ends
        return {"type": "http.disconnect"}

    async def send(message):
        await queue.put(message)

    task = asyncio.create_task(app(scope, replaying(payload, never_disconnects), send))
    task.add_done_callback(lambda done: queue.put_nowait(done))
    first = await queue.get()
    if isinstance(first, asyncio.Task):
        first.result()  # the app failed before answering: raise it
        raise RuntimeError("the chat completions app ended without an answer")

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while True:
                message = await queue.get()
                if isinstance(message, asyncio.Task):
                    return
                if message.get("type") == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        return
        finally:  # our client went away mid-stream: stop the chat request (and its generation)
            if not task.done():
                task.cancel()

    return first["status"], chunks()


def _auth(request: Request) -> List[Tuple[bytes, bytes]]:
    value = request.headers.get("authorization")
    return [(b"authorization", value.encode())] if value else []


@router.post(RESPONSES_PATH, dependencies=[Depends(upstream.check_api_key)])
async def create_response(raw: Request):
    try:
        data = await raw.json()
        chat = chat_request(data)
    except (Invalid, ValueError) as exc:
        message = str(exc) if isinstance(exc, Invalid) else "the body must be JSON"
        return error_response(ErrorCode.VALIDATION_TYPE_ERROR, message)
    status, chunks = await _call_app(raw.app, CHAT_PATH, chat, _auth(raw))
    if not chat.get("stream") or status != 200:
        body = b"".join([chunk async for chunk in chunks])
        answer = json.loads(body) if body else {}
        if status != 200:
            return JSONResponse(answer, status_code=status)
        choice = answer["choices"][0]
        return response_object(data, _output_of_message(choice), answer.get("usage"), choice.get("finish_reason"))
    return StreamingResponse(ResponseEvents(data).stream(chunks), media_type="text/event-stream")


def _item_id(prefix: str) -> str:
    return f"{prefix}_{shortuuid.random()}"


def _message_item(text: str, item_id: Optional[str] = None, status: str = "completed") -> Dict[str, Any]:
    return {"type": "message", "id": item_id or _item_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if text is not None else []}


def _call_item(call: Dict[str, Any], arguments: Optional[str] = None) -> Dict[str, Any]:
    return {"type": "function_call", "id": _item_id("fc"), "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if arguments is None else arguments, "status": "completed"}


def _output_of_message(choice: Dict[str, Any]) -> List[Dict[str, Any]]:
    message = choice.get("message") or {}
    output = []
    if message.get("content") or not message.get("tool_calls"):
        output.append(_message_item(message.get("content") or ""))
    return output + [_call_item(call) for call in message.get("tool_calls") or []]


def response_object(data: Dict[str, Any], output: List[Dict[str, Any]], usage: Optional[Dict[str, int]],
                    finish_reason: Optional[str], response_id: Optional[str] = None,
                    status: Optional[str] = None) -> Dict[str, Any]:
    usage = usage or {}
    incomplete = finish_reason == "length"
    return {
        "id": response_id or _item_id("resp"), "object": "response", "created_at": int(time.time()),
        "status": status or ("incomplete" if incomplete else "completed"), "model": data.get("model"),
        "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": data.get("instructions"), "metadata": data.get("metadata") or {},
        "tools": data.get("tools") or [], "tool_choice": data.get("tool_choice", "auto"),
        "parallel_tool_calls": data.get("parallel_tool_calls", True), "temperature": data.get("temperature"),
        "top_p": data.get("top_p"), "max_output_tokens": data.get("max_output_tokens"),
        "text": data.get("text") or {"format": {"type": "text"}},
        "usage": {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0),
                  "total_tokens": usage.get("total_tokens", 0), "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }


class ResponseEvents:
    """A streamed chat completion re-told as Responses events: the text as one message
    item (its deltas as they come), each tool call as a function_call item, then
    ``response.completed`` with the whole response."""

    def __init__(self, data: Dict[str, Any]):
        self.data, self.sequence = data, 0
        self.response_id = _item_id("resp")
        self.output: List[Dict[str, Any]] = []
        self.text: Optional[str] = None  # the message item's text while it is open
        self.message_id = _item_id("msg")
        self.usage, self.finish_reason = None, None

    def _event(self, kind: str, **fields) -> str:
        self.sequence += 1
        body = {"type": kind, "sequence_number": self.sequence, **fields}
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _response(self, status: str) -> Dict[str, Any]:
        return response_object(self.data, list(self.output), self.usage, self.finish_reason, self.response_id,
                               status)

    async def stream(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
        yield self._event("response.created", response=self._response("in_progress"))
        buffer = b""
        async for chunk in chunks:
            buffer += chunk
            while b"\n\n" in buffer:
                line, buffer = buffer.split(b"\n\n", 1)
                for event in self._from_chat(line.decode()):
                    yield event
        for event in self._close_text():
            yield event
        incomplete = self.finish_reason == "length"
        yield self._event("response.incomplete" if incomplete else "response.completed",
                          response=self._response("incomplete" if incomplete else "completed"))

    def _from_chat(self, line: str) -> List[str]:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return []
        chunk = json.loads(line[6:])
        if chunk.get("object") == "error":
            return [self._event("error", code=str(chunk.get("code")), message=chunk.get("message"), param=None)]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        events: List[str] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._close_text() + self._call(call)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return events

    def _text_delta(self, delta: str) -> List[str]:
        events = []
        if self.text is None:
            self.text = ""
            item = _message_item(None, self.message_id, "in_progress")
            events += [self._event("response.output_item.added", output_index=len(self.output), item=item),
                       self._event("response.content_part.added", item_id=self.message_id,
                                   output_index=len(self.output), content_index=0,
                                   part={"type": "output_text", "text": "", "annotations": []})]
        self.text += delta
        return events + [self._event("response.output_text.delta", item_id=self.message_id,
                                     output_index=len(self.output), content_index=0, delta=delta)]

    def _close_text(self) -> List[str]:
        if self.text is None:
            return []
        item, index, text = _message_item(self.text, self.message_id), len(self.output), self.text
        self.output.append(item)
        self.text = None
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text),
                self._event("response.content_part.done", item_id=item["id"], output_index=index,
                            content_index=0, part=item["content"][0]),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _call(self, call: Dict[str, Any]) -> List[str]:
        item, index = _call_item(call), len(self.output)
        arguments = item["arguments"]
        self.output.append(item)
        return [self._event("response.output_item.added", output_index=index,
                            item=dict(item, arguments="", status="in_progress")),
                self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=arguments),
                self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            arguments=arguments),
                self._event("response.output_item.done", output_index=index, item=item)]
