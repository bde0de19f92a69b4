"""Each served model's prompt template on the chat page comes from its worker.

FastChat's page asks ``get_conversation_template(model_name)``, which guesses from the
name; for a model FastChat does not know (the demo model, SmolLM2) that is the generic
one-shot prompt, not the template the worker derived from the model's tokenizer and the
API server uses. ``WorkerTemplateAdapter``, put first in FastChat's adapter registry
in the page's process only, answers for every model the controller serves with the
template its worker sends (``/worker_get_conv_template``, as FastChat's API server asks).
"""
from __future__ import annotations

import requests
from fastchat.conversation import Conversation
from fastchat.model.model_adapter import BaseModelAdapter, get_model_adapter, model_adapters

from fastchat_bigdl.common.chat_template import conversation_from_dict

TIMEOUT = 10


class WorkerTemplateAdapter(BaseModelAdapter):
    """Matches the names the controller has a worker for; the template is that worker's."""

    def __init__(self, controller_url: str):
        self.controller_url = controller_url.rstrip("/")

    def worker_address(self, model_name: str) -> str:
        try:
            r = requests.post(self.controller_url + "/get_worker_address", json={"model": model_name},
                              timeout=TIMEOUT)
            return r.json().get("address", "") if r.ok else ""
        except (requests.RequestException, ValueError):
            return ""

    def match(self, model_path: str) -> bool:
        return bool(self.worker_address(model_path))

    def get_default_conv_template(self, model_path: str) -> Conversation:
        address = self.worker_address(model_path)
        r = requests.post(address + "/worker_get_conv_template", json={"model": model_path}, timeout=TIMEOUT)
        r.raise_for_status()
        return conversation_from_dict(r.json()["conv"])


def use_worker_templates(controller_url: str) -> WorkerTemplateAdapter:
    """Put the adapter ahead of FastChat's own (first match wins) and clear the lookup cache."""
    adapter = WorkerTemplateAdapter(controller_url)
    model_adapters.insert(0, adapter)
    get_model_adapter.cache_clear()
    return adapter
