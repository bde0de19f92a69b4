"""The tool and output-format part of a chat completions request: checked, then
normalised.

OpenAI's ``tools``/``tool_choice``, the legacy ``functions``/``function_call`` and a JSON
``response_format`` become one ``ToolRequest``; anything malformed raises
``request_errors.Invalid`` (a 400 in FastChat's error schema), including a schema the
decoder cannot enforce.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from fastchat.constants import ErrorCode

from fastchat_bigdl.api.tool_calling.grammar import check_enforceable, reply_schema, schema_problem
from fastchat_bigdl.common.errors import Invalid

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TOOLS = 128
# Compiling schemas into a grammar costs about 1 ms per KiB (llguidance); past this a
# request is refused before anything is compiled.
MAX_SCHEMA_BYTES = 256 << 10
TOOL_KEYS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
CHOICES = ("none", "auto", "required")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class Tool:
    name: str
    description: str = ""
    parameters: Dict[str, Any] = field(default_factory=lambda: dict(EMPTY_PARAMETERS))

    def openai(self) -> Dict[str, Any]:
        """The tool as OpenAI (and Jinja chat templates) spell it."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class ToolRequest:
    tools: List[Tool]
    choice: str  # "none" | "auto" | "required" | "named"
    named: Optional[str] = None  # the function tool_choice names
    legacy: bool = False  # asked with functions/function_call: answer with function_call
    reply: Optional[Dict[str, Any]] = None  # JSON schema a text reply must follow (response_format)

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")

    def offered(self) -> List[Tool]:
        """The tools the model may call (a named choice offers only that one)."""
        if self.choice == "named":
            return [t for t in self.tools if t.name == self.named]
        return [] if self.choice == "none" else list(self.tools)


def _wants_json(data: dict) -> bool:
    fmt = data.get("response_format")
    return not (fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"))


def uses_tools_or_json(data: dict) -> bool:
    """Whether the request needs the tool-calling handler: tools offered, a conversation
    that already holds tool calls or tool results, or a JSON ``response_format``."""
    if any(data.get(key) is not None for key in TOOL_KEYS) or _wants_json(data):
        return True
    messages = data.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") in ("tool", "function") or m.get("tool_calls") or m.get("function_call"))
        for m in messages
    )


def _check_parameters(where: str, parameters: Any) -> Dict[str, Any]:
    if parameters is None:
        return dict(EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise Invalid(f"{where}.parameters must be a JSON schema object, not {json.dumps(parameters)[:40]}")
    kind = parameters.get("type", "object")
    if kind != "object":
        raise Invalid(f"{where}.parameters must describe an object (\"type\": \"object\"), not {json.dumps(kind)[:40]}")
    return parameters


def _tool(where: str, function: Any) -> Tool:
    if not isinstance(function, dict):
        raise Invalid(f"{where} must be an object with 'name' and 'parameters'")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise Invalid(f"{where}.name must be 1-64 letters, digits, '_', '.' or '-', not {json.dumps(name)[:70]}")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise Invalid(f"{where}.description must be a string")
    return Tool(name, description, _check_parameters(where, function.get("parameters")))


def _tools(data: dict) -> (List[Tool], bool):
    tools, functions = data.get("tools"), data.get("functions")
    if tools is not None and functions is not None:
        raise Invalid("send either 'tools' or the legacy 'functions', not both")
    legacy = functions is not None
    listed = functions if legacy else tools
    if listed is None:
        return [], legacy
    key = "functions" if legacy else "tools"
    if not isinstance(listed, list):
        raise Invalid(f"'{key}' must be a list")
    if len(listed) > MAX_TOOLS:
        raise Invalid(f"'{key}' may list at most {MAX_TOOLS} functions", ErrorCode.PARAM_OUT_OF_RANGE)
    result = []
    for i, item in enumerate(listed):
        if legacy:
            result.append(_tool(f"functions[{i}]", item))
            continue
        if not isinstance(item, dict) or item.get("type", "function") != "function":
            raise Invalid(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}; "
                          "only function tools are supported")
        result.append(_tool(f"tools[{i}].function", item.get("function")))
    names = [t.name for t in result]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise Invalid(f"'{key}' lists the function {duplicate!r} twice")
    return result, legacy


def _choice(data: dict, tools: List[Tool], legacy: bool) -> (str, Optional[str]):
    key = "function_call" if legacy else "tool_choice"
    other = "tool_choice" if legacy else "function_call"
    if data.get(other) is not None:
        raise Invalid(f"'{other}' goes with '{'tools' if other == 'tool_choice' else 'functions'}'; "
                      f"this request uses '{key}'")
    choice = data.get(key)
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        allowed = ("none", "auto") if legacy else CHOICES
        if choice not in allowed:
            raise Invalid(f"'{key}' must be one of {', '.join(allowed)} or a named function, not {json.dumps(choice)[:40]}")
        if choice != "none" and not tools:
            raise Invalid(f"'{key}' is {choice!r} but no {'functions' if legacy else 'tools'} were given")
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) and not legacy else choice
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        shape = "{'name': ...}" if legacy else "{'type': 'function', 'function': {'name': ...}}"
        raise Invalid(f"'{key}' must be a string or {shape}")
    if name not in {t.name for t in tools}:
        raise Invalid(f"'{key}' names {name!r}, which is not among the {'functions' if legacy else 'tools'} given")
    return "named", name


def _check_tool_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "tool" and not isinstance(message.get("tool_call_id", ""), str):
            raise Invalid(f"messages[{i}].tool_call_id must be a string")
        if role == "function" and not isinstance(message.get("name"), str):
            raise Invalid(f"messages[{i}] has role 'function' and needs the function's 'name'")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise Invalid(f"messages[{i}].tool_calls must be a list on an assistant message")
            for j, call in enumerate(calls):
                _check_call(f"messages[{i}].tool_calls[{j}]", call.get("function") if isinstance(call, dict) else None)
        if message.get("function_call") is not None:
            _check_call(f"messages[{i}].function_call", message["function_call"])


def _check_call(where: str, function: Any) -> None:
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments", ""), (str, dict))):
        raise Invalid(f"{where} must hold a function {{'name': str, 'arguments': JSON string}}")


def _reply(data: dict) -> Optional[Dict[str, Any]]:
    """The JSON schema ``response_format`` asks the reply to follow (None: free text)."""
    fmt = data.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise Invalid("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise Invalid("'response_format.json_schema' must be {'name': ..., 'schema': {JSON schema}}")
    problem = schema_problem(reply_schema(schema))
    if problem:
        raise Invalid(f"response_format.json_schema.schema is not a JSON schema this server can enforce: {problem}")
    return reply_schema(schema)


def _check_schema_size(data: dict) -> None:
    size = len(json.dumps([data.get(key) for key in ("tools", "functions", "response_format")]))
    if size > MAX_SCHEMA_BYTES:
        raise Invalid(f"the request's tools and response_format schemas take {size >> 10} KiB; at most "
                      f"{MAX_SCHEMA_BYTES >> 10} KiB can be enforced", ErrorCode.PARAM_OUT_OF_RANGE)


def tool_request(data: dict) -> ToolRequest:
    """The request's tool and output-format part, checked (raises ``Invalid``) and
    normalised."""
    _check_schema_size(data)
    tools, legacy = _tools(data)
    choice, named = _choice(data, tools, legacy)
    if "parallel_tool_calls" in data and not isinstance(data["parallel_tool_calls"], (bool, type(None))):
        raise Invalid("'parallel_tool_calls' must be true or false")
    _check_tool_messages(data.get("messages"))
    request = ToolRequest(tools, choice, named, legacy, _reply(data))
    for i, tool in enumerate(tools):
        problem = check_enforceable(tool)
        if problem:
            where = f"functions[{i}]" if legacy else f"tools[{i}].function"
            raise Invalid(f"{where}.parameters is not a JSON schema this server can enforce: {problem}")
    return request
