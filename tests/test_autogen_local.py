"""autogen_local on its own: import hygiene, defaults, config shapes, patching, trimming."""
import asyncio
import hashlib
import importlib.util
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

import autogen_local
from autogen_local import endpoint, flavor, history
from autogen_local.flavor import AG2, AGENTCHAT, CLASSIC, LEGACY


def test_import_pulls_in_no_torch_transformers_or_low_bit_library():
    code = ("import sys, autogen_local; autogen_local.trim_messages; "
            "print(sorted(m for m in ('torch', 'transformers', 'ipex_llm', 'bigdl', 'fastchat') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_import_keeps_proxies_off_loopback():
    code = "import os, autogen_local; print(os.environ['no_proxy'])"
    env = {"PATH": "/usr/bin:/bin", "no_proxy": "corp.example.com"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip().split(",") == ["corp.example.com", "localhost", "127.0.0.1", "::1"]


def test_defaults_come_from_arguments_then_environment_then_builtin(monkeypatch):
    monkeypatch.delenv(endpoint.BASE_URL_ENV, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert endpoint.resolve_base_url() == "http://127.0.0.1:8000/v1"
    assert endpoint.resolve_api_key() == "EMPTY"
    monkeypatch.setenv(endpoint.BASE_URL_ENV, "http://127.0.0.1:9999/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local")
    assert endpoint.resolve_base_url() == "http://127.0.0.1:9999/v1"
    assert endpoint.resolve_api_key() == "sk-local"
    assert endpoint.resolve_base_url("http://h:1/v1") == "http://h:1/v1"
    assert endpoint.resolve_api_key("k") == "k"


BASE = "http://127.0.0.1:8000/v1"


def test_legacy_shape():
    cfg = autogen_local.config("m", BASE, wait=False, flavor=LEGACY)
    assert cfg == {"config_list": [{"model": "m", "api_base": BASE, "api_key": "EMPTY"}], "request_timeout": 600,
                   "max_tokens": 512}


@pytest.mark.parametrize("flavor", [LEGACY, CLASSIC, AG2, AGENTCHAT])
def test_replies_are_capped_by_default_and_the_cap_can_be_changed_or_lifted(flavor):
    assert autogen_local.config("m", BASE, wait=False, flavor=flavor)["max_tokens"] == 512
    assert autogen_local.config("m", BASE, wait=False, flavor=flavor, max_tokens=64)["max_tokens"] == 64
    assert "max_tokens" not in autogen_local.config("m", BASE, wait=False, flavor=flavor, max_tokens=None)


def test_classic_client_sends_the_cap_to_the_server(recording_server):
    autogen = pytest.importorskip("autogen", reason="classic AutoGen (pyautogen 0.2 / ag2 0.x) is not installed")

    url, bodies = recording_server
    for cap, expected in ((512, 512), (None, None)):
        cfg = autogen_local.config("m", url, wait=False, flavor=CLASSIC, **({} if cap else {"max_tokens": None}))
        autogen.OpenAIWrapper(**cfg).create(messages=[{"role": "user", "content": "hi"}])
        assert bodies[-1].get("max_tokens") == expected


def test_ag2_agent_sends_the_cap_to_the_server(recording_server):
    ag2 = pytest.importorskip("ag2", reason="ag2 1.x is not installed")

    url, bodies = recording_server
    for extra, expected in (({}, 512), ({"max_tokens": None}, None)):
        agent = ag2.Agent("assistant", "You are helpful.", config=autogen_local.model_config("m", url, wait=False,
                                                                                            **extra))
        assert asyncio.run(agent.ask("hi")).body == "ok"
        assert bodies[-1].get("max_tokens") == expected


def test_classic_shape(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = autogen_local.config("m", BASE, wait=False, flavor=CLASSIC, temperature=0)
    entry = cfg["config_list"][0]
    assert {k: entry[k] for k in ("model", "base_url", "api_key", "price")} == {
        "model": "m", "base_url": BASE, "api_key": "EMPTY", "price": [0, 0]}
    assert cfg["timeout"] == 600 and cfg["cache_seed"] is None and cfg["temperature"] == 0
    assert isinstance(entry["http_client"]._transport, history.transport_classes().transport)
    import copy

    assert copy.deepcopy(cfg)["config_list"][0]["http_client"] is entry["http_client"]  # AutoGen deep-copies
    assert "http_client" not in autogen_local.config("m", BASE, wait=False, flavor=CLASSIC,
                                                     history_limit=False)["config_list"][0]


def test_agentchat_shape_accepts_unknown_model_names():
    cfg = autogen_local.config("m", BASE, wait=False, flavor=AGENTCHAT)
    assert cfg["model_info"]["family"] == "unknown" and cfg["timeout"] == 600
    assert isinstance(cfg["http_client"]._transport, history.transport_classes().async_transport)


def test_ag2_shape_is_openai_config_keywords_with_an_async_trimming_client():
    cfg = autogen_local.config("m", BASE, wait=False, flavor=AG2)
    assert {k: cfg[k] for k in ("model", "base_url", "api_key", "timeout", "max_tokens")} == {
        "model": "m", "base_url": BASE, "api_key": "EMPTY", "timeout": 600, "max_tokens": 512}
    assert isinstance(cfg["http_client"]._transport, history.transport_classes().async_transport)
    assert "model_info" not in cfg  # OpenAIConfig takes no such field
    assert "http_client" not in autogen_local.config("m", BASE, wait=False, flavor=AG2, history_limit=False)


def test_the_http_client_is_of_the_library_the_openai_sdk_sends_with():
    """openai 3 sends with httpx2 (ag2 1.x types its http_client so); openai 1.x/2.x with httpx."""
    openai = pytest.importorskip("openai")
    expected = "httpx2" if int(openai.__version__.split(".")[0]) >= 3 else "httpx"
    assert history.http_library() == expected
    assert isinstance(history.trimming_client(10), importlib.import_module(expected).Client)
    assert isinstance(history.async_trimming_client(10), importlib.import_module(expected).AsyncClient)


@pytest.mark.parametrize("versions, expected", [
    ({"pyautogen": "0.1.14"}, LEGACY),
    ({"pyautogen": "0.2.35"}, CLASSIC),
    ({"ag2": "0.9.0", "autogen": "0.9.0"}, CLASSIC),
    ({"ag2": "0.13.4"}, CLASSIC),
    ({"ag2": "1.2.1"}, AG2),
    ({"ag2": "1.2.1", "autogen-agentchat": "0.7.5"}, AG2),  # what the autogen extra installs
    ({"pyautogen": "0.2.35", "ag2": "1.2.1"}, CLASSIC),  # modules autogen and ag2 can coexist
    ({"pyautogen": "0.10.0", "autogen-agentchat": "0.7.5"}, AGENTCHAT),
    ({"autogen-agentchat": "0.7.5"}, AGENTCHAT),
])
def test_flavor_detection(mocker, versions, expected):
    from packaging.version import Version

    mocker.patch.object(flavor, "_version", side_effect=lambda d: Version(versions[d]) if d in versions else None)
    assert flavor.detect_flavor() == expected


def test_no_autogen_is_a_clear_error(mocker):
    mocker.patch.object(flavor, "_version", return_value=None)
    with pytest.raises(flavor.AutoGenNotInstalled, match=r"fastchat-bigdl\[autogen\]"):
        flavor.detect_flavor()


class JSONHandler(BaseHTTPRequestHandler):
    """A stand-in endpoint's handler: ``reply`` sends one JSON answer."""

    def reply(self, payload, status: int = 200) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def stand_in(handler):
    """Serve ``handler`` on a free loopback port in a thread; returns (base URL, server)."""
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/v1", server


@pytest.fixture
def models_server():
    """A stand-in /v1/models answering with a fixed list (client-side logic only)."""
    listed = []

    class Handler(JSONHandler):
        def do_GET(self):
            self.reply({"object": "list", "data": [{"id": m} for m in listed]})

    url, server = stand_in(Handler)
    yield url, listed
    server.shutdown()


CHAT_COMPLETION = {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                   "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


@pytest.fixture
def recording_server():
    """A stand-in chat completions endpoint that records each request body."""
    bodies = []

    class Handler(JSONHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.reply(CHAT_COMPLETION)

    url, server = stand_in(Handler)
    yield url, bodies
    server.shutdown()


def test_model_none_takes_the_only_model(models_server):
    url, listed = models_server
    listed[:] = ["only-one"]
    assert autogen_local.config(base_url=url, wait=False, flavor=CLASSIC)["config_list"][0]["model"] == "only-one"


def test_model_none_with_several_models_lists_them(models_server):
    url, listed = models_server
    listed[:] = ["llama-2", "vicuna"]
    with pytest.raises(autogen_local.ModelChoiceError, match="several models.*llama-2, vicuna.*model="):
        autogen_local.config(base_url=url, wait=False, flavor=CLASSIC)
    with pytest.raises(autogen_local.ModelChoiceError):
        autogen_local.wait_ready(url, timeout=5)  # waiting cannot resolve an ambiguity


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_ready_on_a_dead_endpoint_names_it(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(autogen_local.EndpointNotReady) as err:
        autogen_local.wait_ready(url, "my-model", timeout=1.5)
    assert url in str(err.value) and "my-model" in str(err.value) and "listed nothing" in str(err.value)


def test_wait_ready_reaches_loopback_past_a_proxy_set_after_import(monkeypatch):
    class Handler(JSONHandler):
        def do_GET(self):
            self.reply({"object": "list", "data": [{"id": "m"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.reply(CHAT_COMPLETION)

    url, server = stand_in(Handler)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        assert autogen_local.wait_ready(url, timeout=5) == "m"
        assert autogen_local.list_models(url.replace("127.0.0.1", "localhost")) == ["m"]
    finally:
        server.shutdown()


def msg(role, n, ch="x"):
    return {"role": role, "content": ch * n}


def test_trim_keeps_system_and_newest_and_drops_oldest_first():
    messages = [msg("system", 10), msg("user", 100, "a"), msg("assistant", 100, "b"),
                msg("user", 100, "c"), msg("assistant", 100, "d"), msg("user", 10, "e")]
    # 420 chars ~ 420 tokens in a 300-token context with 75 kept free to answer: 195 must go
    trimmed = autogen_local.trim_messages(messages, context_length=300, prompt_tokens=420)
    assert trimmed[0] == messages[0] and trimmed[-1] == messages[-1]
    assert trimmed[1]["role"] == "user"  # restarts on a user turn
    assert trimmed == [messages[0]] + messages[3:]


def test_trim_gives_up_when_only_the_newest_message_is_left():
    assert autogen_local.trim_messages([msg("system", 5), msg("user", 500)], 100, 600) is None


def test_overflow_counts_parse_fastchats_40303():
    body = json.dumps({"object": "error", "code": 40303, "message": (
        "This model's maximum context length is 256 tokens. However, your messages resulted in "
        "939 tokens. Please reduce the length of the messages.")}).encode()
    assert history.overflow_counts(body) == (256, 939)
    assert history.overflow_counts(json.dumps({"code": 40301, "message": "x"}).encode()) is None
    assert history.overflow_counts(b"not json") is None


def autogen_files_digest():
    """The installed AutoGen packages' sources (found, not imported)."""
    digest = hashlib.sha256()
    for name in ("autogen", "ag2", "autogen_agentchat", "autogen_ext", "openai"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            for path in sorted(Path(spec.origin).parent.rglob("*.py")):
                digest.update(path.read_bytes())
    return digest.hexdigest()


def test_patch_is_idempotent_reversible_and_writes_no_file(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    before = autogen_files_digest()
    with autogen_local.patched(base_url="http://127.0.0.1:8123/v1"):
        import os

        assert os.environ["OPENAI_API_KEY"] == "EMPTY"
        assert os.environ["OPENAI_BASE_URL"] == "http://127.0.0.1:8123/v1"
        assert autogen_local.patch() == "already patched"
        from openai import OpenAI

        client = OpenAI()  # a plain client with no key now works and points at the local server
        assert str(client.base_url).startswith("http://127.0.0.1:8123/v1")
    import os

    assert "OPENAI_API_KEY" not in os.environ and "OPENAI_BASE_URL" not in os.environ
    autogen_local.unpatch()  # harmless when not patched
    assert autogen_files_digest() == before


def test_patch_keeps_a_users_own_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-mine")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with autogen_local.patched():
        import os

        assert os.environ["OPENAI_API_KEY"] == "sk-mine"


@pytest.fixture
def flaky_server():
    """Answers the first chat request the way the API server does when its worker died."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(self.path)
            if len(calls) == 1:
                status, body = 503, {"object": "error", "code": calls_code[0], "message": "worker stopped"}
            else:
                status, body = 200, {"ok": True}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    calls_code = [50006]
    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", calls, calls_code
    server.shutdown()


@pytest.fixture(params=["httpx", "httpx2"])
def library(request):
    """Each HTTP library an openai SDK sends with (httpx: openai 1.x/2.x; httpx2: openai 3), where installed."""
    pytest.importorskip(request.param, reason=f"{request.param} is not installed")
    return request.param


def post_sync(library, url, body):
    with history.trimming_client(timeout=10, library=library) as client:
        return client.post(url + "/chat/completions", json=body)


def post_async(library, url, body):
    async def post():
        async with history.async_trimming_client(timeout=10, library=library) as client:
            return await client.post(url + "/chat/completions", json=body)

    return asyncio.run(post())


@pytest.mark.parametrize("post", [post_sync, post_async])
def test_a_request_whose_worker_died_is_retried_once(flaky_server, library, post):
    url, calls, _ = flaky_server
    assert post(library, url, {"messages": []}).status_code == 200 and len(calls) == 2


def test_other_errors_are_not_retried(flaky_server, library):
    url, calls, code = flaky_server
    code[0] = 50001
    assert post_sync(library, url, {"messages": []}).status_code == 503 and len(calls) == 1


CONTEXT = 300
LONG_CHAT = [msg("system", 10), msg("user", 100, "a"), msg("assistant", 100, "b"),
             msg("user", 100, "c"), msg("assistant", 100, "d"), msg("user", 10, "e")]  # 420 "tokens"


@pytest.fixture
def overflow_server():
    """A stand-in chat endpoint with a 300-token context, a token per character, that answers
    a longer prompt as FastChat does (400, code 40303, both counts); records each request's messages."""
    seen = []

    class Handler(JSONHandler):
        def do_POST(self):
            messages = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"]
            seen.append(messages)
            tokens = sum(len(m["content"]) for m in messages)
            if tokens <= CONTEXT:
                return self.reply(CHAT_COMPLETION)
            self.reply({"object": "error", "code": 40303, "message": (
                f"This model's maximum context length is {CONTEXT} tokens. However, your messages resulted "
                f"in {tokens} tokens. Please reduce the length of the messages.")}, status=400)

    url, server = stand_in(Handler)
    yield url, seen
    server.shutdown()


@pytest.mark.parametrize("post", [post_sync, post_async])
def test_the_transports_resend_a_chat_beyond_the_context_trimmed(overflow_server, library, post):
    url, seen = overflow_server
    response = post(library, url, {"model": "m", "messages": LONG_CHAT})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "ok"
    assert seen == [LONG_CHAT, [LONG_CHAT[0]] + LONG_CHAT[3:]]


def test_what_cannot_be_trimmed_comes_back_as_the_servers_answer(overflow_server, library):
    url, seen = overflow_server
    response = post_sync(library, url, {"model": "m", "messages": [msg("system", 5), msg("user", 400)]})
    assert response.status_code == 400 and response.json()["code"] == 40303 and len(seen) == 1


def test_the_installed_openai_sdk_takes_the_trimming_clients(overflow_server):
    openai = pytest.importorskip("openai")
    if not hasattr(openai, "OpenAI"):
        pytest.skip("openai 0.28 trims through a requests session (see patch())")
    url, seen = overflow_server
    client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, http_client=history.trimming_client(10))
    answer = client.chat.completions.create(model="m", messages=LONG_CHAT)
    assert answer.choices[0].message.content == "ok" and seen[-1] == [LONG_CHAT[0]] + LONG_CHAT[3:]

    async def create():
        aclient = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0,
                                     http_client=history.async_trimming_client(10))
        async with aclient:
            return await aclient.chat.completions.create(model="m", messages=LONG_CHAT)

    assert asyncio.run(create()).choices[0].message.content == "ok" and len(seen) == 4
    plain = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 300 tokens"):
        plain.chat.completions.create(model="m", messages=LONG_CHAT)


def test_an_ag2_agent_keeps_talking_past_the_context(overflow_server):
    ag2 = pytest.importorskip("ag2", reason="ag2 1.x is not installed")
    url, seen = overflow_server
    agent = ag2.Agent("assistant", "x" * 10, config=autogen_local.model_config("m", url, wait=False))

    async def chat():
        reply = await agent.ask("a" * 150)
        return await reply.ask("b" * 200)  # system 10 + 150 + "ok" + 200 > 300

    assert asyncio.run(chat()).body == "ok"
    assert [m["content"] for m in seen[-1]] == ["x" * 10, "b" * 200] and len(seen) == 3


def test_an_agentchat_client_keeps_a_long_history_inside_the_context(overflow_server):
    pytest.importorskip("autogen_ext.models.openai", reason="autogen-agentchat is not installed")
    from autogen_core.models import AssistantMessage, SystemMessage, UserMessage

    url, seen = overflow_server
    messages = [SystemMessage(content=LONG_CHAT[0]["content"])] + [
        UserMessage(content=m["content"], source="user") if m["role"] == "user"
        else AssistantMessage(content=m["content"], source="assistant") for m in LONG_CHAT[1:]]

    async def create():
        client = autogen_local.model_client("m", url, wait=False)
        try:
            return await client.create(messages)
        finally:
            await client.close()

    assert asyncio.run(create()).content == "ok"
    assert [m["content"] for m in seen[-1]] == [m["content"] for m in [LONG_CHAT[0]] + LONG_CHAT[3:]]
