"""fastchat-bigdl: serve LLMs in low-bit on Intel GPUs and CPUs through FastChat."""
import os as _os

# The proxy settings as the user has them, for `fastchat-bigdl doctor` to diagnose
# (taken before autogen_local, imported next, adds loopback to no_proxy).
ORIGINAL_PROXY_ENV = {k: _os.environ.get(k) for k in
                      ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")}

from fastchat_bigdl.common.netenv import bypass_proxy_for_loopback  # noqa: E402

__version__ = "0.1.0"

# Before anything creates an HTTP client: a proxy must never see loopback traffic.
bypass_proxy_for_loopback()

from fastchat_bigdl.common.logs import fastchat_imported_without_log_files  # noqa: E402

with fastchat_imported_without_log_files():  # importing this package writes no file
    from fastchat_bigdl.adapter import BigDLLLMAdapter, register  # noqa: E402

bigdl_adapter = register()

__all__ = ["BigDLLLMAdapter", "bigdl_adapter", "__version__"]
