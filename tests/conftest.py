import os
import sys
import tempfile
from pathlib import Path

import pytest

# FastChat writes log files into $LOGDIR at import time; keep them out of the tree.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Converted models and low-bit weights go to a per-run cache, not the user's.
os.environ.setdefault("FASTCHAT_BIGDL_CACHE", tempfile.mkdtemp(prefix="fastchat-bigdl-test-cache-"))
os.environ.setdefault("LOGDIR", tempfile.mkdtemp(prefix="fastchat-bigdl-test-logs-"))
sys.path.insert(0, str(Path(__file__).parent))

from helpers import CHATML_TEMPLATE, build_tiny_llama  # noqa: E402

# tests/flavors needs an AutoGen that cannot share this environment (legacy pyautogen on
# openai 0.28, autogen-agentchat on pydantic 2): nox runs it in virtualenvs of its own.
FLAVOR_ENV = "FASTCHAT_BIGDL_FLAVOR_TESTS"
collect_ignore_glob = [] if os.environ.get(FLAVOR_ENV) else ["flavors/*"]


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
