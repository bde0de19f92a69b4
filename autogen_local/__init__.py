"""autogen_local: AutoGen agents against the local FastChat / fastchat-bigdl API.

Torch-free and small: importing it pulls in neither torch, transformers nor the
low-bit library. Importing it keeps HTTP proxies away from loopback.
"""
from autogen_local.netenv import bypass_proxy_for_loopback

bypass_proxy_for_loopback()

from autogen_local.llm_config import config, model_client, model_config  # noqa: E402
from autogen_local.endpoint import (  # noqa: E402
    DEFAULT_BASE_URL,
    EndpointNotReady,
    ModelChoiceError,
    list_models,
    wait_ready,
)
from autogen_local.flavor import detect_flavor  # noqa: E402
from autogen_local.history import trim_messages  # noqa: E402
from autogen_local.runtime_patch import patch, patched, unpatch  # noqa: E402

__all__ = [
    "DEFAULT_BASE_URL", "EndpointNotReady", "ModelChoiceError", "config", "detect_flavor",
    "list_models", "model_client", "model_config", "patch", "patched", "trim_messages", "unpatch", "wait_ready",
]
