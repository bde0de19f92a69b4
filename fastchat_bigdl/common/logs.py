"""FastChat's console and log files, made predictable.

FastChat's server modules, when imported, redirect stdout/stderr through a logger (so
``--help`` came out as ``2026-… | INFO | stdout | usage: …``) and open their log file
(``model_worker_<id>.log``, ``openai_api_server.log``) in ``$LOGDIR``, default the
current directory. Here importing leaves no file: ``fastchat_bigdl`` imports FastChat
with ``LOGDIR`` empty (FastChat's own switch for "no file"), argument parsing writes to
the real console, and each server process opens its FastChat log file once it actually
serves, in ``$LOGDIR`` as the user set it (``serve`` sets it to its ``--log-dir``) or
else in ``~/.cache/fastchat-bigdl/logs``.
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

from fastchat_bigdl.common.paths import cache_dir

FASTCHAT_LOGDIR_ENV = "LOGDIR"
# $LOGDIR as the user gave it, read before FastChat is imported (None: not given).
_user_log_dir: Optional[str] = None


def import_fastchat_without_log_files() -> None:
    """Import FastChat's constants with ``LOGDIR`` empty: FastChat reads it once, on first
    import. The environment is restored after, so child processes see the user's setting."""
    global _user_log_dir
    _user_log_dir = os.environ.get(FASTCHAT_LOGDIR_ENV)
    if "fastchat.constants" in sys.modules:  # imported before this package: too late
        return
    os.environ[FASTCHAT_LOGDIR_ENV] = ""
    try:
        import fastchat.constants  # noqa: F401
    finally:
        if _user_log_dir is None:
            os.environ.pop(FASTCHAT_LOGDIR_ENV, None)
        else:
            os.environ[FASTCHAT_LOGDIR_ENV] = _user_log_dir


def log_dir() -> Path:
    return Path(_user_log_dir) if _user_log_dir else cache_dir() / "logs"


def log_to_file(filename: str) -> Path:
    """Write this process's log, stdout and stderr to ``log_dir()/filename`` as FastChat
    would (daily rotation, its format); returns the path."""
    directory = log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    handler = logging.handlers.TimedRotatingFileHandler(path, when="D", utc=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)  # FastChat's stdout/stderr loggers propagate here
    return path


@contextlib.contextmanager
def plain_console() -> Iterator[None]:
    """The real stdout/stderr for argparse (help, usage errors), whatever FastChat did to them."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
