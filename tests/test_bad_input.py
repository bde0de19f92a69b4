"""Malformed and hostile requests against the real API server and worker: every one gets
a 4xx in FastChat's error schema with a readable message, and the worker lives on."""
import json

import pytest
import requests

from helpers import chat, running_stack, worker_address

pytestmark = [pytest.mark.slow]

M = "tinyllm-instruct"
USER = [{"role": "user", "content": "hello"}]


def body(**overrides):
    data = {"model": M, "messages": USER, "max_tokens": 4}
    data.update(overrides)
    return data


def tool(name="get_weather", parameters=None):
    parameters = parameters if parameters is not None else {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def nested(depth):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


# (name, route, payload: dict -> JSON, bytes -> raw)
CASES = [
    ("invalid JSON", "chat", b'{"model": "tinyllm-instruct", "messages": ['),
    ("JSON array body", "chat", b"[1, 2, 3]"),
    ("invalid UTF-8", "chat", b'{"model": "tinyllm-instruct", "messages": "\xff\xfe"}'),
    ("deeply nested JSON", "chat", body(metadata=nested(200))),
    ("missing model", "chat", {"messages": USER}),
    ("model not a string", "chat", body(model=123)),
    ("unknown model", "chat", body(model="gpt-4")),
    ("missing messages", "chat", {"model": M}),
    ("empty messages", "chat", body(messages=[])),
    ("messages not a list", "chat", body(messages=123)),
    ("message not an object", "chat", body(messages=["hello"])),
    ("content null", "chat", body(messages=[{"role": "user", "content": None}])),
    ("content a number", "chat", body(messages=[{"role": "user", "content": 42}])),
    ("tool result not text", "chat", body(messages=USER + [{"role": "tool", "content": 42, "tool_call_id": "a"}])),
    ("tool schema with an unknown type", "chat", body(tools=[tool(parameters={
        "type": "object", "properties": {"city": {"type": "strin"}}})])),
    ("tool schema not an object schema", "chat", body(tools=[tool(parameters={"type": "string"})])),
    ("tool schema a string", "chat", body(tools=[tool(parameters="city: str")])),
    ("tool schema with a bad regex", "chat", body(tools=[tool(parameters={
        "type": "object", "properties": {"code": {"type": "string", "pattern": "(?=x)["}}})])),
    ("tool name with spaces", "chat", body(tools=[tool(name="get the weather")])),
    ("tool type not function", "chat", body(tools=[{"type": "retrieval"}])),
    ("tools not a list", "chat", body(tools={"type": "function"})),
    ("duplicate tool names", "chat", body(tools=[tool(), tool()])),
    ("tool_choice names an unknown tool", "chat", body(tools=[tool()], tool_choice={
        "type": "function", "function": {"name": "launch_rocket"}})),
    ("tool_choice required without tools", "chat", body(tool_choice="required")),
    ("tool_choice unknown word", "chat", body(tools=[tool()], tool_choice="always")),
    ("tools and functions both", "chat", body(tools=[tool()], functions=[tool()["function"]])),
    ("assistant tool_calls not a list", "chat", body(messages=USER + [
        {"role": "assistant", "content": None, "tool_calls": {"id": "a"}}])),
    ("response_format of an unknown type", "chat", body(response_format={"type": "yaml"})),
    ("response_format schema that does not compile", "chat", body(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "a": {"$ref": "#/nowhere"}}}}})),
    ("function message without a name", "chat", body(messages=USER + [{"role": "function", "content": "1"}])),
    ("unknown role", "chat", body(messages=[{"role": "wizard", "content": "hi"}])),
    ("missing role", "chat", body(messages=[{"content": "hi"}])),
    ("bad content part", "chat", body(messages=[{"role": "user", "content": [{"type": "audio"}]}])),
    ("negative max_tokens", "chat", body(max_tokens=-5)),
    ("zero max_tokens", "chat", body(max_tokens=0)),
    ("max_tokens a string", "chat", body(max_tokens="lots")),
    ("huge max_tokens", "chat", body(max_tokens=10 ** 12)),
    ("n zero", "chat", body(n=0)),
    ("n huge", "chat", body(n=1000)),
    ("n a string", "chat", body(n="two")),
    ("stop a number", "chat", body(stop=5)),
    ("stop list of numbers", "chat", body(stop=[1, 2])),
    ("too many stops", "chat", body(stop=[f"s{i}" for i in range(100)])),
    ("negative temperature", "chat", body(temperature=-1)),
    ("temperature a string", "chat", body(temperature="hot")),
    ("top_p out of range", "chat", body(top_p=5)),
    ("stream not a bool", "chat", body(stream="yes")),
    ("seed a float", "chat", body(seed=1.5)),
    ("stream_options a list", "chat", body(stream=True, stream_options=["usage"])),
    ("huge logit_bias", "chat", body(logit_bias={str(i): 1 for i in range(10000)})),
    ("logit_bias not numbers", "chat", body(logit_bias={"1": "a lot"})),
    ("1 MB prompt", "chat", body(messages=[{"role": "user", "content": "hello world " * 90000}])),
    ("body over 4 MiB", "chat", body(messages=[{"role": "user", "content": "x" * (5 << 20)}])),
    ("completion prompt a number", "completions", {"model": M, "prompt": 123}),
    ("completion prompt empty list", "completions", {"model": M, "prompt": []}),
    ("completion logprobs huge", "completions", {"model": M, "prompt": "hi", "logprobs": 1000}),
    ("embeddings input a number", "embeddings", {"model": M, "input": 5}),
    ("worker: invalid JSON", "worker_generate", b"{not json"),
    ("worker: prompt missing", "worker_generate", {"max_new_tokens": 4}),
    ("worker: max_new_tokens a string", "worker_generate", {"prompt": "hi", "max_new_tokens": "lots"}),
    ("worker: stop_token_ids strings", "worker_generate_stream", {"prompt": "hi", "stop_token_ids": ["a"]}),
    ("worker: count_token prompt a number", "count_token", {"prompt": 5}),
    ("worker: grammar that does not compile", "worker_generate", {"prompt": "hi", "grammar": "start: (("}),
    ("worker: seed a string", "worker_generate_stream", {"prompt": "hi", "seed": "seven"}),
    ("worker: seed beyond 64 bits", "worker_generate", {"prompt": "hi", "seed": 1 << 70}),
    ("worker: skip_special_tokens a string", "worker_generate", {"prompt": "hi", "skip_special_tokens": "no"}),
    ("worker: grammar not a string", "worker_generate_stream", {"prompt": "hi", "grammar": {"type": "object"}}),
]


@pytest.fixture(scope="module")
def stack(tiny_chatml, tmp_path_factory):
    with running_stack(model_path=str(tiny_chatml), model_name=M, log_dir=tmp_path_factory.mktemp("bad-input")) as s:
        yield s


def url_for(stack, route):
    if route.startswith("worker_") or route == "count_token":
        return worker_address(stack) + "/" + route
    return f"{stack.base_url}/{route.replace('chat', 'chat/completions')}"


@pytest.mark.parametrize("name, route, payload", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_clear_4xx(stack, name, route, payload):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    r = requests.post(url_for(stack, route), data=data, headers={"Content-Type": "application/json"}, timeout=120)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()
    assert err["object"] == "error" and isinstance(err["code"], int) and err["code"] >= 40000
    assert isinstance(err["message"], str) and 10 < len(err["message"]) < 2000
    assert "Traceback" not in r.text


def test_the_worker_is_alive_and_serves_after_all_of_them(stack):
    pid = stack.child("worker").proc.pid
    assert len(CASES) >= 30
    r = chat(stack.base_url, M)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    assert stack.child("worker").proc.pid == pid and stack.child("worker").alive()


@pytest.mark.parametrize("route", [{}, {"seed": 7}], ids=["fastchat-handler", "own-route"])
def test_an_empty_reply_sent_back_as_null_is_prompted_as_the_empty_reply(stack, route):
    # ag2 replays an empty assistant reply as {"content": null}: OpenAI clients expect that to work.
    def ask(reply_content):
        messages = USER + [{"role": "assistant", "content": reply_content}, {"role": "user", "content": "and?"}]
        r = requests.post(url_for(stack, "chat"), json=body(messages=messages, temperature=0, **route), timeout=120)
        assert r.status_code == 200, r.text[:300]
        return r.json()["usage"]["prompt_tokens"], r.json()["choices"][0]["message"]["content"]

    assert ask(None) == ask("")
    without = requests.post(url_for(stack, "chat"), json=body(messages=USER + [{"role": "assistant"}], **route),
                            timeout=120)
    assert without.status_code == 200, without.text[:300]
