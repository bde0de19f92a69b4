"""The launcher and diagnostics: ``fastchat-bigdl serve`` (controller, workers and API
server as supervised child processes), ``fastchat-bigdl doctor``, and the embedded demo
model.

May import: ``common``, ``lowbit``, ``api`` and ``worker`` constants; starts the worker
and the API server as processes, never in-process.
"""
