"""Classic AutoGen (pyautogen 0.2.x on openai<2, httpx; ag2 0.x takes the same code) with
autogen_local.config() against the served model: a real two-agent chat."""
import sys

import pytest

import autogen_local

autogen = pytest.importorskip("autogen")


def test_classic_autogen_is_the_classic_flavor_and_needs_no_torch():
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


def test_classic_autogen_round_trip_runs_the_registered_function(tool_server):
    from typing import Literal

    from typing_extensions import Annotated

    cfg = autogen_local.config(base_url=tool_server.base_url, wait=False, max_tokens=160)
    cfg["tool_choice"] = "required"  # a random-weight model would not choose to call on its own
    assistant = autogen.AssistantAgent("assistant", llm_config=cfg, system_message="You check the weather.")
    user = autogen.UserProxyAgent("user", human_input_mode="NEVER", code_execution_config=False,
                                  max_consecutive_auto_reply=2)
    calls = []

    @user.register_for_execution()
    @assistant.register_for_llm(description="Weather forecast for a city")
    def get_weather(city: Annotated[Literal["paris", "oslo"], "the city"],
                    days: Annotated[int, "how many days"]) -> str:
        calls.append((city, days))
        return f"sunny in {city} for {days} days"

    result = user.initiate_chat(assistant, message="weather in paris for 3 days?", max_turns=2)
    assert calls and calls[0][0] in ("paris", "oslo") and isinstance(calls[0][1], int)
    roles = [m.get("role") for m in result.chat_history]
    tool_turn = roles.index("tool")
    assert "sunny in" in result.chat_history[tool_turn]["content"]
    assert roles[tool_turn + 1:] == ["assistant"]  # the model answered after the result went back
