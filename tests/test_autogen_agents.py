"""AutoGen agents against the real served tiny model, and the users' six failures.

The AutoGen here is what the ``autogen`` extra installs: autogen-agentchat 0.7 and ag2 1.x
on openai 3 (httpx2); classic pyautogen 0.2 and legacy 0.1 run in their own nox sessions
(tests/flavors). The whole module runs with http_proxy/HTTPS_PROXY pointing at a dead
port: the stack and the clients must keep loopback traffic away from it.
"""
import asyncio
import os
import time

import pytest
import requests

import autogen_local
from fastchat_bigdl.lowbit.oom import SIMULATE_ENV
from fastchat_bigdl.stack.serve import Stack, free_port
from helpers import ag2_long_chat, chat

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
    config = autogen_local.model_config(base_url=stack.base_url, wait=240)  # model=None: the only one served
    assert config.model == MODEL
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


def test_two_agent_team_chat_finishes(ready):
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.teams import RoundRobinGroupChat

    async def run():
        client = autogen_local.model_client(base_url=ready.base_url, max_tokens=8)
        asker = AssistantAgent("asker", model_client=client, system_message="You ask.")
        helper = AssistantAgent("helper", model_client=client, system_message="You are helpful.")
        try:
            return await RoundRobinGroupChat([helper, asker], max_turns=6).run(task="hello world how are you today")
        finally:
            await client.close()

    result = asyncio.run(run())
    # the task, then 3 replies from each agent, each a real completion
    assert [m.source for m in result.messages] == ["user"] + ["helper", "asker"] * 3
    assert all(isinstance(m.content, str) and m.models_usage.completion_tokens > 0 for m in result.messages[1:])


def test_history_beyond_the_context_is_trimmed_not_an_error(ready):
    from openai import BadRequestError

    untrimmed = autogen_local.model_config(MODEL, ready.base_url, wait=False, history_limit=False, max_tokens=4)
    with pytest.raises(BadRequestError, match="maximum context length is 256 tokens"):
        ag2_long_chat(untrimmed)
    reply = ag2_long_chat(autogen_local.model_config(MODEL, ready.base_url, wait=False, max_tokens=4))
    # answered (an empty reply is an answer too: how a random model's greedy reply starts depends on the CPU)
    assert reply.response.usage.prompt_tokens < 256


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
    from autogen_local.flavor import AG2, AGENTCHAT, CLASSIC, LEGACY

    classic = autogen_local.config(base_url=ready.base_url, flavor=CLASSIC)
    assert classic["timeout"] == 600 and classic["config_list"][0]["http_client"].timeout.read == 600
    for flavor in (AG2, AGENTCHAT):
        cfg = autogen_local.config(base_url=ready.base_url, flavor=flavor)
        assert cfg["timeout"] == 600 and cfg["http_client"].timeout.read == 600
    assert autogen_local.model_config(base_url=ready.base_url).timeout == 600
    assert autogen_local.config(base_url=ready.base_url, flavor=LEGACY)["request_timeout"] == 600
