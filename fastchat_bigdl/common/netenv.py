"""Keep HTTP proxies away from loopback traffic (shared with the torch-free client side).

Imported lazily: importing ``autogen_local`` merges loopback into ``no_proxy`` (its
contract for client scripts), and importing this module must change nothing.
"""
from __future__ import annotations

from typing import Dict, MutableMapping, Optional


def bypass_proxy_for_loopback(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Merge the loopback hosts into ``NO_PROXY``/``no_proxy`` of ``environ`` (default
    this process's), keeping the user's entries; returns the merged value."""
    from autogen_local.netenv import bypass_proxy_for_loopback as merge

    return merge(environ)


def proxy_settings_before_bypass() -> Dict[str, Optional[str]]:
    """The proxy variables as the user set them, before this process bypassed loopback."""
    from autogen_local.netenv import proxy_settings_before_bypass as before

    return before()
