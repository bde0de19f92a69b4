import pytest
from fastchat.model.model_adapter import get_conversation_template, get_model_adapter, model_adapters

import fastchat_bigdl
from fastchat_bigdl.adapter import BigDLLLMAdapter, register


@pytest.fixture(autouse=True, scope="module")
def registered():
    return fastchat_bigdl.register()


def test_registered_once_and_first_in_fastchats_registry():
    adapter = fastchat_bigdl.register()
    assert isinstance(model_adapters[0], BigDLLLMAdapter) and model_adapters[0] is adapter
    assert register() is adapter and fastchat_bigdl.register() is adapter
    assert sum(isinstance(a, BigDLLLMAdapter) for a in model_adapters) == 1


def test_matches_paths_following_the_bigdl_convention():
    for path in ["/models/Llama-2-7b-chat-hf-bigdl", "vicuna-7b-v1.5-BigDL-int4"]:
        assert isinstance(get_model_adapter(path), BigDLLLMAdapter), path
    for path in ["/models/Llama-2-7b-chat-hf", "lmsys/vicuna-7b-v1.5"]:
        assert not isinstance(get_model_adapter(path), BigDLLLMAdapter), path


def test_template_is_the_one_the_models_own_adapter_chooses():
    assert get_conversation_template("/models/Llama-2-7b-chat-hf-bigdl").name == "llama-2"
    assert get_conversation_template("/models/vicuna-7b-v1.5-bigdl").name == "vicuna_v1.1"
    assert get_conversation_template("/models/vicuna-7b-v1.5-bigdl").name == (
        get_conversation_template("/models/vicuna-7b-v1.5").name
    )
