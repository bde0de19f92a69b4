"""Tool calling through the real stack (controller, low-bit worker, API server) on the
tiny random-weight model: calls forced by tool_choice always parse and validate, text
and calls stream correctly, tool results go back in, and AutoGen's function calling
completes a round trip. The stack requires an API key, which the tool route honours."""
import json

import jsonschema
import pytest
import requests

from helpers import running_stack

pytestmark = [pytest.mark.slow]

M = "tinyllm-tools"
KEY = "sk-tools-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["celsius", "fahrenheit"]},
}, "required": ["city", "days"]}
ALARM = {"type": "object", "properties": {
    "hour": {"type": "integer", "minimum": 0, "maximum": 23},
    "label": {"type": "string", "maxLength": 8},
    "repeat": {"type": "boolean"},
}, "required": ["hour"]}
SCHEMAS = {"get_weather": WEATHER, "set_alarm": ALARM}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"{n.replace('_', ' ')}", "parameters": p}}
         for n, p in SCHEMAS.items()]
ASK = [{"role": "user", "content": "what is the weather in paris"}]


@pytest.fixture(scope="module")
def stack(tiny_tools, tmp_path_factory):
    with running_stack(model_path=str(tiny_tools), model_name=M, log_dir=tmp_path_factory.mktemp("tools"),
                       api_keys=KEY) as s:
        yield s


def post(stack, headers=AUTH, **body):
    data = {"model": M, "messages": ASK, "max_tokens": 160, **body}
    return requests.post(stack.base_url + "/chat/completions", json=data, headers=headers, timeout=300)


def assert_valid_call(call, names=tuple(SCHEMAS)):
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_the_tool_route_needs_the_api_key_too(stack):
    r = post(stack, headers={}, tools=TOOLS, tool_choice="required")
    assert r.status_code == 401


@pytest.mark.parametrize("seed", range(10))
def test_required_calls_always_validate_against_the_schema(stack, seed):
    r = post(stack, tools=TOOLS, tool_choice="required", temperature=1.0, top_p=1.0,
             messages=[{"role": "user", "content": f"request {seed}: set an alarm or get the weather"}])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert len(choice["message"]["tool_calls"]) == 1
    assert_valid_call(choice["message"]["tool_calls"][0])


@pytest.mark.backend  # runs on the bigdl-llm / transformers 4.31 stack too
@pytest.mark.parametrize("name", ["get_weather", "set_alarm"])
def test_a_named_tool_is_the_one_called(stack, name):
    r = post(stack, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}}, temperature=0.8)
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == name
    assert_valid_call(call)


def test_a_streamed_call_arrives_whole_with_finish_reason_tool_calls(stack):
    r = post(stack, tools=TOOLS, tool_choice="required", stream=True, temperature=0.7)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant"} and not any(d.get("content") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0
    assert_valid_call(calls[0])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_legacy_functions_get_a_function_call(stack):
    functions = [t["function"] for t in TOOLS]
    r = post(stack, functions=functions, function_call={"name": "set_alarm"})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    jsonschema.validate(json.loads(choice["message"]["function_call"]["arguments"]), ALARM)


def test_auto_answers_with_text_or_a_valid_call(stack):
    for temperature in (0, 1.0):
        r = post(stack, tools=TOOLS, max_tokens=24, temperature=temperature)
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            assert_valid_call(choice["message"]["tool_calls"][0])
        else:
            assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)


def test_tool_results_go_back_to_the_model(stack):
    first = post(stack, tools=TOOLS, tool_choice="required").json()["choices"][0]["message"]
    call = first["tool_calls"][0]
    history = ASK + [first, {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
    r = post(stack, tools=TOOLS, tool_choice="none", messages=history, max_tokens=8)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert "tool_calls" not in choice["message"] and isinstance(choice["message"]["content"], str)
    assert r.json()["usage"]["prompt_tokens"] > post(stack, max_tokens=1).json()["usage"]["prompt_tokens"]


def test_the_openai_sdk_reads_the_calls(stack):
    from openai import OpenAI

    client = OpenAI(base_url=stack.base_url, api_key=KEY)
    response = client.chat.completions.create(model=M, messages=ASK, tools=TOOLS, tool_choice="required",
                                              max_tokens=160)
    call = response.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


FORECAST = {"type": "object", "properties": {
    "city": {"enum": ["paris", "oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "summary": {"type": "string", "maxLength": 12}}, "required": ["city", "days", "summary"]}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_json_schema_response_format_is_followed(stack, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST}}
    r = post(stack, response_format=fmt, temperature=1.0, stream=stream)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        finish = events[-1]["choices"][0]["finish_reason"]
    else:
        choice = r.json()["choices"][0]
        content, finish = choice["message"]["content"], choice["finish_reason"]
    assert finish == "stop"
    jsonschema.validate(json.loads(content), FORECAST)


LOG = {"type": "object", "properties": {"note": {"type": "string"}, "count": {"type": "integer"}},
       "required": ["note", "count"]}


@pytest.mark.parametrize("attempt", range(5))
def test_a_required_call_with_unbounded_fields_fits_max_tokens(stack, attempt):
    """Unbounded string and integer, temperature 1, max_tokens 128: the worker closes the
    call before the budget ends, so it comes back as a call with finish_reason tool_calls."""
    tools = [{"type": "function", "function": {"name": "log", "description": "log a note", "parameters": LOG}}]
    r = post(stack, tools=tools, tool_choice="required", temperature=1.0, max_tokens=128,
             messages=[{"role": "user", "content": f"note {attempt}: log something"}])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert r.json()["usage"]["completion_tokens"] <= 128
    jsonschema.validate(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]), LOG)
