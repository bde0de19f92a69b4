"""``/v1/responses`` through the real stack, driven by the ``openai`` SDK's own Responses
client (what the OpenAI Agents SDK uses): text, streamed events, function tools with a
result round trip, JSON output, and clear 400s for what this server cannot do. The
stack requires an API key, which the route honours."""
import json

import jsonschema
import pytest
import requests

from fastchat_bigdl.api.responses import chat_request
from fastchat_bigdl.common.errors import Invalid
from helpers import running_stack

openai = pytest.importorskip("openai")
if not hasattr(openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9"), "responses"):
    pytest.skip("this openai SDK has no Responses client", allow_module_level=True)

M = "tinyllm-responses"
KEY = "sk-responses-test"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "the weather", "parameters": WEATHER}]


def test_requests_translate_into_chat_requests():
    chat = chat_request({"model": "m", "instructions": "be brief", "max_output_tokens": 9, "tools": TOOLS,
                         "tool_choice": {"type": "function", "name": "get_weather"}, "input": [
                             {"role": "developer", "content": "use tools"},
                             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                             {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
                             {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]})
    assert [m["role"] for m in chat["messages"]] == ["system", "system", "user", "assistant", "tool"]
    assert chat["messages"][0]["content"] == "be brief" and chat["messages"][2]["content"] == "hi"
    assert [c["id"] for c in chat["messages"][3]["tool_calls"]] == ["c1", "c2"]  # parallel calls: one turn
    assert chat["max_tokens"] == 9 and chat["tools"][0]["function"]["parameters"] == WEATHER
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    streamed = chat_request({"model": "m", "input": "x", "stream": True})
    assert streamed["stream_options"] == {"include_usage": True}
    for body, words in [({"model": "m"}, "'input'"), ({"model": "m", "input": "x", "previous_response_id": "r"},
                                                       "keeps no responses"),
                        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "only function tools"),
                        ({"model": "m", "input": [{"type": "reasoning"}]}, "not supported")]:
        with pytest.raises(Invalid, match=words):
            chat_request(body)


@pytest.fixture(scope="module")
def client(tiny_tools, tmp_path_factory):
    with running_stack(model_path=str(tiny_tools), model_name=M, log_dir=tmp_path_factory.mktemp("responses"),
                       api_keys=KEY) as stack:
        yield openai.OpenAI(api_key=KEY, base_url=stack.base_url, max_retries=0), stack


@pytest.mark.slow
def test_a_text_response_and_its_stream_agree(client):
    sdk, _ = client
    whole = sdk.responses.create(model=M, input="tell me about the fox", instructions="answer briefly",
                                 max_output_tokens=24, temperature=0)
    assert whole.object == "response" and whole.status in ("completed", "incomplete") and whole.model == M
    assert whole.output[0].type == "message" and whole.output_text == whole.output[0].content[0].text
    assert whole.usage.output_tokens > 0 and whole.usage.input_tokens > 0
    events = list(sdk.responses.create(model=M, input="tell me about the fox", instructions="answer briefly",
                                       max_output_tokens=24, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == f"response.{whole.status}"
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text.replace("\ufffd", "")
    assert text and text == whole.output_text.replace("\ufffd", "") and events[-1].response.usage.output_tokens > 0


@pytest.mark.slow
def test_a_required_function_call_validates_and_its_result_goes_back(client):
    sdk, _ = client
    first = sdk.responses.create(model=M, input="weather in paris for 2 days?", tools=TOOLS, tool_choice="required",
                                 max_output_tokens=120, temperature=0)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    streamed = list(sdk.responses.create(model=M, input="weather in paris for 2 days?", tools=TOOLS,
                                         tool_choice="required", max_output_tokens=120, temperature=0, stream=True))
    done = [e.arguments for e in streamed if e.type == "response.function_call_arguments.done"]
    assert done == [calls[0].arguments]
    follow_up = sdk.responses.create(model=M, max_output_tokens=16, temperature=0, tools=TOOLS, input=[
        {"role": "user", "content": "weather in paris for 2 days?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"}])
    assert follow_up.status in ("completed", "incomplete") and follow_up.output


@pytest.mark.slow
def test_json_output_and_clear_errors(client):
    sdk, stack = client
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}},
              "required": ["answer"], "additionalProperties": False}
    r = sdk.responses.create(model=M, input="reply in json", max_output_tokens=60, temperature=0,
                             text={"format": {"type": "json_schema", "name": "reply", "schema": schema}})
    jsonschema.validate(json.loads(r.output_text), schema)
    with pytest.raises(openai.BadRequestError, match="keeps no responses"):
        sdk.responses.create(model=M, input="hi", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="only function tools"):
        sdk.responses.create(model=M, input="hi", tools=[{"type": "web_search_preview"}])
    unauthorized = requests.post(stack.base_url + "/responses", json={"model": M, "input": "hi"}, timeout=30)
    assert unauthorized.status_code == 401
    missing = requests.post(stack.base_url + "/responses", json={"model": "no-such-model", "input": "hi"},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["code"] == 40301


@pytest.mark.slow
def test_a_client_leaving_a_stream_stops_its_generation(client):
    """The chat request behind a streamed response is cancelled with it: the worker stops
    generating instead of running to max_output_tokens for nobody."""
    from helpers import wait_for, worker_address

    _, stack = client
    stats = lambda: requests.post(worker_address(stack) + "/worker_engine_stats", timeout=10).json()  # noqa: E731
    # greedy: this prompt's answer runs to the limit (a sampled one may end early by chance)
    body = {"model": M, "input": "tell me a long story", "max_output_tokens": 3000, "stream": True, "temperature": 0}
    with requests.post(stack.base_url + "/responses", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       stream=True, timeout=60) as r:
        for line in r.iter_lines():
            if b"response.output_text.delta" in line:
                break
        running = stats()
    assert running["active_streams"] == 1  # it was generating when the client left
    wait_for(lambda: stats()["active_streams"] == 0, 10, "the abandoned generation to stop")
    assert stats()["decode_steps"] - running["decode_steps"] < 1500  # far short of 3,000 tokens
