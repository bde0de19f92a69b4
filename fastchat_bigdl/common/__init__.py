"""Shared by every process (worker, API server, launcher, bench): where files live, proxy
bypass for loopback, serving an app with uvicorn, FastChat's error schema, request-body
validation middleware, stop strings, chat-template rendering, grammar checks.

May import: FastChat, transformers' tokenizers (given, never loaded here), llguidance,
``autogen_local``. Imports nothing else from ``fastchat_bigdl``.
"""
