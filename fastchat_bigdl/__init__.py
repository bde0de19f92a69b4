"""fastchat-bigdl: serve LLMs in low-bit on Intel GPUs and CPUs through FastChat."""
from fastchat_bigdl.netenv import bypass_proxy_for_loopback

__version__ = "0.1.0"

# Before anything creates an HTTP client: a proxy must never see loopback traffic.
bypass_proxy_for_loopback()

from fastchat_bigdl.adapter import BigDLLLMAdapter, register  # noqa: E402

bigdl_adapter = register()

__all__ = ["BigDLLLMAdapter", "bigdl_adapter", "__version__"]
