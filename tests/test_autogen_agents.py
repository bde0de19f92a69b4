"""AutoGen agents against the real served tiny model, and the users' six failures.

The whole module runs with http_proxy/HTTPS_PROXY pointing at a dead port: the stack
and the clients must keep loopback traffic away from it.
"""
import os
import time

import pytest
import requests

import autogen_local
from fastchat_bigdl.lowbit.oom import SIMULATE_ENV
from fastchat_bigdl.stack.serve import Stack, free_port
from helpers import chat

pytestmark = [pytest.mark.slow]

MODEL = "tinyllm-instruct"
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")


@pytest.fixture(scope="module")
def dead_proxy():
    mp = pytest.MonkeyPatch()
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for var in PROXY_VARS:
        mp.setenv(var, url)
    mp.delenv("no_proxy", raising=False)
    mp.delenv("NO_PROXY", raising=False)
    yield url
    mp.undo()


@pytest.fixture(scope="module")
def oom_trigger(tmp_path_factory):
    return tmp_path_factory.mktemp("faults") / "oom-next-generation"


@pytest.fixture(scope="module")
def stack(dead_proxy, oom_trigger, tiny_chatml, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(SIMULATE_ENV, str(oom_trigger))
    s = Stack(model_path=str(tiny_chatml), model_name=MODEL, log_dir=tmp_path_factory.mktemp("agent-logs"),
              port=free_port())
    s.start()
    try:
        yield s
    finally:
        s.stop()
        mp.undo()


@pytest.fixture(scope="module")
def ready(stack):
    assert autogen_local.wait_ready(stack.base_url, MODEL, timeout=240) == MODEL
    return stack


def worker_pid(stack):
    return next(c for c in stack.children if c.name == "worker").proc.pid


def test_client_started_before_the_worker_registers_never_sees_40301(stack, dead_proxy):
    # The stack was just started: the model is not listed yet.
    try:
        listed = [m["id"] for m in requests.get(stack.base_url + "/models", timeout=5).json()["data"]]
    except requests.ConnectionError:
        listed = []
    assert MODEL not in listed
    cfg = autogen_local.config(base_url=stack.base_url, wait=240)  # model=None: the only one served
    assert cfg["config_list"][0]["model"] == MODEL
    r = chat(stack.base_url, MODEL)
    assert r.status_code == 200, r.text


def test_the_proxy_is_really_dead_and_loopback_bypasses_it(ready, dead_proxy):
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get(ready.base_url + "/models", proxies={"http": dead_proxy}, timeout=5)
    assert "127.0.0.1" in os.environ["no_proxy"].split(",")
    assert requests.get(ready.base_url + "/models", timeout=5).status_code == 200


def test_wait_ready_timeout_names_endpoint_listed_and_expected(ready):
    with pytest.raises(autogen_local.EndpointNotReady) as err:
        autogen_local.wait_ready(ready.base_url, "Llama-2-7b-chat-hf", timeout=1)
    message = str(err.value)
    assert ready.base_url in message and "Llama-2-7b-chat-hf" in message and MODEL in message


def test_classic_two_agent_chat_finishes(ready):
    import autogen

    cfg = autogen_local.config(base_url=ready.base_url, max_tokens=8)
    assistant = autogen.AssistantAgent("assistant", llm_config=cfg, system_message="You are helpful.",
                                       max_consecutive_auto_reply=3)
    user = autogen.UserProxyAgent("user", human_input_mode="NEVER", code_execution_config=False,
                                  max_consecutive_auto_reply=3, llm_config=cfg, system_message="You ask.")
    result = user.initiate_chat(assistant, message="hello world how are you today")
    history = result.chat_history
    # the opening message, then 3 auto-replies from each agent
    assert len(history) == 7
    assert all(isinstance(m["content"], str) for m in history)
    assert result.cost["usage_including_cached_inference"]["total_cost"] == 0  # price [0, 0]


def long_history(turns=6, words=40):
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (words // 9 + 1))
    messages = [{"role": "system", "content": "You are helpful."}]
    for i in range(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {text}"})
    messages.append({"role": "user", "content": "and now?"})
    return messages


def test_history_beyond_the_context_is_trimmed_not_an_error(ready):
    from autogen import OpenAIWrapper
    from openai import BadRequestError

    messages = long_history()
    untrimmed = OpenAIWrapper(**autogen_local.config(MODEL, ready.base_url, wait=False, history_limit=False))
    with pytest.raises(BadRequestError, match="40303"):
        untrimmed.create(messages=messages, max_tokens=4)
    trimmed = OpenAIWrapper(**autogen_local.config(MODEL, ready.base_url, wait=False))
    response = trimmed.create(messages=messages, max_tokens=4)
    assert response.choices[0].message.content is not None
    assert response.usage.prompt_tokens < 256


def test_prompt_longer_than_context_is_40303_with_counts_and_worker_keeps_serving(ready):
    pid = worker_pid(ready)
    r = chat(ready.base_url, MODEL, "the quick brown fox " * 200)
    assert r.status_code == 400
    body = r.json()
    assert body["object"] == "error" and body["code"] == 40303
    assert "maximum context length is 256 tokens" in body["message"] and "resulted in" in body["message"]
    assert chat(ready.base_url, MODEL).status_code == 200 and worker_pid(ready) == pid


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_out_of_device_memory_is_a_clear_400_and_the_next_request_succeeds(ready, oom_trigger, stream):
    pid = worker_pid(ready)
    oom_trigger.write_text("fail the next generation")
    r = chat(ready.base_url, MODEL, stream=stream)
    if stream:
        text = r.text
        assert "50002" in text and "out of" in text and "memory" in text and "shorter history" in text
    else:
        assert r.status_code == 400
        body = r.json()
        assert body["object"] == "error" and body["code"] == 50002
        assert "out of cpu memory" in body["message"] and "shorter history" in body["message"]
        assert "--low-bit" in body["message"]
    assert not oom_trigger.exists()
    # the very next request on the same worker process works: no restart
    started = time.monotonic()
    ok = chat(ready.base_url, MODEL)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] > 0
    assert worker_pid(ready) == pid and time.monotonic() - started < 60


def test_client_timeout_defaults_to_600_seconds_everywhere(ready):
    cfg = autogen_local.config(base_url=ready.base_url)
    assert cfg["timeout"] == 600
    assert cfg["config_list"][0]["http_client"].timeout.read == 600
    from autogen_local.flavor import LEGACY

    assert autogen_local.config(base_url=ready.base_url, flavor=LEGACY)["request_timeout"] == 600
