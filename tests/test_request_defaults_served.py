"""Through the real stack: chat requests without max_tokens get the API server's default
cap (so an agent turn cannot run to the end of the context) or their
max_completion_tokens, schemas too large to enforce
are refused before compiling, and compiling large schemas does not stall other streams."""
import json
import threading
import time

import pytest
import requests

from helpers import running_stack

pytestmark = [pytest.mark.slow]

M = "tinyllm-instruct"
CAP = 6
ASK = [{"role": "user", "content": "hello world how are you today"}]


@pytest.fixture(scope="module")
def stack(tiny_chatml, tmp_path_factory):
    with running_stack(model_path=str(tiny_chatml), model_name=M, log_dir=tmp_path_factory.mktemp("defaults"),
                       default_max_tokens=CAP) as s:
        yield s


def post(stack, **body):
    return requests.post(stack.base_url + "/chat/completions", json={"model": M, "messages": ASK, "temperature": 0,
                                                                      **body}, timeout=300)


def test_a_chat_without_max_tokens_stops_at_the_default_cap(stack):
    capped = post(stack).json()
    assert capped["usage"]["completion_tokens"] == CAP and capped["choices"][0]["finish_reason"] == "length"
    asked = post(stack, max_tokens=3 * CAP).json()  # an explicit max_tokens still wins
    assert asked["usage"]["completion_tokens"] > CAP


@pytest.mark.parametrize("stream", [False, True])
def test_max_completion_tokens_is_max_tokens_by_its_newer_name(stack, stream):
    r = post(stack, max_completion_tokens=CAP + 3, stream=stream, stream_options={"include_usage": True} if stream
             else None, user="someone", metadata={"run": "7"})  # user and metadata: accepted, ignored
    assert r.status_code == 200, r.text
    if stream:
        usage = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")][-1]["usage"]
    else:
        usage = r.json()["usage"]
    assert usage["completion_tokens"] == CAP + 3
    r = post(stack, max_completion_tokens=4, max_tokens=5)
    assert r.status_code == 400 and "max_completion_tokens" in r.json()["message"]


def test_json_replies_get_the_cap_too(stack):
    r = post(stack, response_format={"type": "json_object"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= CAP


def wide_schema(branches: int) -> dict:
    return {"type": "object", "properties": {"a": {"anyOf": [
        {"type": "object", "properties": {f"k{j}_{i}": {"type": "integer"} for j in range(5)}}
        for i in range(branches)]}}}


def test_schemas_too_large_to_enforce_are_a_clear_400(stack):
    r = post(stack, max_tokens=4, response_format={"type": "json_schema",
                                                   "json_schema": {"name": "big", "schema": wide_schema(4000)}})
    assert r.status_code == 400
    body = r.json()
    assert body["object"] == "error" and "KiB" in body["message"] and "at most 256 KiB" in body["message"]


def test_large_schemas_compile_while_another_request_streams(stack):
    gaps, errors = [], []

    def stream():
        last = time.perf_counter()
        with requests.post(stack.base_url + "/chat/completions", stream=True, timeout=300,
                           json={"model": M, "messages": ASK, "max_tokens": 200, "stream": True,
                                 "temperature": 0}) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now
                    if b'"error"' in line:
                        errors.append(line)

    streaming = threading.Thread(target=stream)
    streaming.start()
    answers = [post(stack, max_tokens=4, response_format={
        "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": wide_schema(1200 + i)}})
        for i in range(3)]
    streaming.join(300)
    assert all(a.status_code < 500 for a in answers), [a.text[:200] for a in answers]
    assert not errors and len(gaps) > 10
    print(f"max inter-chunk gap while compiling: {max(gaps) * 1000:.0f} ms")
