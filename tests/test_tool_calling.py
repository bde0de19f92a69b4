"""Tool calling pieces without a server: the request's tool part, the prompt, the
grammar as the worker's real token loop enforces it, and reading calls back."""
import json

import jsonschema
import pytest
import torch
import dataclasses

from transformers import AutoTokenizer, LlamaForCausalLM

from fastchat_bigdl.common.chat_template import conversation_from_chat_template
from fastchat_bigdl.worker.generation import generate_stream
from fastchat_bigdl.common.errors import Invalid
from fastchat_bigdl.api.tool_calling.grammar import output_grammar
from fastchat_bigdl.api.tool_calling.parse import StreamSplitter, parse_reply
from fastchat_bigdl.api.tool_calling.prompt import render_generic, render_prompt
from fastchat_bigdl.api.tool_calling.spec import Tool, tool_request, uses_tools_or_json
from tool_templates import QWEN_STYLE

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
}, "required": ["city", "days"]}
BOOKING = {"type": "object", "properties": {
    "guests": {"type": "integer", "minimum": 1, "maximum": 9},
    "vegetarian": {"type": "boolean"},
    "date": {"type": "string", "pattern": "^2026-(0[1-9]|1[0-2])-[0-3][0-9]$"},
    "tags": {"type": "array", "items": {"enum": ["window", "quiet", "outside"]}, "maxItems": 3},
}, "required": ["guests", "date"]}
TOOLS = [Tool("get_weather", "Weather forecast for a city", WEATHER), Tool("book_table", "Book a table", BOOKING)]


def openai_tools(*tools):
    return [t.openai() for t in tools]


# --- the request -------------------------------------------------------------------

def test_tools_and_choices_are_normalised():
    req = tool_request({"tools": openai_tools(*TOOLS)})
    assert req.choice == "auto" and [t.name for t in req.offered()] == ["get_weather", "book_table"]
    req = tool_request({"tools": openai_tools(*TOOLS), "tool_choice": {"type": "function", "function": {"name": "book_table"}}})
    assert req.choice == "named" and req.constrained and [t.name for t in req.offered()] == ["book_table"]
    assert tool_request({"tools": openai_tools(*TOOLS), "tool_choice": "none"}).offered() == []
    legacy = tool_request({"functions": [TOOLS[0].openai()["function"]], "function_call": {"name": "get_weather"}})
    assert legacy.legacy and legacy.choice == "named"


def test_a_function_without_parameters_takes_an_empty_object():
    req = tool_request({"tools": [{"type": "function", "function": {"name": "now"}}], "tool_choice": "required"})
    assert req.tools[0].parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize("data, words", [
    ({"tools": openai_tools(Tool("f", "", {"type": "object", "properties": {"a": {"type": "strin"}}}))},
     "Invalid type: strin"),
    ({"tools": openai_tools(Tool("f", "", {"type": "object", "properties": {"a": {"$ref": "#/defs/nope"}}}))},
     "not a JSON schema this server can enforce"),
    ({"tools": openai_tools(TOOLS[0]), "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "not among the tools"),
    ({"tool_choice": "required"}, "no tools were given"),
    ({"functions": [{"name": "f"}], "tool_choice": "auto"}, "'tool_choice' goes with 'tools'"),
])
def test_bad_tool_requests_say_what_is_wrong(data, words):
    with pytest.raises(Invalid) as info:
        tool_request(data)
    assert words in str(info.value)


def test_requests_without_tools_stay_with_fastchat():
    assert not uses_tools_or_json({"messages": [{"role": "user", "content": "hi"}]})
    assert uses_tools_or_json({"messages": [{"role": "tool", "content": "3", "tool_call_id": "a"}]})
    assert uses_tools_or_json({"messages": [{"role": "user", "content": "hi"}], "tools": []})


# --- the prompt ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_chatml):
    return LlamaForCausalLM.from_pretrained(str(tiny_chatml)).eval(), AutoTokenizer.from_pretrained(str(tiny_chatml))


@pytest.fixture
def chatml(tiny):
    """The conversation template the worker derives from the tiny model's ChatML template."""
    return conversation_from_chat_template(tiny[1])


HISTORY = [
    {"role": "system", "content": "You help with the weather."},
    {"role": "user", "content": "Weather in Paris for 3 days?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def test_generic_prompt_carries_tools_calls_and_results_in_the_model_template(chatml):
    req = tool_request({"tools": openai_tools(*TOOLS)})
    prompt = render_generic(chatml, HISTORY, req)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou help with the weather.")
    assert '"name": "book_table"' in system and "<tool_call>" in system
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
            "\n</tool_call><|im_end|>") in prompt
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tool_choice_none_keeps_tools_out_of_the_prompt(chatml):
    req = tool_request({"tools": openai_tools(*TOOLS), "tool_choice": "none"})
    assert "<tools>" not in render_generic(chatml, HISTORY[:2], req)


def test_a_chat_template_that_knows_tools_renders_them_itself(chatml):
    req = tool_request({"tools": openai_tools(TOOLS[0])})
    info = {"chat_template": QWEN_STYLE, "bos_token": None, "eos_token": "<|im_end|>"}
    conv = dataclasses.asdict(chatml)
    prompt = render_prompt(conv, info, HISTORY, req).text
    assert '"description": "Weather forecast for a city"' in prompt  # from the template's tojson
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>' in prompt
    assert "\\u003c" not in prompt and prompt.endswith("<|im_start|>assistant")


# --- the grammar, enforced by the worker's token loop ----------------------------------


def generate(tiny, grammar, seed, temperature=1.0, max_new_tokens=200):
    model, tok = tiny
    torch.manual_seed(seed)
    params = {"prompt": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "temperature": temperature,
              "max_new_tokens": max_new_tokens, "echo": False, "grammar": grammar,
              "stop_token_ids": [tok.convert_tokens_to_ids("<|im_end|>")]}
    return list(generate_stream(model, tok, params, "cpu", 256))[-1]


@pytest.mark.parametrize("seed", range(24))
def test_a_required_call_always_names_an_offered_tool_and_validates(tiny, seed):
    out = generate(tiny, output_grammar(TOOLS, forced=True), seed)
    assert out["finish_reason"] == "stop", out
    reply = parse_reply(out["text"], [t.name for t in TOOLS])
    assert reply.content is None and len(reply.calls) == 1, out["text"]
    call = reply.calls[0]
    schema = {t.name: t.parameters for t in TOOLS}[call["name"]]
    jsonschema.validate(json.loads(call["arguments"]), schema)


@pytest.mark.parametrize("seed", range(6))
def test_a_named_call_uses_that_tool(tiny, seed):
    out = generate(tiny, output_grammar([TOOLS[1]], forced=True), seed)
    call = parse_reply(out["text"], ["book_table"]).calls[0]
    jsonschema.validate(json.loads(call["arguments"]), BOOKING)


def test_auto_leaves_the_model_free_to_answer_in_text(tiny):
    from fastchat_bigdl.worker.grammar_constraint import GrammarConstraint

    model, tok = tiny
    out = generate(tiny, output_grammar(TOOLS, forced=False), seed=3, temperature=0, max_new_tokens=24)
    assert out["finish_reason"] == "length" and out["text"] and "<tool_call>" not in out["text"]
    constraint = GrammarConstraint(tok, output_grammar(TOOLS, forced=False), model.config.vocab_size,
                                   [tok.eos_token_id])
    allowed = set(torch.isfinite(constraint.mask(torch.zeros(model.config.vocab_size))).nonzero().flatten().tolist())
    text_tokens = {t for t in range(len(tok)) if t not in tok.all_special_ids and "\ufffd" not in tok.decode([t])}
    assert text_tokens <= allowed  # any token of text may come first


def test_auto_constrains_a_call_once_the_model_opens_one(tiny):
    from fastchat_bigdl.worker.grammar_constraint import GrammarConstraint

    model, tok = tiny
    constraint = GrammarConstraint(tok, output_grammar(TOOLS, forced=False), model.config.vocab_size,
                                   [tok.eos_token_id])
    for token in tok("Let me check. <tool_call>", add_special_tokens=False).input_ids:
        assert constraint.advance(token)
    allowed = torch.isfinite(constraint.mask(torch.zeros(model.config.vocab_size))).nonzero().flatten().tolist()
    assert [tok.decode([t]) for t in allowed] == ["\n"]


# --- reading calls back -------------------------------------------------------------------

def test_text_and_calls_are_split_and_broken_calls_stay_text():
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    reply = parse_reply(text, ["get_weather"])
    assert reply.content == "Checking." and json.loads(reply.calls[0]["arguments"]) == {"city": "Oslo", "days": 2}
    assert reply.calls[0]["id"].startswith("call_")
    assert parse_reply(text, ["book_table"]).calls == []  # not an offered tool
    cut = text[:60]
    assert parse_reply(cut, ["get_weather"]).content == cut


def test_streamed_content_never_shows_a_partial_call_tag():
    splitter, sent = StreamSplitter(), ""
    full = "Sure.\n<tool_call>\n{...}"
    for end in range(1, len(full) + 1):
        sent += splitter.content_delta(full[:end])
        assert "<" not in sent
    assert sent == "Sure."


# --- JSON replies (response_format) -----------------------------------------------------------

FORECAST = {"type": "object", "properties": {
    "city": {"enum": ["paris", "oslo", "lima"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "rain": {"type": "boolean"},
    "note": {"type": "string", "maxLength": 10},
}, "required": ["city", "days", "rain"]}


def json_schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema, "strict": True}}


def test_response_format_is_normalised_and_bad_ones_are_refused():
    assert tool_request({"response_format": {"type": "text"}}).reply is None
    assert tool_request({"response_format": {"type": "json_object"}}).reply == {"type": "object"}
    reply = tool_request({"response_format": json_schema_format(FORECAST)}).reply
    assert reply["additionalProperties"] is False and reply["properties"] == FORECAST["properties"]
    assert uses_tools_or_json({"response_format": {"type": "json_object"}})
    assert not uses_tools_or_json({"response_format": {"type": "text"}})
    for fmt, words in [({"type": "yaml"}, "'response_format' must be"),
                       ({"type": "json_schema"}, "'response_format.json_schema' must be"),
                       (json_schema_format({"type": "object", "properties": {"a": {"type": "strin"}}}),
                        "Invalid type: strin")]:
        with pytest.raises(Invalid, match=words):
            tool_request({"response_format": fmt})


@pytest.mark.parametrize("seed", range(12))
def test_a_json_schema_reply_always_validates(tiny, seed):
    reply = tool_request({"response_format": json_schema_format(FORECAST)}).reply
    out = generate(tiny, output_grammar(reply=reply), seed)
    assert out["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["text"]), FORECAST)


def test_a_json_object_reply_starts_as_an_object(tiny):
    from fastchat_bigdl.worker.grammar_constraint import GrammarConstraint

    model, tok = tiny
    constraint = GrammarConstraint(tok, output_grammar(reply={"type": "object"}), model.config.vocab_size,
                                   [tok.eos_token_id])
    allowed = torch.isfinite(constraint.mask(torch.zeros(model.config.vocab_size))).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).startswith("{") for t in allowed)


@pytest.mark.parametrize("seed", range(8))
def test_tools_with_a_json_reply_give_a_valid_call_or_valid_json(tiny, seed):
    req = tool_request({"tools": openai_tools(*TOOLS), "response_format": json_schema_format(FORECAST)})
    out = generate(tiny, output_grammar(req.offered(), req.constrained, req.reply), seed)
    reply = parse_reply(out["text"], [t.name for t in TOOLS])
    if reply.calls:
        call = reply.calls[0]
        jsonschema.validate(json.loads(call["arguments"]), {t.name: t.parameters for t in TOOLS}[call["name"]])
    else:
        jsonschema.validate(json.loads(out["text"]), FORECAST)


# --- calls that fit max_tokens ---------------------------------------------------------------

UNBOUNDED = {"type": "object", "properties": {"note": {"type": "string"}, "count": {"type": "integer"}},
             "required": ["note", "count"]}
# A number followed by more required fields: closing must move on, not add digits.
NUMBERS_FIRST = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"},
                                                  "to": {"type": "string"}}, "required": ["a", "b", "to"]}


@pytest.mark.parametrize("schema", [UNBOUNDED, NUMBERS_FIRST], ids=["string-then-integer", "numbers-then-string"])
@pytest.mark.parametrize("seed", range(20))
def test_a_required_call_with_unbounded_fields_is_closed_within_max_tokens(tiny, seed, schema):
    """A random model at temperature 1 writes strings and numbers that never end; near the
    end of the budget the constraint closes them, so the call is complete and valid."""
    tool = tool_request({"tools": openai_tools(Tool("log", "Log a note", schema))}).tools
    out = generate(tiny, output_grammar(tool, forced=True), seed, max_new_tokens=128)
    assert out["finish_reason"] == "stop" and out["usage"]["completion_tokens"] <= 128, out
    call = parse_reply(out["text"], ["log"]).calls[0]
    jsonschema.validate(json.loads(call["arguments"]), schema)


@pytest.mark.parametrize("seed", range(6))
def test_a_json_reply_with_unbounded_fields_is_closed_within_max_tokens(tiny, seed):
    reply = tool_request({"response_format": json_schema_format(UNBOUNDED)}).reply
    out = generate(tiny, output_grammar(reply=reply), seed, max_new_tokens=40)
    assert out["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["text"]), UNBOUNDED)


def test_free_text_under_auto_still_ends_by_length(tiny):
    """Closing applies inside a structure only: free text cut by max_tokens says so."""
    out = generate(tiny, output_grammar(TOOLS, forced=False), seed=3, temperature=0, max_new_tokens=24)
    assert out["finish_reason"] == "length"


def test_the_closing_plan_ends_an_open_string_then_fills_the_required_rest(tiny):
    from fastchat_bigdl.worker.grammar_constraint import GrammarConstraint, closing_plan

    model, tok = tiny
    tool = tool_request({"tools": openai_tools(Tool("log", "Log a note", UNBOUNDED))}).tools
    constraint = GrammarConstraint(tok, output_grammar(tool, forced=True), model.config.vocab_size,
                                   [tok.convert_tokens_to_ids("<|im_end|>")])
    opened = '<tool_call>\n{"name": "log", "arguments": {"note": "the quick brown fox }}'
    for token in tok(opened, add_special_tokens=False).input_ids:
        assert constraint.advance(token)
    plan = closing_plan(constraint.matcher, constraint.info, constraint._text)
    finished = opened + tok.decode(plan, skip_special_tokens=True)
    call = parse_reply(finished, ["log"]).calls[0]  # '}}' inside the string did not fool it
    assert json.loads(call["arguments"]) == {"note": "the quick brown fox }}", "count": 0}
    assert len(plan) < 40  # a few tokens per character at most with this tiny vocabulary
