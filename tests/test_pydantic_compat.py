"""FastChat's protocol models serialize with pydantic-1 arguments on pydantic 2 (the one
call of fschat 0.2.36's API server that pydantic 2 rejects), and nothing else changes."""
import json

import pydantic
import pytest

from fastchat_bigdl.api import pydantic_compat

pytestmark = pytest.mark.skipif(pydantic_compat.PYDANTIC_MAJOR < 2, reason="pydantic 1 needs no adapting")


def test_stream_chunks_take_pydantic1_json_arguments():
    pydantic_compat.adapt_fastchat_protocol()
    from fastchat.protocol.openai_api_protocol import (
        ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse, DeltaMessage)
    chunk = ChatCompletionStreamResponse(id="chatcmpl-1", model="m", choices=[
        ChatCompletionResponseStreamChoice(index=0, delta=DeltaMessage(content="Grüße"), finish_reason=None)])
    text = chunk.json(exclude_unset=True, ensure_ascii=False)
    assert "Grüße" in text
    data = json.loads(text)
    assert data["choices"][0]["delta"] == {"content": "Grüße"}  # unset role left out
    assert "\\u00fc" in chunk.json(exclude_unset=True)  # ensure_ascii's default, as json.dumps


def test_only_fastchats_own_models_are_adapted_and_only_once():
    pydantic_compat.adapt_fastchat_protocol()
    assert pydantic_compat.adapt_fastchat_protocol() == []
    names = {model.__name__ for model in pydantic_compat.protocol_models()}
    assert {"ChatCompletionStreamResponse", "CompletionStreamResponse", "ErrorResponse"} <= names
    assert "BaseModel" not in names

    class Unrelated(pydantic.BaseModel):
        text: str

    with pytest.raises(TypeError):  # pydantic 2's own json(), untouched
        Unrelated(text="x").json(ensure_ascii=False)
