import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# FastChat writes log files into $LOGDIR at import time; keep them out of the tree.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Converted models and low-bit weights go to a per-run cache, not the user's; the
# directories this run made are removed when it ends (the demo model's conversion alone is
# 1.6 GB, and left behind they filled the disk run after run).
_MADE_HERE = []
for _name, _prefix in (("FASTCHAT_BIGDL_CACHE", "fastchat-bigdl-test-cache-"),
                       ("LOGDIR", "fastchat-bigdl-test-logs-")):
    if _name not in os.environ:
        os.environ[_name] = tempfile.mkdtemp(prefix=_prefix)
        _MADE_HERE.append(os.environ[_name])
sys.path.insert(0, str(Path(__file__).parent))

from helpers import CHATML_TEMPLATE, build_tiny_llama  # noqa: E402

# tests/flavors runs each AutoGen flavor with autogen_local alone (no torch), and the ones
# that cannot share this environment (classic pyautogen 0.2 on openai 1.x, legacy on
# openai 0.28): nox runs it in virtualenvs of its own.
FLAVOR_ENV = "FASTCHAT_BIGDL_FLAVOR_TESTS"
collect_ignore_glob = [] if os.environ.get(FLAVOR_ENV) else ["flavors/*"]


def pytest_sessionfinish(session, exitstatus):
    for path in _MADE_HERE:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Named like a real chat model so FastChat's Llama-2 adapter recognises it."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "Llama-2-7b-chat-hf")


@pytest.fixture(scope="session")
def tiny_chatml(tmp_path_factory) -> Path:
    """A model FastChat has no adapter for, whose tokenizer carries a ChatML template."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tinyllm-instruct", chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_tools(tmp_path_factory) -> Path:
    """The ChatML model with a context long enough for a tool prompt (its tiny
    tokenizer spends about one token per character of a JSON schema)."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tinyllm-tools", chat_template=CHATML_TEMPLATE,
                            context=4096)


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FASTCHAT_BIGDL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
