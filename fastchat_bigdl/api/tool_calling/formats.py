"""The tool-call formats models are trained on, each a small description that the
grammar (``grammar``), the parser (``parse``) and the prompt (``prompt``) read:

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, after
  optional text (Qwen2.5/3, Hermes, SmolLM3; also what the generic tool prompt asks for);
- ``llama3_json``: the whole reply is ``{"name": ..., "parameters": {...}}`` (Llama
  3.1/3.2/3.3 as their chat templates instruct);
- ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`` where ``[TOOL_CALLS]``
  is one special token (Mistral 7B v0.3, Nemo, Small); its template wants call ids of
  nine alphanumerics.

A model's own chat template tells which one it was trained on (``format_of``): a model
called in its own format calls tools the way it learned to.
"""
from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class ToolFormat:
    name: str
    opener: str = ""  # what starts a call in the output ("" : the reply itself is the call)
    closer: str = ""  # what ends one
    arguments_key: str = "arguments"
    opener_is_special_token: bool = False  # the output must keep special tokens to show it
    in_list: bool = False  # calls are written as a JSON list after the opener
    text_before_call: bool = True  # a reply may start with text and then call
    call_id_length: Optional[int] = None  # the template insists on alphanumeric ids this long
    signature: Tuple[str, ...] = ()  # what a chat template written for this format contains

    def call_id(self, given: str) -> str:
        """The id a template of this format accepts for ``given`` (the same one for a call
        and for its result)."""
        n = self.call_id_length
        if n is None or (len(given) == n and given.isalnum()):
            return given
        digest = int.from_bytes(hashlib.sha256(given.encode()).digest(), "big")
        alphabet = string.ascii_letters + string.digits
        out = []
        for _ in range(n):
            digest, index = divmod(digest, len(alphabet))
            out.append(alphabet[index])
        return "".join(out)


HERMES = ToolFormat("hermes", opener="<tool_call>\n", closer="\n</tool_call>", signature=("<tool_call>",))
LLAMA3_JSON = ToolFormat("llama3_json", arguments_key="parameters", text_before_call=False,
                         signature=('"parameters"', "<|start_header_id|>"))
MISTRAL = ToolFormat("mistral", opener="[TOOL_CALLS]", opener_is_special_token=True, in_list=True,
                     text_before_call=False, call_id_length=9, signature=("[TOOL_CALLS]",))
FORMATS = (HERMES, MISTRAL, LLAMA3_JSON)  # checked in this order


def format_of(template: Optional[str]) -> Optional[ToolFormat]:
    """The format a chat template that renders ``tools`` was written for, or None (no
    template, a template that ignores tools, or a format not known here)."""
    if not template or "tools" not in template:
        return None
    return next((f for f in FORMATS if all(s in template for s in f.signature)), None)
