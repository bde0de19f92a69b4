"""The boundary to the low-bit library: which one is installed (ipex-llm or bigdl-llm),
which formats run where, loading and converting a checkpoint (GGUF files included), the
cache of converted weights, device placement (CPU, Intel GPU) and out-of-memory detection.

The only place that imports ipex-llm / bigdl-llm (or intel-extension-for-pytorch).
May import: ``common``. Never imports ``worker``, ``api``, ``stack`` or ``bench``.
"""
