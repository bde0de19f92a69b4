"""Each family's own tool-call format, without a server: which format a chat template
asks for, the prompt its template renders (ids it accepts), the grammar as the worker's
real token loop enforces it on tiny models whose tokenizers carry the families' special
tokens, and reading the calls back, streamed or whole."""
import dataclasses
import json

import jsonschema
import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, LlamaForCausalLM

from fastchat_bigdl.api.tool_calling.formats import HERMES, LLAMA3_JSON, MISTRAL, format_of
from fastchat_bigdl.api.tool_calling.grammar import output_grammar
from fastchat_bigdl.api.tool_calling.parse import StreamSplitter, parse_reply
from fastchat_bigdl.api.tool_calling.prompt import render_prompt
from fastchat_bigdl.api.tool_calling.spec import Tool, tool_request
from fastchat_bigdl.common.chat_template import conversation_from_chat_template
from fastchat_bigdl.worker.generation import generate_stream
from fastchat_bigdl.worker.grammar_constraint import GrammarConstraint
from fastchat_bigdl.worker.routes import special_token_ids
from helpers import CHATML_TEMPLATE, build_tiny_llama
from tool_templates import LLAMA3_SPECIALS, LLAMA3_STYLE, MISTRAL_SPECIALS, MISTRAL_STYLE, QWEN_STYLE

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
}, "required": ["city", "days"]}
ALARM = {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
         "required": ["hour"]}
TOOLS = [Tool("get_weather", "Weather forecast", WEATHER), Tool("set_alarm", "Set an alarm", ALARM)]
SCHEMAS = {t.name: t.parameters for t in TOOLS}
HISTORY = [
    {"role": "system", "content": "You help with the weather."},
    {"role": "user", "content": "Weather in Paris for 3 days?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0123456789abcdef", "type": "function",
                                                           "function": {"name": "get_weather",
                                                                        "arguments": '{"city": "Paris", "days": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": "sunny, 21 C"},
]


def _rendered(*args):
    prompt = render_prompt(*args)
    return prompt.text, prompt.fmt


def request(**extra):
    return tool_request({"tools": [t.openai() for t in TOOLS], **extra})


def info(template, tokenizer=None):
    return {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>",
            "special_tokens": special_token_ids(tokenizer) if tokenizer is not None else {}}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (model, tokenizer, format) for a tiny model of each format."""
    root = tmp_path_factory.mktemp("tool-formats")
    out = {}
    for name, template, specials, fmt in [("llama3", LLAMA3_STYLE, LLAMA3_SPECIALS, LLAMA3_JSON),
                                          ("mistral", MISTRAL_STYLE, MISTRAL_SPECIALS, MISTRAL)]:
        path = build_tiny_llama(root / name, chat_template=template, special_tokens=specials, context=4096)
        out[name] = (LlamaForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path)), fmt)
    return out


# --- which format, and the prompt ---------------------------------------------------------

def test_the_chat_template_tells_the_format():
    assert format_of(QWEN_STYLE) is HERMES
    assert format_of(LLAMA3_STYLE) is LLAMA3_JSON
    assert format_of(MISTRAL_STYLE) is MISTRAL
    assert format_of(CHATML_TEMPLATE) is None and format_of(None) is None


def test_a_mistral_template_gets_nine_character_ids_matched_between_call_and_result():
    later = [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And Rome?"}]
    prompt, fmt = _rendered({}, info(MISTRAL_STYLE), HISTORY + later, request())
    assert fmt is MISTRAL
    call_part = prompt.split("[TOOL_CALLS] [")[1].split("]</s>")[0]
    call = json.loads(call_part)
    result = json.loads(prompt.split("[TOOL_RESULTS]")[1].split("[/TOOL_RESULTS]")[0])
    assert call["arguments"] == {"city": "Paris", "days": 3}
    assert len(call["id"]) == 9 and call["id"].isalnum() and result["call_id"] == call["id"]
    assert prompt.index("[AVAILABLE_TOOLS]") > prompt.index("sunny")  # the tools go before the last user turn
    assert "You help with the weather.\n\nAnd Rome?[/INST]" in prompt


def test_legacy_function_calls_get_ids_a_strict_template_accepts():
    legacy = [{"role": "user", "content": "Paris?"},
              {"role": "assistant", "content": None,
               "function_call": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}},
              {"role": "function", "name": "get_weather", "content": "rain"},
              {"role": "assistant", "content": "Rain."}, {"role": "user", "content": "Thanks"}]
    prompt, _ = _rendered({}, info(MISTRAL_STYLE), legacy, tool_request({"functions": [TOOLS[0].openai()["function"]]}))
    call = json.loads(prompt.split("[TOOL_CALLS] [")[1].split("]</s>")[0])
    assert call["id"] == json.loads(prompt.split("[TOOL_RESULTS]")[1].split("[/TOOL_RESULTS]")[0])["call_id"]


def test_a_template_that_refuses_the_messages_raises_its_own_reason():
    with pytest.raises(TemplateError, match="alternate"):
        render_prompt({}, info(MISTRAL_STYLE), [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                      request())


def test_a_llama3_template_renders_tools_calls_and_results_itself():
    prompt, fmt = _rendered({}, info(LLAMA3_STYLE), HISTORY, request())
    assert fmt is LLAMA3_JSON
    assert '"parameters": dictionary of argument name' in prompt and '"name": "set_alarm"' in prompt
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
            '{"city": "Paris", "days": 3}}<|eot_id|>') in prompt
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"output": "sunny, 21 C"}<|eot_id|>' in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_hermes_template_path_is_unchanged(tiny_chatml):
    tok = AutoTokenizer.from_pretrained(str(tiny_chatml))
    conv = dataclasses.asdict(conversation_from_chat_template(tok))
    prompt, fmt = _rendered(conv, info(QWEN_STYLE), HISTORY, request())
    assert fmt is HERMES and '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}' in prompt
    _, fmt = _rendered(conv, info(CHATML_TEMPLATE), HISTORY, request())  # no tools in the template: generic
    assert fmt is HERMES


# --- the grammar in each format, enforced by the worker's token loop -----------------------

def generate(family, grammar, seed, skip_special_tokens=True, max_new_tokens=160):
    model, tok, fmt = family
    torch.manual_seed(seed)
    prompt = render_prompt({}, info(LLAMA3_STYLE if fmt is LLAMA3_JSON else MISTRAL_STYLE), HISTORY[:2],
                           request()).text
    params = {"prompt": prompt, "temperature": 1.0, "max_new_tokens": max_new_tokens, "echo": False,
              "grammar": grammar, "skip_special_tokens": skip_special_tokens,
              "stop_token_ids": [tok.convert_tokens_to_ids("<|eot_id|>" if fmt is LLAMA3_JSON else "</s>")]}
    return list(generate_stream(model, tok, params, "cpu", 4096))[-1]


def grammar_for(family, **kwargs):
    _, tok, fmt = family
    return output_grammar(TOOLS, fmt=fmt, opener_token_id=special_token_ids(tok).get(fmt.opener), **kwargs)


@pytest.mark.parametrize("name", ["llama3", "mistral"])
@pytest.mark.parametrize("seed", range(6))
def test_a_required_call_is_written_in_the_family_format_and_reads_back(families, name, seed):
    family = families[name]
    out = generate(family, grammar_for(family, forced=True), seed, skip_special_tokens=name != "mistral")
    assert out["finish_reason"] == "stop", out
    text = out["text"]
    if name == "mistral":
        assert text.startswith("[TOOL_CALLS]") and json.loads(text[len("[TOOL_CALLS]"):])[0]["arguments"] is not None
    else:
        assert set(json.loads(text)) == {"name", "parameters"}
    reply = parse_reply(text, list(SCHEMAS), family[2])
    assert reply.content is None and len(reply.calls) == 1, text
    jsonschema.validate(json.loads(reply.calls[0]["arguments"]), SCHEMAS[reply.calls[0]["name"]])


def allowed_first(family, grammar, fed=()):
    model, tok, _ = family
    constraint = GrammarConstraint(tok, grammar, model.config.vocab_size, [tok.eos_token_id])
    for token in fed:
        assert constraint.advance(token)
    mask = torch.isfinite(constraint.mask(torch.zeros(model.config.vocab_size)))
    return {tok.convert_ids_to_tokens(t) for t in mask.nonzero().flatten().tolist()}


def test_under_auto_a_mistral_reply_is_text_or_opens_with_the_special_token(families):
    family = families["mistral"]
    _, tok, _ = family
    first = allowed_first(family, grammar_for(family))
    assert "[TOOL_CALLS]" in first and "h" in first and "[INST]" not in first
    after = allowed_first(family, grammar_for(family), [tok.convert_tokens_to_ids("[TOOL_CALLS]")])
    assert after <= {"Ġ", "[", "Ġ["} and "[" in after


def test_under_auto_a_llama3_reply_cannot_start_a_call_it_would_not_finish(families):
    family = families["llama3"]
    first = allowed_first(family, grammar_for(family))
    assert "{" in first and "h" in first
    assert not any(t.startswith("Ġ") or t.startswith("Ċ") for t in first)  # a call starts at the start


@pytest.mark.parametrize("seed", range(4))
def test_a_llama3_call_or_json_reply_under_auto_is_always_valid(families, seed):
    family = families["llama3"]
    reply_schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}},
                    "required": ["answer"]}
    out = generate(family, grammar_for(family, reply=reply_schema), seed)
    reply = parse_reply(out["text"], list(SCHEMAS), LLAMA3_JSON)
    if reply.calls:
        jsonschema.validate(json.loads(reply.calls[0]["arguments"]), SCHEMAS[reply.calls[0]["name"]])
    else:
        jsonschema.validate(json.loads(out["text"]), reply_schema)


# --- reading calls back, whole and streamed --------------------------------------------

@pytest.mark.parametrize("fmt,text,calls,content", [
    (LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}', 1, None),
    (LLAMA3_JSON, '<|python_tag|>{"name": "set_alarm", "parameters": {"hour": 7}}; '
                  '{"name": "get_weather", "parameters": {"city": "a;b", "days": 1}}', 2, None),
    (LLAMA3_JSON, 'It is {"name": "set_alarm"}', 0, 'It is {"name": "set_alarm"}'),
    (LLAMA3_JSON, '{"name": "unknown", "parameters": {}}', 0, '{"name": "unknown", "parameters": {}}'),
    (MISTRAL, '[TOOL_CALLS] [{"name": "set_alarm", "arguments": {"hour": 7}}]', 1, None),
    (MISTRAL, '[TOOL_CALLS][{"name": "set_alarm", "arguments": {"hour": 7}}, '
              '{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}]', 2, None),
    (MISTRAL, '[{"name": "set_alarm", "arguments": {"hour": 7}}]', 0,
     '[{"name": "set_alarm", "arguments": {"hour": 7}}]'),  # without the opener it is text
    (MISTRAL, '[TOOL_CALLS] [{"name": "set_alarm", "argu', 0, '[TOOL_CALLS] [{"name": "set_alarm", "argu'),
])
def test_calls_are_read_in_each_format_and_anything_else_stays_text(fmt, text, calls, content):
    reply = parse_reply(text, list(SCHEMAS), fmt)
    assert len(reply.calls) == calls and reply.content == content
    for call in reply.calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("fmt,text,streamed", [
    (LLAMA3_JSON, '{"name": "set_alarm", "parameters": {"hour": 7}}', ""),
    (LLAMA3_JSON, "Hello {there} friend", "Hello {there} friend"),
    (MISTRAL, '[TOOL_CALLS] [{"name": "set_alarm", "arguments": {"hour": 7}}]', ""),
    (MISTRAL, "[TOOL sounds like a tag", "[TOOL sounds like a tag"),
    (HERMES, 'ok <tool_call>\n{"name": "set_alarm", "arguments": {}}\n</tool_call>', "ok"),
])
def test_streaming_never_shows_a_call_as_content(fmt, text, streamed):
    splitter = StreamSplitter(fmt)
    shown = "".join(splitter.content_delta(text[:n]) for n in range(1, len(text) + 1))
    assert shown == streamed
