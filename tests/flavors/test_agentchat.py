"""autogen-agentchat 0.4+ with autogen_local.model_client() against the served model."""
import asyncio
import sys

import pytest

import autogen_local

autogen_agentchat = pytest.importorskip("autogen_agentchat")


def test_importing_autogen_local_here_needs_no_torch():
    assert "torch" not in sys.modules and autogen_local.detect_flavor() == "agentchat"


def test_assistant_agent_completes_a_task(server):
    from autogen_agentchat.agents import AssistantAgent

    client = autogen_local.model_client(base_url=server.base_url, max_tokens=8)
    assert client.model_info["family"] == "unknown"

    async def run():
        agent = AssistantAgent("assistant", model_client=client, system_message="You are helpful.")
        try:
            return await agent.run(task="hello world how are you today")
        finally:
            await client.close()

    result = asyncio.run(run())
    assert [m.source for m in result.messages] == ["user", "assistant"]
    assert isinstance(result.messages[-1].content, str)
    assert result.messages[-1].models_usage.prompt_tokens > 0


def test_long_history_is_trimmed_by_the_async_client(server):
    from autogen_core.models import AssistantMessage, SystemMessage, UserMessage

    words = "the quick brown fox jumps over the lazy dog " * 5
    messages = [SystemMessage(content="You are helpful.")]
    for i in range(6):
        messages.append(UserMessage(content=f"{i} {words}", source="user") if i % 2 == 0
                        else AssistantMessage(content=f"{i} {words}", source="assistant"))
    messages.append(UserMessage(content="and now?", source="user"))

    async def create(history_limit):
        client = autogen_local.model_client(server.model, server.base_url, wait=False,
                                            history_limit=history_limit, max_tokens=4)
        try:
            return await client.create(messages)
        finally:
            await client.close()

    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="maximum context length is 256 tokens"):
        asyncio.run(create(False))
    result = asyncio.run(create(True))
    assert result.usage.prompt_tokens < 256


def test_assistant_agent_calls_a_tool_and_answers_from_its_result(tool_server):
    from typing import Literal

    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.messages import ToolCallExecutionEvent, ToolCallRequestEvent

    client = autogen_local.model_client(base_url=tool_server.base_url, max_tokens=160)
    assert client.model_info["function_calling"]
    plain_create = client.create

    async def create(messages, *, tools=(), tool_choice="auto", **kwargs):
        # A random-weight model would never choose to call: require a call when tools are offered.
        return await plain_create(messages, tools=tools, tool_choice="required" if tools else tool_choice, **kwargs)

    client.create = create
    calls = []

    async def get_weather(city: Literal["paris", "oslo"], days: int) -> str:
        """Weather forecast for a city."""
        calls.append((city, days))
        return f"sunny in {city} for {days} days"

    async def run():
        agent = AssistantAgent("assistant", model_client=client, tools=[get_weather], reflect_on_tool_use=True,
                               system_message="You check the weather.")
        try:
            return await agent.run(task="weather in paris for 3 days?")
        finally:
            await client.close()

    result = asyncio.run(run())
    kinds = [type(m).__name__ for m in result.messages]
    assert kinds == ["TextMessage", "ToolCallRequestEvent", "ToolCallExecutionEvent", "TextMessage"], kinds
    request = next(m for m in result.messages if isinstance(m, ToolCallRequestEvent))
    assert request.content[0].name == "get_weather" and calls and calls[0][0] in ("paris", "oslo")
    execution = next(m for m in result.messages if isinstance(m, ToolCallExecutionEvent))
    assert not execution.content[0].is_error and "sunny in" in execution.content[0].content
    assert isinstance(result.messages[-1].content, str)  # the answer after the result went back


def test_structured_output_comes_back_as_the_pydantic_model(tool_server):
    from typing import Literal

    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.messages import StructuredMessage
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        city: Literal["paris", "oslo"]
        days: int = Field(ge=1, le=7)
        rain: bool

    client = autogen_local.model_client(base_url=tool_server.base_url, max_tokens=80)

    async def run():
        agent = AssistantAgent("assistant", model_client=client, output_content_type=Forecast,
                               system_message="You forecast the weather.")
        try:
            return await agent.run(task="weather in paris for 3 days?")
        finally:
            await client.close()

    result = asyncio.run(run())
    last = result.messages[-1]
    assert isinstance(last, StructuredMessage) and isinstance(last.content, Forecast)
    assert last.content.city in ("paris", "oslo") and 1 <= last.content.days <= 7
