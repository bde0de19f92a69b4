"""Tool calls in generated text become OpenAI ``tool_calls``, read in the format the
model writes them in (``formats``): ``<tool_call>{json}</tool_call>`` blocks after
optional text (Hermes), a reply that is one JSON call (Llama 3), or ``[TOOL_CALLS]``
and a JSON list (Mistral). Text before the first call is the message content. While
streaming, text that may be the start of a call is held back until it is known."""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fastchat_bigdl.common.stop_strings import StopMatcher
from fastchat_bigdl.api.tool_calling.formats import HERMES, ToolFormat
from fastchat_bigdl.api.tool_calling.grammar import CLOSE, OPEN

LLAMA_PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a call with it


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ParsedReply:
    content: Optional[str]
    calls: List[Dict[str, str]] = field(default_factory=list)  # {"id", "name", "arguments"}


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(data, names) -> Optional[Dict[str, str]]:
    """A call read from JSON (``arguments``, or Llama's ``parameters``)."""
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": call_id(), "name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


def parse_reply(text: str, names, fmt: ToolFormat = HERMES) -> ParsedReply:
    """Split ``text`` into content and the calls of functions in ``names``, written in
    ``fmt``. A reply with an unreadable call (a model writing the format without the
    grammar, or cut off) stays plain text, so nothing the model wrote is lost."""
    names = set(names)
    if fmt.opener_is_special_token or not fmt.text_before_call:
        calls = _whole_reply_calls(text, names, fmt)
        return ParsedReply(None, calls) if calls else ParsedReply(text)
    start = text.find(OPEN)
    if start == -1:
        return ParsedReply(text)
    calls, rest = [], text[start:]
    while rest.startswith(OPEN):
        end = rest.find(CLOSE)
        block = rest[len(OPEN): end if end != -1 else len(rest)]
        call = _call(_json(block.strip()), names)
        if call is None:
            return ParsedReply(text)
        calls.append(call)
        rest = "" if end == -1 else rest[end + len(CLOSE):].lstrip()
    if rest.strip():
        return ParsedReply(text)
    content = text[:start].strip()
    return ParsedReply(content or None, calls)


def _json_objects(text: str) -> list:
    """JSON values one after another, separated by ``;`` and spaces (Llama's parallel
    calls); [None] where the text is something else."""
    decoder, items, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            item, at = decoder.raw_decode(text, at)
        except ValueError:
            return [None]
        items.append(item)
        while at < len(text) and text[at] in "; \n":
            at += 1
    return items


def _whole_reply_calls(text: str, names, fmt: ToolFormat) -> List[Dict[str, str]]:
    """Calls where the reply is the call: Llama's JSON object(s) (``;``-separated, perhaps
    after ``<|python_tag|>``) or Mistral's ``[TOOL_CALLS]`` list. [] when it is not one."""
    body = text.strip()
    opener = fmt.opener or LLAMA_PYTHON_TAG
    if body.startswith(opener):
        body = body[len(opener):].strip()
    elif fmt.opener:
        return []
    if fmt.in_list:
        data = _json(body)
        items = data if isinstance(data, list) else [data]
    else:
        items = _json_objects(body)
    calls = [_call(item, names) for item in items]
    return calls if calls and all(calls) else []


class StreamSplitter:
    """Feeds on the growing reply text; ``content_delta`` returns the content that is safe
    to stream: never part of a call, nor text that may yet open one (a partial
    ``<tool_call>`` anywhere in a Hermes reply; the start of a reply where the reply
    itself is the call), nor trailing whitespace that may turn out to precede a call."""

    def __init__(self, fmt: ToolFormat = HERMES):
        self.sent = 0
        self.in_call = False
        self.openers = [fmt.opener.rstrip()] if fmt.opener else ["{", LLAMA_PYTHON_TAG]
        self.anywhere = fmt.text_before_call  # else a call is the whole reply
        self.opening = StopMatcher(self.openers)  # holds back text that may yet become an opener

    def content_delta(self, text: str) -> str:
        if self.in_call:
            return ""
        if self.anywhere:
            start = min((i for i in (text.find(o) for o in self.openers) if i != -1), default=-1)
            self.in_call = start != -1
            held = self.opening.held_back(text)
            safe = len(text[:start if self.in_call else len(text) - held].rstrip())
        else:
            body = text.lstrip()
            self.in_call = self.sent == 0 and any(body.startswith(o) for o in self.openers)
            undecided = self.sent == 0 and any(o.startswith(body) for o in self.openers)
            safe = 0 if self.in_call or undecided else len(text)
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent:safe], safe
        return delta
