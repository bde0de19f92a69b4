"""ag2 1.x (module ``ag2``: async ``Agent`` with a ``config=OpenAIConfig``, openai 3, whose
HTTP client is httpx2) with autogen_local.model_config() against the served model."""
import asyncio
import sys

import pytest

import autogen_local
from helpers import ag2_long_chat

ag2 = pytest.importorskip("ag2")


def test_ag2_is_its_own_flavor_and_needs_no_torch():
    assert "torch" not in sys.modules and autogen_local.detect_flavor() == "ag2"
    assert autogen_local.history.http_library() == "httpx2"


def test_a_chat_of_two_turns_with_the_default_reply_cap(tool_server):
    config = autogen_local.model_config(base_url=tool_server.base_url)  # a context that holds 512-token turns
    assert config.max_tokens == 512  # an agent turn cannot run to the end of the context
    agent = ag2.Agent("assistant", "You are helpful.", config=config)

    async def chat():
        first = await agent.ask("hello world how are you today")
        return first, await first.ask("and tomorrow?")

    first, second = asyncio.run(chat())
    assert isinstance(first.body, str) and isinstance(second.body, str)
    assert 0 < second.response.usage.completion_tokens <= 512


def test_history_beyond_the_context_is_trimmed_not_an_error(server):
    from openai import BadRequestError

    untrimmed = autogen_local.model_config(server.model, server.base_url, wait=False, history_limit=False,
                                           max_tokens=4)
    with pytest.raises(BadRequestError, match="maximum context length is 256 tokens"):
        ag2_long_chat(untrimmed)
    reply = ag2_long_chat(autogen_local.model_config(server.model, server.base_url, wait=False, max_tokens=4))
    assert reply.body is not None and reply.response.usage.prompt_tokens < 256
