"""The batching engine under mixed load through the real stack: 16 requests at once
(streaming and not, a stop string, a tool call, a long prompt, a client that leaves
mid-stream) all answer correctly, greedy answers equal the same requests sent alone,
the engine really batched them, and nothing is left running afterwards."""
import concurrent.futures
import json
import time

import jsonschema
import pytest
import requests

from helpers import running_stack, worker_address

pytestmark = [pytest.mark.slow, pytest.mark.backend]

M = "tinyllm-tools"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}}]
WORDS = "the quick brown fox jumps over the lazy dog hello world one two three four five six seven".split()


@pytest.fixture(scope="module")
def stack(tiny_tools, tmp_path_factory):
    with running_stack(model_path=str(tiny_tools), model_name=M, log_dir=tmp_path_factory.mktemp("batched")) as s:
        yield s


def chat(stack, content, stream=False, **extra):
    body = {"model": M, "messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0,
            "stream": stream, **extra}
    r = requests.post(stack.base_url + "/chat/completions", json=body, timeout=300, stream=stream)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["choices"][0]
    text, finish = "", None
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice.get("finish_reason") or finish
    return {"message": {"content": text}, "finish_reason": finish}


def leave_mid_stream(stack):
    body = {"model": M, "messages": [{"role": "user", "content": "count for me"}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    with requests.post(stack.base_url + "/chat/completions", json=body, timeout=300, stream=True) as r:
        for line in r.iter_lines():
            if line.startswith(b"data: ") and b"content" in line:
                return "left"  # closing the response drops the connection


def engine_stats(stack):
    return requests.post(worker_address(stack) + "/worker_engine_stats", timeout=10).json()


def test_sixteen_mixed_requests_at_once_all_answer_correctly(stack):
    prompts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(11)]
    # (streamed and plain answers of random weights differ in how U+FFFD pieces come out)
    alone = [chat(stack, p, stream=i % 2 == 1)["message"]["content"] for i, p in enumerate(prompts)]
    stop_at = alone[4][len(alone[4]) // 2:][:2]
    long_prompt = " ".join(WORDS * 60)  # ~2,900 tokens: prefilled in blocks between the others' steps
    alone_long = chat(stack, long_prompt)["message"]["content"]
    before = engine_stats(stack)

    jobs = [lambda p=p, i=i: chat(stack, p, stream=i % 2 == 1) for i, p in enumerate(prompts)]
    jobs += [lambda: chat(stack, prompts[4], stop=[stop_at]),
             lambda: chat(stack, "what is the weather in paris", tools=TOOLS, tool_choice="required",
                          max_tokens=96),
             lambda: chat(stack, long_prompt),
             lambda: leave_mid_stream(stack),
             lambda: chat(stack, prompts[0])]
    assert len(jobs) == 16
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job(), jobs))

    assert [r["message"]["content"] for r in results[:11]] == alone  # as if each were alone
    stopped = results[11]
    assert stopped["finish_reason"] == "stop" and stopped["message"]["content"] == alone[4][:alone[4].index(stop_at)]
    call = results[12]
    assert call["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(call["message"]["tool_calls"][0]["function"]["arguments"]), WEATHER)
    assert results[13]["message"]["content"] == alone_long
    assert results[14] == "left"
    assert results[15]["message"]["content"] == alone[0]

    after = engine_stats(stack)
    rows, steps = after["decode_rows"] - before["decode_rows"], after["decode_steps"] - before["decode_steps"]
    assert rows / steps > 2  # steps were shared
    deadline = time.monotonic() + 30  # the stream whose client left is closed too
    while engine_stats(stack)["active_streams"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_stats(stack)["active_streams"] == 0
    assert chat(stack, prompts[2])["message"]["content"] == alone[2]  # and it serves on
