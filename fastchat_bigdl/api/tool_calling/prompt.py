"""Tools and tool messages in the prompt.

Where the model's own chat template knows tools in the Hermes format (it reads a
``tools`` variable and writes ``<tool_call>``, as Qwen2.5's does), the template renders
everything. Otherwise the generic tool prompt below goes into the system message, calls
the assistant made are written back in the same ``<tool_call>`` format, and tool results
go in a user turn as ``<tool_response>`` blocks; FastChat's conversation template for
the model renders the rest, exactly as for a plain chat.
"""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from fastchat.conversation import Conversation, SeparatorStyle

from fastchat_bigdl.api.tool_calling.grammar import CLOSE, OPEN
from fastchat_bigdl.api.tool_calling.spec import ToolRequest

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
    calls = [c.get("function", {}) for c in message.get("tool_calls") or []]
    if message.get("function_call"):
        calls.append(message["function_call"])
    return [{"name": c.get("name"), "arguments": _arguments(c.get("arguments", {}))} for c in calls]


def _written_call(call: Dict[str, Any]) -> str:
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


def conversation_from_dict(conv: Dict[str, Any]) -> Conversation:
    """The worker's template, as FastChat's API server rebuilds it (get_gen_params)."""
    return Conversation(
        name=conv["name"], system_template=conv["system_template"], system_message=conv["system_message"],
        roles=conv["roles"], messages=list(conv["messages"]), offset=conv["offset"],
        sep_style=SeparatorStyle(conv["sep_style"]), sep=conv["sep"], sep2=conv["sep2"],
        stop_str=conv["stop_str"], stop_token_ids=conv["stop_token_ids"],
    )


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


def template_knows_tools(template: Optional[str]) -> bool:
    return bool(template) and "tools" in template and OPEN in template


def _hf_message(message: Dict[str, Any]) -> Dict[str, Any]:
    """A message as Hugging Face chat templates expect it (arguments as objects)."""
    out = {"role": message["role"], "content": _text(message.get("content"))}
    if message["role"] == "function":
        out["role"] = "tool"
    for key in ("name", "tool_call_id"):
        if key in message:
            out[key] = message[key]
    calls = _calls(message)
    if calls:
        out["tool_calls"] = [{"type": "function", "function": c} for c in calls]
    return out


def render_with_template(template: str, bos_token: str, eos_token: str, messages: List[Dict[str, Any]],
                         request: ToolRequest) -> str:
    from fastchat_bigdl.common.chat_template import render

    tokens = SimpleNamespace(bos_token=bos_token, eos_token=eos_token)
    tools = [t.openai() for t in request.tools] if request.offered() else None
    return render(template, [_hf_message(m) for m in messages], tokens, tools=tools)


def render_prompt(conv: Dict[str, Any], template_info: Optional[Dict[str, Any]], messages: List[Dict[str, Any]],
                  request: ToolRequest) -> str:
    """The prompt for a chat with tools: the model's own template when it knows tools,
    the generic tool prompt through FastChat's conversation template otherwise."""
    template = (template_info or {}).get("chat_template")
    if template_knows_tools(template):
        return render_with_template(template, template_info.get("bos_token") or "",
                                    template_info.get("eos_token") or "", messages, request)
    return render_generic(conversation_from_dict(conv), messages, request)
