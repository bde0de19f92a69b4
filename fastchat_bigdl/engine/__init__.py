"""The decode engine: a lean forward for Llama-family models on the low-bit library's
CPU kernels (``llama_runner``), its per-sequence KV storage (``kv_cache``), and the
choice between it and the Hugging Face forward (``selection``).

May import: ``lowbit``, ``common``. Never imports ``worker``, ``api``, ``stack`` or
``bench``; the worker drives it from its model thread.
"""
