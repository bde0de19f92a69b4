"""Why this exists: fschat 0.2.36's API server was written for pydantic 1, and users'
tools (gradio 4+, autogen-agentchat, ag2, LangChain) need pydantic 2 in the same
environment. On pydantic 2 FastChat's server imports and answers (``BaseSettings`` comes
from ``pydantic.v1``; ``.dict()`` and ``.parse_obj()`` still exist, deprecated) except
one call: every streamed response serializes its chunks with
``chunk.json(exclude_unset=True, ensure_ascii=False)``, and pydantic 2's ``json()``
rejects ``json.dumps`` keyword arguments, so each stream broke right after its headers.

The whole layer: FastChat's own protocol models (the classes defined in its protocol
modules, nothing else) get a ``json()`` that accepts pydantic 1's arguments and encodes
what pydantic 2's ``model_dump`` gives. On pydantic 1 it changes nothing. Applied once,
by ``api.server.build_app``, so importing this package alters nothing.
"""
from __future__ import annotations

import importlib
import json
from typing import Any, List

import pydantic

# FastChat's modules whose models its API server serializes.
PROTOCOL_MODULES = ("fastchat.protocol.openai_api_protocol", "fastchat.protocol.api_protocol")
PYDANTIC_MAJOR = int(pydantic.VERSION.split(".")[0])
_ADAPTED = "__fastchat_bigdl_pydantic1_json__"


def pydantic1_json(self, *, include=None, exclude=None, by_alias: bool = False,
                   exclude_unset: bool = False, exclude_defaults: bool = False,
                   exclude_none: bool = False, **dumps_kwargs: Any) -> str:
    """pydantic 1's ``BaseModel.json`` signature on a pydantic 2 model."""
    data = self.model_dump(mode="json", include=include, exclude=exclude, by_alias=by_alias,
                           exclude_unset=exclude_unset, exclude_defaults=exclude_defaults,
                           exclude_none=exclude_none)
    return json.dumps(data, **dumps_kwargs)


def protocol_models() -> List[type]:
    """The pydantic models FastChat's protocol modules define (not those they import)."""
    models = []
    for name in PROTOCOL_MODULES:
        module = importlib.import_module(name)
        models += [value for value in vars(module).values()
                   if isinstance(value, type) and issubclass(value, pydantic.BaseModel)
                   and value.__module__ == module.__name__]
    return models


def adapt_fastchat_protocol() -> List[str]:
    """Give FastChat's protocol models a pydantic-1 ``json()`` on pydantic 2 (idempotent);
    returns the names of the models adapted this call."""
    if PYDANTIC_MAJOR < 2:
        return []
    adapted = []
    for model in protocol_models():
        if not model.__dict__.get(_ADAPTED):
            model.json = pydantic1_json
            setattr(model, _ADAPTED, True)
            adapted.append(model.__name__)
    return adapted
