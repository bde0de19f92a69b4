"""Which AutoGen is installed, read from package metadata (nothing is imported)."""
from __future__ import annotations

import importlib.metadata
from typing import Optional

from packaging.version import Version

LEGACY = "legacy"  # pyautogen 0.1.x: autogen.oai.Completion on openai<1
CLASSIC = "classic"  # pyautogen 0.2.x / ag2 0.x: OpenAIWrapper, config_list with base_url
AG2 = "ag2"  # ag2 1.x: module ag2, Agent(config=OpenAIConfig(...)) on openai 3
AGENTCHAT = "agentchat"  # autogen-agentchat 0.4+ (what pyautogen 0.10 installs)
FLAVORS = (LEGACY, CLASSIC, AG2, AGENTCHAT)


class AutoGenNotInstalled(RuntimeError):
    pass


def _version(dist: str) -> Optional[Version]:
    try:
        return Version(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return None


def detect_flavor() -> str:
    """The flavor of the installed AutoGen. If several are installed, classic wins
    (its llm_config dicts are what most scripts pass), then ag2 1.x, then agentchat
    (``model_client()`` / ``model_config()`` choose theirs explicitly)."""
    pyautogen = _version("pyautogen") or _version("autogen")
    ag2 = _version("ag2")
    if pyautogen is not None and pyautogen < Version("0.2"):
        return LEGACY
    if (pyautogen is not None and pyautogen < Version("0.4")) or (ag2 is not None and ag2 < Version("1")):
        return CLASSIC
    if ag2 is not None:
        return AG2
    if _version("autogen-agentchat") is not None:
        return AGENTCHAT
    raise AutoGenNotInstalled(
        "no AutoGen is installed: pip install 'fastchat-bigdl[autogen]' (ag2 and autogen-agentchat), "
        "or pyautogen 0.2 (classic) / 0.1 (legacy, openai 0.28) in an environment of their own"
    )
