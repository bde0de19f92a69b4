"""Which AutoGen is installed, read from package metadata (nothing is imported)."""
from __future__ import annotations

import importlib.metadata
from typing import Optional

from packaging.version import Version

LEGACY = "legacy"  # pyautogen 0.1.x: autogen.oai.Completion on openai<1
CLASSIC = "classic"  # pyautogen 0.2.x / ag2: OpenAIWrapper, config_list with base_url
AGENTCHAT = "agentchat"  # autogen-agentchat 0.4+ (what pyautogen 0.10 installs)
FLAVORS = (LEGACY, CLASSIC, AGENTCHAT)


class AutoGenNotInstalled(RuntimeError):
    pass


def _version(dist: str) -> Optional[Version]:
    try:
        return Version(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return None


def detect_flavor() -> str:
    """The flavor of the installed AutoGen; classic wins if several are installed,
    since its llm_config dicts are what most scripts pass."""
    pyautogen = _version("pyautogen") or _version("autogen")
    if pyautogen is not None and pyautogen < Version("0.2"):
        return LEGACY
    if (pyautogen is not None and pyautogen < Version("0.4")) or _version("ag2") is not None:
        return CLASSIC
    if _version("autogen-agentchat") is not None:
        return AGENTCHAT
    raise AutoGenNotInstalled(
        "no AutoGen is installed: pip install 'fastchat-bigdl[autogen]' (pyautogen 0.2), "
        "or autogen-agentchat 'autogen-ext[openai]' for AutoGen 0.4+"
    )
