"""The BigDL model adapter, registered in FastChat's adapter registry."""
from __future__ import annotations

import re

from fastchat.conversation import Conversation
from fastchat.model.model_adapter import (
    BaseModelAdapter,
    get_model_adapter,
    model_adapters,
    register_model_adapter,
)

from fastchat_bigdl.lowbit.loader import DEFAULT_LOW_BIT, load_low_bit_model

_BIGDL = re.compile("bigdl", re.IGNORECASE)


def own_model_path(model_path: str) -> str:
    """The path with the ``bigdl`` naming convention removed, so FastChat's own
    adapters can recognise the underlying model (``Llama-2-7b-chat-hf-bigdl``)."""
    return _BIGDL.sub("", model_path)


def underlying_adapter(model_path: str) -> BaseModelAdapter:
    """The adapter FastChat would pick for this model without fastchat-bigdl."""
    return get_model_adapter(own_model_path(model_path))


class BigDLLLMAdapter(BaseModelAdapter):
    """Loads any causal LM through the low-bit library (ipex-llm / bigdl-llm).

    Matches model paths containing ``bigdl`` (the naming convention users follow);
    ``fastchat_bigdl.model_worker --bigdl_load`` uses it for every model.
    """

    def match(self, model_path: str) -> bool:
        return _BIGDL.search(model_path) is not None

    def load_model(self, model_path: str, from_pretrained_kwargs: dict):
        kwargs = dict(from_pretrained_kwargs)
        return load_low_bit_model(
            model_path,
            low_bit=kwargs.pop("low_bit", DEFAULT_LOW_BIT),
            torch_dtype=kwargs.pop("torch_dtype", None),
            revision=kwargs.pop("revision", "main"),
            trust_remote_code=kwargs.pop("trust_remote_code", False),
            optimize_model=kwargs.pop("optimize_model", None),
            backend=kwargs.pop("backend", None),
            cache=kwargs.pop("cache", None),
        )

    def get_default_conv_template(self, model_path: str) -> Conversation:
        return underlying_adapter(model_path).get_default_conv_template(model_path)


def register() -> BigDLLLMAdapter:
    """Register the adapter once, ahead of FastChat's own adapters.

    FastChat's registry is first-match-wins and ``register_model_adapter`` appends
    after its catch-all, so ours is moved to the front (a ``...-llama-2-bigdl`` path
    must reach it before the Llama-2 adapter); the lookup cache is cleared so an
    earlier lookup cannot hide it.
    """
    for adapter in model_adapters:
        if isinstance(adapter, BigDLLLMAdapter):
            return adapter
    register_model_adapter(BigDLLLMAdapter)
    model_adapters.insert(0, model_adapters.pop())
    get_model_adapter.cache_clear()
    return model_adapters[0]


def conversation_for(model_path: str, tokenizer, logger=None) -> Conversation:
    """The prompt template for a low-bit model: FastChat's specific template for the
    model when it knows one, else the tokenizer's own chat template, else FastChat's
    generic fallback (with a warning, since answers will suffer, unless the tokenizer's
    template renders the chats: ``prompts_need_template``)."""
    from fastchat_bigdl.common.chat_template import conversation_from_chat_template, prompts_need_template

    adapter = underlying_adapter(model_path)
    if type(adapter) is not BaseModelAdapter:
        return adapter.get_default_conv_template(model_path)
    conv = conversation_from_chat_template(tokenizer)
    if conv is not None:
        return conv
    fallback = adapter.get_default_conv_template(model_path)
    if logger is not None and not prompts_need_template(fallback, tokenizer):  # else the template renders
        logger.warning(
            "FastChat has no template for %s and its tokenizer has no usable chat template; "
            "using FastChat's generic one. Pass --conv-template to choose one.",
            model_path,
        )
    return fallback
