"""Today's clients against a served model (the ``clients`` nox session: the newest
``openai`` SDK and ``langchain-openai`` in a virtualenv of their own, pydantic 2, no
torch): every feature a current client or agent framework sends, as a new user would
send it. The model has random weights: answers are checked for shape, not sense."""
import json

import pytest

openai = pytest.importorskip("openai")
langchain_openai = pytest.importorskip("langchain_openai")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather",
                                                "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "what is the weather in paris"}]


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(api_key="EMPTY", base_url=tool_server.base_url, max_retries=0, timeout=300)


def chat(client, model, **body):
    return client.chat.completions.create(model=model, messages=body.pop("messages", ASK),
                                          **{"max_tokens": 16, **body})


def test_models_completions_and_embeddings(client, tool_server):
    assert tool_server.model in [m.id for m in client.models.list()]
    done = client.completions.create(model=tool_server.model, prompt="the quick brown fox", max_tokens=8,
                                     temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=tool_server.model, prompt="the quick brown fox", max_tokens=8, temperature=0, stream=True))
    assert streamed == done.choices[0].text.replace("\ufffd", "")
    vector = client.embeddings.create(model=tool_server.model, input="hello").data[0].embedding
    assert len(vector) > 0
    sampled = [client.completions.create(model=tool_server.model, prompt="the quick brown fox", max_tokens=8,
                                         temperature=1.0, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # the seed holds on completions too
    last = list(client.completions.create(model=tool_server.model, prompt="hello", max_tokens=4, stream=True,
                                          stream_options={"include_usage": True}))[-1]
    assert last.choices == [] and 0 < last.usage.completion_tokens <= 4


def test_chat_plain_streamed_n_stop_and_repeatable(client, tool_server):
    m = tool_server.model
    first = chat(client, m, temperature=0)
    assert chat(client, m, temperature=0).choices[0].message.content == first.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, m, temperature=0, stream=True)
                       if c.choices)
    assert streamed == first.choices[0].message.content.replace("\ufffd", "")
    two = chat(client, m, n=2, temperature=1.0, seed=4)
    assert [c.index for c in two.choices] == [0, 1]
    assert chat(client, m, n=2, temperature=1.0, seed=4).choices[1].message.content == two.choices[1].message.content
    stopped = chat(client, m, temperature=0, max_tokens=32, stop=[first.choices[0].message.content[2:4] or "zz"])
    assert stopped.choices[0].finish_reason in ("stop", "length")


def test_what_agent_frameworks_send(client, tool_server):
    m = tool_server.model
    usage = [c for c in chat(client, m, stream=True, stream_options={"include_usage": True})][-1]
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    capped = chat(client, m, max_tokens=None, max_completion_tokens=3, temperature=0)
    assert capped.usage.completion_tokens <= 3
    scored = chat(client, m, temperature=0, logprobs=True, top_logprobs=2, user="u1", metadata={"run": "x"})
    content = scored.choices[0].logprobs.content
    assert content and all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)


def test_tool_calls_round_trip_and_structured_output(client, tool_server):
    m = tool_server.model
    called = chat(client, m, tools=CHAT_TOOLS, tool_choice="required", max_tokens=120, temperature=0,
                  parallel_tool_calls=False)
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) >= {"city", "days"}
    answer = chat(client, m, tools=CHAT_TOOLS, max_tokens=16, messages=[
        *ASK, called.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")

    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=12)
        days: int = Field(ge=1, le=7)

    parsed = client.chat.completions.parse(model=m, messages=ASK, response_format=Weather, max_tokens=80,
                                           temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Weather)
    as_object = chat(client, m, response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    assert isinstance(json.loads(as_object.choices[0].message.content), dict)


def test_responses_text_stream_and_function_tools(client, tool_server):
    m = tool_server.model
    text = client.responses.create(model=m, input="tell me about the fox", max_output_tokens=16, temperature=0)
    assert text.output_text is not None and text.usage.output_tokens > 0
    events = list(client.responses.create(model=m, input="tell me about the fox", max_output_tokens=16,
                                          temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    tools = [{"type": "function", "name": "get_weather", "description": "the weather", "parameters": WEATHER}]
    called = client.responses.create(model=m, input="weather in paris?", tools=tools, tool_choice="required",
                                     max_output_tokens=120, temperature=0)
    call = next(item for item in called.output if item.type == "function_call")
    assert call.name == "get_weather" and set(json.loads(call.arguments)) >= {"city", "days"}


def chat_model(server, max_tokens):
    return langchain_openai.ChatOpenAI(model=server.model, base_url=server.base_url, api_key="EMPTY",
                                       max_tokens=max_tokens, temperature=0, max_retries=0, timeout=300)


def test_langchain_invoke_stream_tools_and_structured_output(tool_server):
    from pydantic import BaseModel, Field

    llm = chat_model(tool_server, 16)
    said = llm.invoke("hello there")
    assert isinstance(said.content, str) and said.usage_metadata["output_tokens"] > 0
    assert "".join(chunk.content for chunk in llm.stream("hello there")) == said.content.replace("\ufffd", "")

    def get_weather(city: str, days: int) -> str:
        """The weather in a city for some days."""
        return "sunny"

    message = chat_model(tool_server, 120).bind_tools([get_weather], tool_choice="required").invoke("weather?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert set(message.tool_calls[0]["args"]) >= {"city", "days"}

    class Weather(BaseModel):
        city: str = Field(max_length=12)
        days: int = Field(ge=1, le=7)

    assert isinstance(chat_model(tool_server, 80).with_structured_output(Weather).invoke("weather?"), Weather)
