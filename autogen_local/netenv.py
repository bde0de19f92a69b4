"""Keep HTTP proxies away from loopback traffic."""
from __future__ import annotations

import os
from typing import MutableMapping, Optional

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def bypass_proxy_for_loopback(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Merge the loopback hosts into NO_PROXY and no_proxy, keeping the user's entries.

    A corporate proxy in http_proxy/HTTPS_PROXY otherwise intercepts requests to the
    local controller and API server. Returns the merged value.
    """
    env = os.environ if environ is None else environ
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
