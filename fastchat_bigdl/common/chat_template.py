"""Turn a tokenizer's Jinja chat template into a FastChat ``Conversation``.

FastChat's API server renders prompts itself from the ``Conversation`` the worker
hands it, so a model FastChat does not know (SmolLM2, ...) would get the generic
one-shot prompt. Here we render a probe conversation with the model's own template
and pick the FastChat template that produces exactly the same text; failing that we
derive a ``NO_COLON_SINGLE`` conversation (prefix + message + separator per turn)
from the rendered pieces and keep it only if it reproduces the template too.
"""
from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Dict, List, Optional

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fastchat.conversation import Conversation, SeparatorStyle, conv_templates

logger = logging.getLogger(__name__)

SYSTEM, USER_1, ASSISTANT_1, USER_2, ASSISTANT_2, USER_3 = (
    "\x01system-probe\x01",
    "\x01user-one\x01",
    "\x01assistant-one\x01",
    "\x01user-two\x01",
    "\x01assistant-two\x01",
    "\x01user-three\x01",
)


def _messages(system: Optional[str], *turns: str) -> List[Dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return msgs


def tokenizer_chat_template(tokenizer) -> Optional[str]:
    """The Jinja template shipped with the tokenizer (works on transformers 4.31,
    which predates ``tokenizer.chat_template``)."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        template = getattr(tokenizer, "init_kwargs", {}).get("chat_template")
    return template if isinstance(template, str) and template.strip() else None


def render(template: str, messages: List[Dict[str, str]], tokenizer, **variables) -> str:
    """Render like transformers' apply_chat_template(tokenize=False), minus a BOS the
    template adds itself (FastChat prompts leave the BOS to the tokenizer). ``variables``
    go to the template as well (``tools=[...]``)."""

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    # As transformers does (Llama 3.1+ templates write today's date with it).
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    # As transformers does: Jinja's own tojson HTML-escapes '<', which tool schemas must not get.
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False, separators=None, sort_keys=False: \
        json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    text = env.from_string(template).render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
        **variables,
    )
    bos = tokenizer.bos_token
    if bos and "bos_token" in template and text.startswith(bos):
        text = text[len(bos):]
    return text


def conversation_prompt(conv: Conversation, messages: List[Dict[str, str]]) -> str:
    """The prompt FastChat's API server renders for OpenAI-style ``messages`` with
    ``conv`` (a system message replaces the template's; the reply is left open)."""
    conv = conv.copy()
    for message in messages:
        if message["role"] == "system":
            conv.set_system_message(message["content"])
        else:
            conv.append_message(conv.roles[0 if message["role"] == "user" else 1], message["content"])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def _conversation_prompt(conv: Conversation, system: Optional[str], *turns: str) -> str:
    return conversation_prompt(conv, _messages(system, *turns))


def _reproduces(conv: Conversation, template: str, tokenizer) -> bool:
    probes = [(SYSTEM, USER_1, ASSISTANT_1, USER_2), (SYSTEM, USER_1, ASSISTANT_1, USER_2, ASSISTANT_2, USER_3)]
    try:
        return all(
            _conversation_prompt(conv, p[0], *p[1:]) == render(template, _messages(p[0], *p[1:]), tokenizer)
            for p in probes
        )
    except Exception:  # a FastChat template that cannot render this shape
        return False


def _derive(template: str, tokenizer) -> Optional[Conversation]:
    """Split the rendered probe into system prefix/suffix, role prefixes and separator."""
    text = render(template, _messages(SYSTEM, USER_1, ASSISTANT_1, USER_2), tokenizer)
    try:
        head, rest = text.split(SYSTEM)
        after_system, rest = rest.split(USER_1)
        user_to_assistant, rest = rest.split(ASSISTANT_1)
        assistant_to_user, generation_prefix = rest.split(USER_2)
    except ValueError:
        return None
    # user_to_assistant = sep + assistant_prefix, assistant_to_user = sep + user_prefix
    n = 0
    while n < min(len(user_to_assistant), len(assistant_to_user)) and user_to_assistant[n] == assistant_to_user[n]:
        n += 1
    sep = user_to_assistant[:n]
    user_prefix, assistant_prefix = assistant_to_user[n:], user_to_assistant[n:]
    if not after_system.endswith(user_prefix) or generation_prefix != sep + assistant_prefix:
        return None
    system_suffix = after_system[: len(after_system) - len(user_prefix)]
    escape = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    conv = Conversation(
        name="tokenizer-chat-template",
        system_template=escape(head) + "{system_message}" + escape(system_suffix),
        roles=(user_prefix, assistant_prefix),
        sep_style=SeparatorStyle.NO_COLON_SINGLE,
        sep=sep,
    )
    return conv if _reproduces(conv, template, tokenizer) else None


def _default_system_message(conv: Conversation, template: str, tokenizer) -> str:
    """What the template puts in the system slot when the user sends none."""
    placeholder = "\x01default-system\x01"
    shape = _conversation_prompt(conv, placeholder, USER_1)
    before, after = shape.split(placeholder)
    text = render(template, _messages(None, USER_1), tokenizer)
    if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
        return text[len(before): len(text) - len(after)]
    return ""


def template_stop_tokens(template: str, tokenizer) -> List[str]:
    """Special tokens that close an assistant turn (e.g. ``<|im_end|>``), plus EOS."""
    text = render(template, _messages(None, USER_1, ASSISTANT_1, USER_2), tokenizer)
    after = text.split(ASSISTANT_1, 1)[1].lstrip()
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    stops = [tok for tok in specials if tok and after.startswith(tok)][:1]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def prompts_need_template(conv: Conversation, tokenizer) -> bool:
    """Whether chats must be rendered by the tokenizer's own template because ``conv`` (the
    worker's FastChat template) renders them differently: a template FastChat's
    conversation shapes cannot express (Llama 3.1's date header, Mistral's system message
    in the last user turn, Gemma's system-less turns) that does render a plain chat."""
    template = tokenizer_chat_template(tokenizer)
    if template is None:
        return False
    try:
        render(template, _messages(SYSTEM, USER_1, ASSISTANT_1, USER_2), tokenizer)
    except Exception:  # a template that cannot render a plain chat: FastChat's conversation it is
        return False
    return not _reproduces(conv, template, tokenizer)


def conversation_from_chat_template(tokenizer) -> Optional[Conversation]:
    """A FastChat Conversation that renders exactly like the tokenizer's chat template,
    or None when the tokenizer has none or no conversation shape reproduces it."""
    template = tokenizer_chat_template(tokenizer)
    if template is None:
        return None
    try:
        render(template, _messages(SYSTEM, USER_1, ASSISTANT_1, USER_2), tokenizer)
    except Exception as exc:
        logger.warning("the tokenizer's chat template does not render a plain chat: %s", exc)
        return None
    # Prefer FastChat's own template (keeps any special handling keyed on its name).
    names = sorted(conv_templates, key=lambda n: n != "chatml")
    conv = next((conv_templates[n].copy() for n in names if _reproduces(conv_templates[n], template, tokenizer)), None)
    conv = conv or _derive(template, tokenizer)
    if conv is None:
        return None
    conv.system_message = _default_system_message(conv, template, tokenizer)
    stops = template_stop_tokens(template, tokenizer)
    conv.stop_str = stops[0] if stops else None
    conv.stop_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in stops]
    conv.messages = []
    return conv


def conversation_from_dict(conv: Dict[str, Any]) -> Conversation:
    """The template a worker sends (``/worker_get_conv_template``), rebuilt as FastChat's API
    server does (get_gen_params)."""
    return Conversation(
        name=conv["name"], system_template=conv["system_template"], system_message=conv["system_message"],
        roles=conv["roles"], messages=list(conv["messages"]), offset=conv["offset"],
        sep_style=SeparatorStyle(conv["sep_style"]), sep=conv["sep"], sep2=conv["sep2"],
        stop_str=conv["stop_str"], stop_token_ids=conv["stop_token_ids"],
    )
