"""GGUF files as models: a Llama-family GGUF (as Ollama and llama.cpp users have them) is
converted once into a cached Hugging Face checkpoint and served low-bit; what cannot be
converted is one clear error."""
import subprocess
import sys

import pytest
import torch

from fastchat_bigdl.lowbit import gguf_checkpoint
from fastchat_bigdl.lowbit.gguf_checkpoint import UnsupportedGGUF, ensure_checkpoint
from fastchat_bigdl.stack.serve import free_port
from helpers import CHATML_TEMPLATE, build_tiny_llama, chat, running_stack, write_tiny_gguf

TEXTS = ["hello world how are you today 12345", "<|im_start|>user\nwhat is the capital<|im_end|>\n"]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tinyllm-instruct", chat_template=CHATML_TEMPLATE)


@pytest.mark.parametrize("quant, tolerance", [("F32", 0.0), ("Q8_0", 0.02)])
def test_converted_gguf_matches_the_original_model_and_tokenizer(hf_model, tmp_path, quant, tolerance):
    from transformers import AutoTokenizer, LlamaForCausalLM

    converted = ensure_checkpoint(write_tiny_gguf(hf_model, tmp_path / f"tiny.{quant}.gguf", quant), tmp_path / "hf")
    original_tok, converted_tok = (AutoTokenizer.from_pretrained(str(p)) for p in (hf_model, converted))
    for text in TEXTS:
        assert converted_tok(text).input_ids == original_tok(text).input_ids
    assert converted_tok.eos_token == "<|im_end|>" and converted_tok.init_kwargs["chat_template"] == CHATML_TEMPLATE
    ids = torch.tensor([original_tok(TEXTS[1]).input_ids])
    with torch.inference_mode():
        want = LlamaForCausalLM.from_pretrained(str(hf_model)).eval()(ids).logits
        got = LlamaForCausalLM.from_pretrained(str(converted)).eval()(ids).logits
    # F32 round-trips exactly; Q8_0 is within its quantization error of the original
    assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()


def test_large_models_are_written_a_layer_at_a_time_in_shards(hf_model, tmp_path, mocker):
    from transformers import LlamaForCausalLM

    mocker.patch.object(gguf_checkpoint, "SHARD_BYTES", 1)  # every layer its own shard
    converted = ensure_checkpoint(write_tiny_gguf(hf_model, tmp_path / "tiny.gguf"), tmp_path / "hf")
    shards = sorted(p.name for p in converted.glob("model-*.safetensors"))
    assert len(shards) == 3  # embeddings, norm and head; then each of the two layers
    ids = torch.tensor([[3, 40, 77, 100, 5]])
    with torch.inference_mode():
        want = LlamaForCausalLM.from_pretrained(str(hf_model)).eval()(ids).logits
        got = LlamaForCausalLM.from_pretrained(str(converted)).eval()(ids).logits
    assert torch.equal(got, want)


def test_conversion_is_cached_and_redone_when_the_file_changes(hf_model, tmp_path, mocker):
    gguf = write_tiny_gguf(hf_model, tmp_path / "tiny.gguf")
    convert = mocker.spy(gguf_checkpoint, "convert_gguf")
    first = ensure_checkpoint(gguf)
    assert ensure_checkpoint(gguf) == first and convert.call_count == 1
    write_tiny_gguf(hf_model, gguf, "Q8_0")  # replaced by another quantization
    assert ensure_checkpoint(gguf) == first and convert.call_count == 2


@pytest.mark.parametrize("kind, expected", [
    ({"arch": "qwen2"}, "only Llama-architecture GGUF files"),
    ({"pre": "falcon"}, "pre-tokenizer 'falcon' is not supported"),
])
def test_what_cannot_be_converted_is_one_clear_error(hf_model, tmp_path, kind, expected):
    gguf = write_tiny_gguf(hf_model, tmp_path / "odd.gguf", **kind)
    with pytest.raises(UnsupportedGGUF, match=expected):
        ensure_checkpoint(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.backend
def test_a_gguf_file_is_served_under_its_name(hf_model, tmp_path):
    gguf = write_tiny_gguf(hf_model, tmp_path / "tinyllm-chat.Q8_0.gguf", "Q8_0")
    with running_stack(model_path=str(gguf), model_name="tinyllm-chat.Q8_0", log_dir=tmp_path / "logs") as stack:
        r = chat(stack.base_url, "tinyllm-chat.Q8_0", max_tokens=6)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        assert "Converting tinyllm-chat.Q8_0.gguf" in stack.child("worker").log_path.read_text()


@pytest.mark.slow
def test_an_unconvertible_gguf_stops_the_worker_with_one_line(hf_model, tmp_path):
    gguf = write_tiny_gguf(hf_model, tmp_path / "odd.gguf", arch="qwen2")
    out = subprocess.run([sys.executable, "-m", "fastchat_bigdl.model_worker", "--bigdl_load", "--model-path",
                          str(gguf), "--no-register"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].endswith("can be converted, not 'qwen2'")


@pytest.mark.slow
def test_serve_takes_the_demo_gguf_directly(tmp_path):
    """The demo model's own GGUF as --model-path: converted, named after the file, and
    answering sensibly (SmolLM2 needs rope_theta, i.e. the default transformers)."""
    from fastchat_bigdl.stack.demo_model import demo_gguf_path

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastchat_bigdl", "serve", "--model-path", str(demo_gguf_path()),
                             "--port", str(port), "--log-dir", str(tmp_path / "logs")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = next(line for line in proc.stdout if line.startswith("fastchat-bigdl ready") or "error" in line)
        assert ready.startswith("fastchat-bigdl ready") and "model=SmolLM2-135M-Instruct.Q4_1" in ready, ready
        r = chat(f"http://127.0.0.1:{port}/v1", "SmolLM2-135M-Instruct.Q4_1", "What is the capital of France?",
                 max_tokens=24)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(60)
