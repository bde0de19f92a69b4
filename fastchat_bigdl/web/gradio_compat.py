"""gradio 6 for FastChat 0.2.36's chat page, without touching gradio itself.

The page builds ``gr.Chatbot(show_copy_button=True)`` (a keyword gradio 6 dropped for
``buttons=["copy"]``) and fills it with ``[[user, bot], ...]`` pairs (gradio 6 takes only
the messages format). ``for_fastchat_page(gradio)`` is a stand-in for the ``gradio``
module that the page module is given as its ``gr``: every name is gradio's own except
``Chatbot``, which makes a real gradio Chatbot with the new keyword and converts the
pairs on that instance. gradio's class and every other user of gradio are left alone.
"""
from __future__ import annotations

import types
from typing import Any, List


def pairs_to_messages(value: Any) -> Any:
    """FastChat's ``[[user, bot], ...]`` as gradio 6 messages; messages pass through. A
    pair's ``None`` (the answer not started yet) is left out; a ``(text, images)`` turn
    of FastChat's vision page keeps its text."""
    if not value or all(isinstance(m, dict) for m in value):
        return value
    messages: List[dict] = []
    for pair in value:
        for role, content in zip(("user", "assistant"), pair):
            if content is None:
                continue
            if isinstance(content, (tuple, list)):
                content = content[0]
            messages.append({"role": role, "content": content})
    return messages


def _chatbot_factory(gradio: types.ModuleType):
    def Chatbot(*args, show_copy_button: bool = False, **kwargs):  # noqa: N802 (gradio's name)
        if show_copy_button:
            kwargs.setdefault("buttons", ["copy"])
        chatbot = gradio.Chatbot(*args, **kwargs)
        postprocess = chatbot.postprocess
        chatbot.postprocess = lambda value: postprocess(pairs_to_messages(value))
        return chatbot

    return Chatbot


def gradio_major(gradio: types.ModuleType) -> int:
    return int(gradio.__version__.split(".")[0])


def for_fastchat_page(gradio: types.ModuleType) -> types.ModuleType:
    """``gradio`` itself before gradio 6; from 6 on, the stand-in described above."""
    if gradio_major(gradio) < 6:
        return gradio
    page_gradio = types.ModuleType("gradio", "gradio, as FastChat 0.2.36's page expects it (gradio 6)")
    page_gradio.__getattr__ = lambda name: getattr(gradio, name)
    page_gradio.Chatbot = _chatbot_factory(gradio)
    return page_gradio
