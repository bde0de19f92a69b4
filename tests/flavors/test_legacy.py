"""Legacy pyautogen 0.1.x on openai 0.28: autogen_local.patch() instead of editing
site-packages/autogen/oai/completion.py."""
import hashlib
from pathlib import Path

import pytest

import autogen_local

autogen = pytest.importorskip("autogen")
openai = pytest.importorskip("openai")
if not openai.__version__.startswith("0."):
    pytest.skip("needs openai<1", allow_module_level=True)


def files_digest():
    digest = hashlib.sha256()
    for path in sorted(Path(autogen.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ask(**kwargs):
    return autogen.oai.ChatCompletion.create(
        messages=[{"role": "user", "content": "hello world"}], max_tokens=8, use_cache=False, **kwargs)


def test_without_patch_there_is_no_key_and_no_local_default(server):
    assert autogen_local.detect_flavor() == "legacy"
    assert openai.api_key is None and openai.api_base == "https://api.openai.com/v1"


def test_patch_reaches_the_local_server_with_no_key_and_is_reversible(server):
    before = files_digest()
    with autogen_local.patched(base_url=server.base_url):
        assert openai.api_key == "EMPTY" and openai.api_base == server.base_url
        assert autogen.oai.Completion.request_timeout == 600
        response = ask(model=server.model)
        assert autogen.oai.ChatCompletion.extract_text(response)[0] is not None
        assert response["usage"]["completion_tokens"] > 0
    assert openai.api_key is None and openai.api_base == "https://api.openai.com/v1"
    assert autogen.oai.Completion.request_timeout == 60
    assert files_digest() == before


def test_config_list_from_autogen_local_works_without_patch(server):
    cfg = autogen_local.config(base_url=server.base_url)
    response = ask(config_list=cfg["config_list"], request_timeout=cfg["request_timeout"])
    assert response["usage"]["completion_tokens"] > 0


def test_patched_session_trims_a_history_beyond_the_context(server):
    words = "the quick brown fox jumps over the lazy dog " * 5
    messages = [{"role": "system", "content": "You are helpful."}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {words}"} for i in range(6)]
    messages.append({"role": "user", "content": "and now?"})
    with autogen_local.patched(base_url=server.base_url):
        response = openai.ChatCompletion.create(model=server.model, messages=messages, max_tokens=4)
        assert response["usage"]["prompt_tokens"] < 256
    with autogen_local.patched(base_url=server.base_url, history_limit=False):
        with pytest.raises(openai.error.OpenAIError, match="maximum context length is 256 tokens"):
            openai.ChatCompletion.create(model=server.model, messages=messages, max_tokens=4)


def test_legacy_function_calling_round_trip(tool_server):
    calls = []

    def get_weather(city, days):
        calls.append((city, days))
        return f"sunny in {city} for {days} days"

    functions = [{"name": "get_weather", "description": "Weather forecast for a city", "parameters": {
        "type": "object", "required": ["city", "days"], "properties": {
            "city": {"type": "string", "enum": ["paris", "oslo"]}, "days": {"type": "integer"}}}}]
    cfg = autogen_local.config(base_url=tool_server.base_url)
    # A random-weight model would never choose to call: name the function it must call.
    llm_config = {**cfg, "functions": functions, "function_call": {"name": "get_weather"}, "max_tokens": 160,
                  "use_cache": False}
    assistant = autogen.AssistantAgent("assistant", llm_config=llm_config)
    user = autogen.UserProxyAgent("user", human_input_mode="NEVER", code_execution_config=False,
                                  function_map={"get_weather": get_weather}, max_consecutive_auto_reply=1)
    user.initiate_chat(assistant, message="weather in paris for 3 days?")
    assert calls and calls[0][0] in ("paris", "oslo") and isinstance(calls[0][1], int)
    history = user.chat_messages[assistant]
    result = next(i for i, m in enumerate(history) if m.get("role") == "function")
    assert "sunny in" in history[result]["content"] and len(history) > result + 1
