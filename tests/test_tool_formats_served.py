"""Native tool formats through the real stack (controller, low-bit worker, API server):
a model whose chat template is written like Llama 3.1's or Mistral v0.3's is prompted
by that template and calls tools in that family's own format (Mistral's opener is a
special token, kept in the worker's output for the API server to read), and the calls
reach the client as OpenAI ``tool_calls``. A history with OpenAI-style ids renders under
Mistral's nine-character rule; messages the template refuses get a 400 that says why.
Plain chats are prompted by the model's template too, also where FastChat's
conversation templates cannot express it (Mistral's system message goes into the last
user turn)."""
import json

import jsonschema
import pytest
import requests
from transformers import AutoTokenizer

from helpers import build_tiny_llama, running_stack
from tool_templates import LLAMA3_SPECIALS, LLAMA3_STYLE, MISTRAL_SPECIALS, MISTRAL_STYLE

pytestmark = [pytest.mark.slow]

ALARM = {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                          "label": {"type": "string", "maxLength": 8}}, "required": ["hour"]}
TOOLS = [{"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm", "parameters": ALARM}}]
ASK = [{"role": "user", "content": "wake me at seven"}]
FAMILIES = {"llama3": (LLAMA3_STYLE, LLAMA3_SPECIALS), "mistral": (MISTRAL_STYLE, MISTRAL_SPECIALS)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def stack(request, tmp_path_factory):
    template, specials = FAMILIES[request.param]
    path = build_tiny_llama(tmp_path_factory.mktemp("models") / f"tiny-{request.param}-tools",
                            chat_template=template, special_tokens=specials, context=4096)
    with running_stack(model_path=str(path), model_name=path.name,
                       log_dir=tmp_path_factory.mktemp(f"{request.param}-logs")) as s:
        s.tokenizer = AutoTokenizer.from_pretrained(str(path))
        yield s


def post(stack, **body):
    data = {"model": stack.model_name, "messages": ASK, "max_tokens": 96, "tools": TOOLS, **body}
    return requests.post(stack.base_url + "/chat/completions", json=data, timeout=300)


@pytest.mark.parametrize("seed", range(3))
def test_a_required_call_arrives_as_tool_calls(stack, seed):
    r = post(stack, tool_choice="required", temperature=1.0,
             messages=[{"role": "user", "content": f"alarm {seed}"}])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "set_alarm"
    jsonschema.validate(json.loads(call["function"]["arguments"]), ALARM)


def test_a_streamed_call_shows_no_opener_as_content(stack):
    r = post(stack, tool_choice="required", stream=True, temperature=0.7)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert not any(d.get("content") for d in deltas), deltas
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), ALARM)


def test_a_history_with_openai_ids_renders_and_answers(stack):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_a1b2c3d4e5f6a7b8c9d0e1f2", "type": "function",
                                                               "function": {"name": "set_alarm",
                                                                            "arguments": '{"hour": 7}'}}]},
        {"role": "tool", "tool_call_id": "call_a1b2c3d4e5f6a7b8c9d0e1f2", "content": "alarm set"},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "and one at eight"},
    ]
    r = post(stack, messages=history, tool_choice={"type": "function", "function": {"name": "set_alarm"}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "set_alarm"


def test_messages_the_template_refuses_get_a_400_with_its_reason(stack):
    r = post(stack, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    if "mistral" not in stack.model_name:
        assert r.status_code == 200  # Llama's template takes two user turns in a row
        return
    assert r.status_code == 400
    assert "chat template refused" in r.json()["message"] and "alternate" in r.json()["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_plain_chat_is_prompted_by_the_model_template(stack, stream):
    tok = stack.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "what is the capital"}]
    reference = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # transformers' own
    expected = len(tok(reference.removeprefix(tok.bos_token)).input_ids)  # the worker's tokenizer adds the BOS
    body = {"model": stack.model_name, "messages": messages, "max_tokens": 4, "temperature": 0}
    r = requests.post(stack.base_url + "/chat/completions", json=dict(body, stream=stream), timeout=300)
    assert r.status_code == 200, r.text
    if not stream:
        assert r.json()["usage"]["prompt_tokens"] == expected
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)
        return
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events and r.text.rstrip().endswith("data: [DONE]")
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    plain = requests.post(stack.base_url + "/chat/completions", json=body, timeout=300).json()
    assert text == plain["choices"][0]["message"]["content"]  # greedy: the same tokens either way
