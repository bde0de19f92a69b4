"""Keep HTTP proxies away from loopback traffic (shared with the torch-free client side)."""
from autogen_local.netenv import LOOPBACK_HOSTS, bypass_proxy_for_loopback

__all__ = ["LOOPBACK_HOSTS", "bypass_proxy_for_loopback"]
