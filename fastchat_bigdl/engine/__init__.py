"""The decode engine: one thread that runs every stream's token loop and batches their
model calls (``scheduler``, inline on the caller's thread for in-process use), a lean
forward on the low-bit library's CPU kernels (``llama_runner``) for the decoder families
described in ``families``, the KV caches behind one protocol (``kv_cache``), and the
choice between the lean forward and the Hugging Face one (``selection``).

May import: ``lowbit``, ``common``. Never imports ``worker``, ``api``, ``stack`` or
``bench``; the worker drives it from its model thread.
"""
