"""The grammar a tool call must follow, for llguidance (Lark syntax with inline JSON
schemas). Calls use the Hermes format that Qwen2.5, Hermes and SmolLM3 are trained on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Why llguidance: it is the maintained constrained-decoding engine behind llama.cpp's,
vLLM's and SGLang's structured output, a dependency-free wheel that needs no particular
transformers version (outlines and xgrammar need pydantic 2 or transformers >= 4.38),
and it computes a token mask in well under a millisecond.

Arguments are generated as strict JSON: compact separators, no free whitespace, and
objects limited to their declared properties (``additionalProperties: false`` unless
the schema says otherwise), so a call always validates against the schema given and a
small model cannot pad it with whitespace or invented keys until it runs out of tokens.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Dict, Iterable, Optional

OPEN, CLOSE = "<tool_call>", "</tool_call>"
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _strict(schema: Any) -> Any:
    """A copy where objects without ``additionalProperties`` allow no other keys."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict(v) if k not in ("enum", "const", "default", "examples") else v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_schema(name: str, parameters: Dict[str, Any]) -> Dict[str, Any]:
    """JSON schema of one call: ``{"name": <name>, "arguments": <parameters>}``."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": _strict(copy.deepcopy(parameters))},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _calls_json(tools: Iterable) -> str:
    schemas = [call_schema(t.name, t.parameters) for t in tools]
    top = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return json.dumps({**top, "x-guidance": JSON_STYLE})


def tool_call_grammar(tools: Iterable, forced: bool) -> str:
    """``forced``: the output is exactly one call. Otherwise the model may write text
    and stop, or open ``<tool_call>`` at any point, after which only a valid call (then
    the end) can follow."""
    tools = list(tools)
    call = f'"{OPEN}\\n" call "\\n{CLOSE}"'
    if forced:
        rules = [f"start: {call}"]
    else:
        rules = ["start: free | tagged", "free: TEXT", r"TEXT: /(.|\n)*/",
                 f'tagged: prefix "\\n" call "\\n{CLOSE}"', f'prefix[lazy]: TEXT "{OPEN}"']
    rules.append("call: %json " + _calls_json(tools))
    return "%llguidance {}\n" + "\n".join(rules) + "\n"


def grammar_error(grammar: str) -> Optional[str]:
    """Why llguidance cannot compile ``grammar`` (None when it can)."""
    import llguidance

    return llguidance.LLMatcher.validate_grammar(grammar, None) or None


def check_enforceable(tool) -> Optional[str]:
    """The reason a tool's parameters schema cannot be enforced, or None."""
    error = grammar_error(tool_call_grammar([tool], forced=True))
    if not error:
        return None
    # llguidance reports "at L(C): <reason>" followed by the grammar; keep the reason.
    first = error.strip().splitlines()[0]
    return first.split(": ", 1)[-1] if first.startswith("at ") else first
