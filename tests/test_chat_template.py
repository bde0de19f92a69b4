import pytest
from transformers import AutoTokenizer

from fastchat_bigdl.adapter import conversation_for
from fastchat_bigdl.common.chat_template import conversation_from_chat_template, conversation_prompt, render
from helpers import CHATML_TEMPLATE, build_tiny_llama

ZEPHYR_LIKE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NOT_A_TURN_FORMAT = "{{ messages | length }} messages"


def tokenizer_with(tmp_path, template):
    path = build_tiny_llama(tmp_path / "m", chat_template=template, hidden_size=64, layers=1)
    return path, AutoTokenizer.from_pretrained(str(path))


def prompt_of(conv, messages):
    return conversation_prompt(conv, messages)


CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And {3+3}?"},
]


# A template that drops the system block when no system message is sent cannot be
# matched exactly then (FastChat always renders the system slot); chats that send
# one, as AutoGen does, are rendered exactly.
@pytest.mark.parametrize(
    "template, exact_without_system",
    [(CHATML_TEMPLATE, True), (ZEPHYR_LIKE, False)],
    ids=["chatml", "zephyr-like"],
)
def test_fastchat_prompt_equals_the_models_own_template(tmp_path, template, exact_without_system):
    _, tok = tokenizer_with(tmp_path, template)
    conv = conversation_from_chat_template(tok)
    assert conv is not None and conv.name != "one_shot"
    with_system = [{"role": "system", "content": "Be brief."}] + CHAT
    assert prompt_of(conv, with_system) == render(template, with_system, tok)
    if exact_without_system:
        assert prompt_of(conv, CHAT) == render(template, CHAT, tok)


def test_chatml_defaults_and_stop_tokens(tmp_path):
    _, tok = tokenizer_with(tmp_path, CHATML_TEMPLATE)
    conv = conversation_from_chat_template(tok)
    assert conv.system_message == "You are a tiny test model"
    assert conv.stop_str == "<|im_end|>"
    assert conv.stop_token_ids == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]


def test_template_without_turn_structure_is_not_guessed(tmp_path):
    _, tok = tokenizer_with(tmp_path, NOT_A_TURN_FORMAT)
    assert conversation_from_chat_template(tok) is None


def test_known_model_keeps_fastchats_template_unknown_uses_tokenizer(tmp_path, tiny_llama):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert conversation_for(str(tiny_llama), tok).name == "llama-2"
    path, tok = tokenizer_with(tmp_path, CHATML_TEMPLATE)
    conv = conversation_for(str(path), tok)
    assert conv.name != "one_shot" and conv.stop_str == "<|im_end|>"
