"""Tool calls in generated text: ``<tool_call>{json}</tool_call>`` blocks become OpenAI
``tool_calls``; the text before the first block is the message content. While
streaming, text that may be the start of a block is held back until it is known."""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fastchat_bigdl.common.stop_strings import StopMatcher
from fastchat_bigdl.api.tool_calling.grammar import CLOSE, OPEN


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ParsedReply:
    content: Optional[str]
    calls: List[Dict[str, str]] = field(default_factory=list)  # {"id", "name", "arguments"}


def _call(block: str, names) -> Optional[Dict[str, str]]:
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": call_id(), "name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


def parse_reply(text: str, names) -> ParsedReply:
    """Split ``text`` into content and the calls of functions in ``names``. A reply with
    an unreadable block (a model writing the format without the grammar, or cut off)
    stays plain text, so nothing the model wrote is lost."""
    start = text.find(OPEN)
    if start == -1:
        return ParsedReply(text)
    calls, rest = [], text[start:]
    while rest.startswith(OPEN):
        end = rest.find(CLOSE)
        block = rest[len(OPEN): end if end != -1 else len(rest)]
        call = _call(block.strip(), set(names))
        if call is None:
            return ParsedReply(text)
        calls.append(call)
        rest = "" if end == -1 else rest[end + len(CLOSE):].lstrip()
    if rest.strip():
        return ParsedReply(text)
    content = text[:start].strip()
    return ParsedReply(content or None, calls)


class StreamSplitter:
    """Feeds on the growing reply text; ``content_delta`` returns the content that is safe
    to stream (never part of a call block, nor a partial ``<tool_call>``, nor trailing
    whitespace that may turn out to precede a call)."""

    def __init__(self):
        self.sent = 0
        self.in_call = False
        self.opening = StopMatcher([OPEN])  # holds back text that may yet become <tool_call>

    def content_delta(self, text: str) -> str:
        if self.in_call:
            return ""
        start = text.find(OPEN)
        if start != -1:
            self.in_call = True
            safe = len(text[:start].rstrip())
        else:
            held = self.opening.held_back(text)
            safe = len(text[:len(text) - held].rstrip())  # whitespace before a call is not content
        if safe <= self.sent:
            return ""
        delta, self.sent = text[self.sent:safe], safe
        return delta
