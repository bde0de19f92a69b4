"""Where fastchat-bigdl keeps converted models, low-bit weights and logs."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FASTCHAT_BIGDL_CACHE, else $XDG_CACHE_HOME/fastchat-bigdl, else ~/.cache/fastchat-bigdl."""
    explicit = os.environ.get("FASTCHAT_BIGDL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastchat-bigdl"


def low_bit_cache_dir() -> Path:
    return cache_dir() / "low-bit"
