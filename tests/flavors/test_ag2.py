"""ag2 (the maintained successor of classic AutoGen: ``import autogen``, pydantic 2) with
autogen_local.config() against the served model: a real two-agent chat."""
import sys

import pytest

import autogen_local

autogen = pytest.importorskip("autogen")


def test_ag2_is_the_classic_flavor_and_needs_no_torch():
    assert "torch" not in sys.modules and autogen_local.detect_flavor() == "classic"


def test_two_agent_chat_finishes_with_the_default_reply_cap(tool_server):
    cfg = autogen_local.config(base_url=tool_server.base_url)  # a context that holds 512-token turns
    assert cfg["max_tokens"] == 512  # an agent turn cannot run to the end of the context
    assistant = autogen.AssistantAgent("assistant", llm_config=cfg, system_message="You are helpful.",
                                       max_consecutive_auto_reply=2)
    user = autogen.UserProxyAgent("user", human_input_mode="NEVER", code_execution_config=False,
                                  max_consecutive_auto_reply=2, llm_config=cfg, system_message="You ask.")
    result = user.initiate_chat(assistant, message="hello world how are you today")
    history = result.chat_history
    assert len(history) == 5  # the opening message, then 2 auto-replies from each agent
    assert all(isinstance(m["content"], str) for m in history)


def test_history_beyond_the_context_is_trimmed_not_an_error(server):
    from openai import BadRequestError

    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 5)
    messages = [{"role": "system", "content": "You are helpful."}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {text}"} for i in range(6)]
    messages.append({"role": "user", "content": "and now?"})
    untrimmed = autogen.OpenAIWrapper(**autogen_local.config(server.model, server.base_url, wait=False,
                                                             history_limit=False))
    with pytest.raises(BadRequestError, match="40303"):
        untrimmed.create(messages=messages, max_tokens=4)
    trimmed = autogen.OpenAIWrapper(**autogen_local.config(server.model, server.base_url, wait=False))
    response = trimmed.create(messages=messages, max_tokens=4)
    assert response.choices[0].message.content is not None and response.usage.prompt_tokens < 256
