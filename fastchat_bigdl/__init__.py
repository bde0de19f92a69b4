"""fastchat-bigdl: serve LLMs in low-bit on Intel GPUs and CPUs through FastChat.

Importing the package (or any module of it) defines things and changes nothing else: it
registers no adapter, leaves the environment alone and imports neither torch nor
transformers unless the module imported needs them. The one exception is how FastChat is
first imported: with its ``LOGDIR`` empty, so FastChat's modules write no log file when
imported (``common.logs``). The entry points do the rest when they start: the worker and
``serve`` register the BigDL adapter with FastChat's registry and every process keeps
proxies off loopback. Code that runs upstream ``fastchat.serve.model_worker`` on a
``-bigdl`` model directory calls ``register()`` first.
"""
from fastchat_bigdl.common.logs import import_fastchat_without_log_files

__version__ = "0.1.0"

import_fastchat_without_log_files()


def register():
    """Register the BigDL adapter in FastChat's adapter registry (once, first in line);
    returns it. Imports the low-bit loading stack (torch, transformers)."""
    from fastchat_bigdl.adapter import register as register_adapter

    return register_adapter()


__all__ = ["register", "__version__"]
