"""Keep HTTP proxies away from loopback traffic."""
from __future__ import annotations

import os
from typing import Dict, MutableMapping, Optional

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
# This process's proxy variables as the user set them, kept by the first bypass of
# os.environ (a diagnosis must see them, not the merged values).
_before_bypass: Optional[Dict[str, Optional[str]]] = None


def proxy_settings_before_bypass() -> Dict[str, Optional[str]]:
    """The proxy variables as they were before this process first bypassed loopback."""
    if _before_bypass is not None:
        return dict(_before_bypass)
    return {key: os.environ.get(key) for key in PROXY_VARIABLES}


def bypass_proxy_for_loopback(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Merge the loopback hosts into NO_PROXY and no_proxy, keeping the user's entries.

    A corporate proxy in http_proxy/HTTPS_PROXY otherwise intercepts requests to the
    local controller and API server. Returns the merged value.
    """
    global _before_bypass
    env = os.environ if environ is None else environ
    if env is os.environ and _before_bypass is None:
        _before_bypass = proxy_settings_before_bypass()
    entries = []
    for key in ("NO_PROXY", "no_proxy"):
        for item in env.get(key, "").split(","):
            item = item.strip()
            if item and item not in entries:
                entries.append(item)
    entries += [h for h in LOOPBACK_HOSTS if h not in entries]
    merged = ",".join(entries)
    env["NO_PROXY"] = env["no_proxy"] = merged
    return merged
