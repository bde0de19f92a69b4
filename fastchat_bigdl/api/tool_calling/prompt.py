"""Tools and tool messages in the prompt.

Where the model's own chat template knows tools in a format of ``formats`` (it reads a
``tools`` variable and writes calls as Qwen2.5's, Llama 3.1's or Mistral's do), the
template renders everything, and the reply is read in that format. Otherwise the generic tool prompt below goes into the system message, calls
the assistant made are written back in the same ``<tool_call>`` format, and tool results
go in a user turn as ``<tool_response>`` blocks; FastChat's conversation template for
the model renders the rest, exactly as for a plain chat.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from fastchat.conversation import Conversation

from fastchat_bigdl.api.tool_calling.formats import HERMES, ToolFormat, format_of
from fastchat_bigdl.api.tool_calling.grammar import CLOSE, OPEN
from fastchat_bigdl.api.tool_calling.spec import ToolRequest
from fastchat_bigdl.common.chat_template import conversation_from_dict

# Worded after the function-calling prompts small models are trained on (APIGen style):
# a concrete example call works better for them than placeholders like <function-name>.
GENERIC_TOOL_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible functions. Based on the question, you will need to make a function call to achieve the purpose.

You have access to the following tools:
<tools>
{tools}
</tools>

The output MUST strictly adhere to the following format, and NO other text MUST be included. Please make sure the parameter type is correct, and take the argument values from the question.
<tool_call>
{{"name": "func_name", "arguments": {{"argument1": "value1", "argument2": "value2"}}}}
</tool_call>
Function results come back within <tool_response></tool_response> XML tags."""


def generic_tool_prompt(request: ToolRequest) -> str:
    tools = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in request.tools)
    return GENERIC_TOOL_PROMPT.format(tools=tools)


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _calls(message: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The calls an assistant message made: {"id", "name", "arguments"} (legacy
    ``function_call``: id None)."""
    calls = [(c.get("id"), c.get("function", {})) for c in message.get("tool_calls") or []]
    if message.get("function_call"):
        calls.append((None, message["function_call"]))
    return [{"id": i, "name": c.get("name"), "arguments": _arguments(c.get("arguments", {}))} for i, c in calls]


def _written_call(call: Dict[str, Any]) -> str:
    call = {"name": call["name"], "arguments": call["arguments"]}
    return f"{OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{CLOSE}"


def generic_turns(messages: List[Dict[str, Any]]) -> (Optional[str], List[List[str]]):
    """(system message, [[side, text], ...]) with side 0 = user, 1 = assistant; tool
    results join the user side, consecutive turns of one side are merged."""
    system, turns = None, []
    for message in messages:
        role = message.get("role")
        if role == "system":
            system = _text(message.get("content"))
            continue
        if role in ("tool", "function"):
            side, text = 0, f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"
        elif role == "assistant":
            parts = [_text(message.get("content"))] + [_written_call(c) for c in _calls(message)]
            side, text = 1, "\n".join(p for p in parts if p)
        else:
            side, text = 0, _text(message.get("content"))
        if turns and turns[-1][0] == side:
            turns[-1][1] += "\n" + text
        else:
            turns.append([side, text])
    return system, turns


def render_generic(conv: Conversation, messages: List[Dict[str, Any]], request: ToolRequest) -> str:
    system, turns = generic_turns(messages)
    tool_prompt = generic_tool_prompt(request) if request.offered() else ""
    has_system_slot = "{system_message}" in conv.system_template
    if tool_prompt and has_system_slot:
        base = system if system is not None else conv.system_message
        system = f"{base}\n\n{tool_prompt}" if base else tool_prompt
    elif tool_prompt:  # no system slot in this template: the tools go before the first user turn
        first_user = next((t for t in turns if t[0] == 0), None)
        if first_user is not None:
            first_user[1] = f"{tool_prompt}\n\n{first_user[1]}"
    if system is not None:
        conv.set_system_message(system)
    for side, text in turns:
        conv.append_message(conv.roles[side], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def _hf_messages(messages: List[Dict[str, Any]], fmt: ToolFormat) -> List[Dict[str, Any]]:
    """Messages as Hugging Face chat templates expect them: arguments as objects, every
    call and result with an id the template accepts (legacy ``function_call``/
    ``function`` pairs get one; a result is matched to the latest call without one)."""
    out, last_id = [], None
    for number, message in enumerate(messages):
        hf = {"role": message["role"], "content": _text(message.get("content"))}
        if message["role"] == "function":
            hf["role"] = "tool"
        for key in ("name", "tool_call_id"):
            if key in message:
                hf[key] = message[key]
        calls = _calls(message)
        for call in calls:
            call["id"] = last_id = call["id"] or f"call{number}"
        if calls:
            hf["tool_calls"] = [{"id": fmt.call_id(c.pop("id")), "type": "function", "function": c} for c in calls]
        if hf["role"] == "tool":
            hf["tool_call_id"] = fmt.call_id(hf.get("tool_call_id") or last_id or f"call{number}")
        out.append(hf)
    return out


def _generic_messages(messages: List[Dict[str, Any]], request: ToolRequest) -> List[Dict[str, str]]:
    """Plain messages for a template that does not know tools: the generic tool prompt in
    the system message, calls and results written as in ``render_generic``."""
    system, turns = generic_turns(messages)
    if request.offered():
        tool_prompt = generic_tool_prompt(request)
        system = f"{system}\n\n{tool_prompt}" if system else tool_prompt
    plain = [{"role": "system", "content": system}] if system is not None else []
    return plain + [{"role": ("user", "assistant")[side], "content": text} for side, text in turns]


def render_with_template(template_info: Dict[str, Any], messages: List[Dict[str, Any]],
                         request: ToolRequest) -> str:
    """``messages`` (already as the template expects them) through the model's template."""
    from fastchat_bigdl.common.chat_template import render

    tokens = SimpleNamespace(bos_token=template_info.get("bos_token") or "",
                             eos_token=template_info.get("eos_token") or "")
    tools = [t.openai() for t in request.tools] if request.offered() else None
    return render(template_info["chat_template"], messages, tokens, tools=tools)


@dataclass
class Prompt:
    text: str
    fmt: ToolFormat  # the format calls are written in
    stop: Any  # the stop string(s) and token ids of whatever rendered it
    stop_token_ids: List[int]


def render_prompt(conv: Dict[str, Any], template_info: Optional[Dict[str, Any]], messages: List[Dict[str, Any]],
                  request: ToolRequest) -> Prompt:
    """The prompt for a chat, and the format calls are written in: the model's own
    template and format when the template knows tools; else the generic tool prompt
    (Hermes format) in the model's template where the worker says FastChat's
    conversation template renders its chats differently, or through that conversation
    template otherwise. A template that refuses the messages raises jinja2's
    ``TemplateError``."""
    info = template_info or {}
    fmt = format_of(info.get("chat_template"))
    if fmt is None and info.get("chat_template") and info.get("render_with_template"):
        fmt, messages = HERMES, _generic_messages(messages, request)
    elif fmt is not None:
        messages = _hf_messages(messages, fmt)
    else:
        text = render_generic(conversation_from_dict(conv), messages, request)
        return Prompt(text, HERMES, conv["stop_str"], conv["stop_token_ids"] or [])
    return Prompt(render_with_template(info, messages, request), fmt, info.get("stop"), info.get("stop_token_ids") or [])
