"""The grammar a reply must follow, for llguidance (Lark syntax with inline JSON
schemas): tool calls, and replies in JSON (``response_format``). Calls are written in
the model's own format (``formats``); by default the Hermes format that Qwen2.5, Hermes
and SmolLM3 are trained on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Why llguidance: it is the maintained constrained-decoding engine behind llama.cpp's,
vLLM's and SGLang's structured output, a dependency-free wheel that needs no particular
transformers version (outlines and xgrammar need pydantic 2 or transformers >= 4.38),
and it computes a token mask in well under a millisecond.

Arguments (and JSON replies to a ``json_schema``) are generated as strict JSON: compact
separators, no free whitespace, and objects with declared ``properties`` limited to them
(``additionalProperties: false`` unless the schema says otherwise), so the output always
validates against the schema given and a small model cannot pad it with whitespace or
invented keys until it runs out of tokens.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Dict, Iterable, List, Optional

from fastchat_bigdl.api.tool_calling.formats import HERMES, ToolFormat
from fastchat_bigdl.common.grammar_check import grammar_problem

OPEN, CLOSE = "<tool_call>", "</tool_call>"  # the Hermes format's tags
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _strict(schema: Any) -> Any:
    """A copy where objects that declare ``properties`` (and say nothing of
    ``additionalProperties``) allow no other keys."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict(v) if k not in ("enum", "const", "default", "examples") else v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_schema(name: str, parameters: Dict[str, Any], arguments_key: str = "arguments") -> Dict[str, Any]:
    """JSON schema of one call: ``{"name": <name>, "arguments": <parameters>}`` (the
    arguments under ``arguments_key``)."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, arguments_key: _strict(copy.deepcopy(parameters))},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def _styled(schema: Dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": JSON_STYLE})


def _calls_json(tools: List, arguments_key: str) -> str:
    schemas = [call_schema(t.name, t.parameters, arguments_key) for t in tools]
    return _styled(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


def reply_schema(schema: Dict[str, Any], strict: bool = True) -> Dict[str, Any]:
    """The schema a JSON reply is generated from (``strict``: see the module doc)."""
    return _strict(copy.deepcopy(schema)) if strict else schema


def _call_rule(fmt: ToolFormat, opener_token_id: Optional[int], opener: Optional[str] = None) -> str:
    """The text of one call in ``fmt``, ``call`` being its JSON (``opener``: what to write
    instead of the format's opener)."""
    opener = fmt.opener if opener is None else opener
    if fmt.opener_is_special_token and opener_token_id is not None:
        opener = f"<[{opener_token_id}]>"
    else:
        opener = json.dumps(opener) if opener else ""
    body = '" "? "[" call "]"' if fmt.in_list else "call"
    closer = json.dumps(fmt.closer) if fmt.closer else ""
    return " ".join(p for p in (opener, body, closer) if p)


def _free_rules(fmt: ToolFormat) -> List[str]:
    """Under ``auto``: free text, or a call (after text, where the format allows that);
    once a call has begun, only a valid call can follow."""
    if fmt.text_before_call:
        marker = fmt.opener.rstrip()
        after_marker = _call_rule(fmt, None, opener=fmt.opener[len(marker):])
        return ["start: free | tagged", "free: TEXT", r"TEXT: /(.|\n)*/",
                f"tagged: prefix {after_marker}", f"prefix[lazy]: TEXT {json.dumps(marker)}"]
    if fmt.opener:  # a special-token opener: free text cannot contain it
        return ["start: free | calltext", "free: TEXT", r"TEXT: /(.|\n)*/"]
    # The reply itself is the call: free text must not start like one.
    return ["start: free | calltext", "free: TEXT", r"TEXT: /([^{\s](.|\n)*)?/"]


def output_grammar(tools: Iterable = (), forced: bool = False, reply: Optional[Dict[str, Any]] = None,
                   fmt: ToolFormat = HERMES, opener_token_id: Optional[int] = None) -> Optional[str]:
    """The grammar for a reply, or None when the output is free.

    ``tools``: the functions the model may call, written in ``fmt`` (``opener_token_id``:
    the id of its special opener token); ``forced``: the reply is exactly one call.
    Otherwise the model may reply (in free text, or in JSON following ``reply`` when
    given) or call, and once a call has begun only a valid call (then the end) can
    follow."""
    tools = list(tools)
    if not tools and reply is None:
        return None
    if not tools:
        rules = ["start: reply"]
    elif forced:
        rules = ["start: calltext"]
    elif reply is not None:
        rules = ["start: reply | calltext"]
    else:
        rules = _free_rules(fmt)
    if tools:
        rules.append(f"calltext: {_call_rule(fmt, opener_token_id)}")
        rules.append("call: %json " + _calls_json(tools, fmt.arguments_key))
    if reply is not None and not forced:
        rules.append("reply: %json " + _styled(reply))
    return "%llguidance {}\n" + "\n".join(rules) + "\n"


def check_enforceable(tool) -> Optional[str]:
    """The reason a tool's parameters schema cannot be enforced, or None."""
    return grammar_problem(output_grammar([tool], forced=True))


def schema_problem(schema: Dict[str, Any]) -> Optional[str]:
    """The reason a reply schema cannot be enforced, or None."""
    return grammar_problem(output_grammar(reply=schema))
