"""Shared test helpers: tiny local Llama checkpoints and real FastChat processes."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import requests

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "hello world how are you today",
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france paris is the capital",
    "one two three four five six seven eight nine ten",
] * 40


def build_tiny_llama(
    path: Path,
    chat_template: Optional[str] = None,
    rope_theta: Optional[float] = None,
    hidden_size: int = 128,
    layers: int = 2,
    seed: int = 0,
    context: int = 256,
    heads: int = 2,
    kv_heads: Optional[int] = None,
    tie_word_embeddings: bool = False,
    architecture: str = "llama",
    rope_scaling: Optional[dict] = None,
    sliding_window: Optional[int] = None,
    split_regex: Optional[str] = None,
    family_options: Optional[dict] = None,
    special_tokens: tuple = (),
    dtype: Optional[str] = None,
) -> Path:
    """A random-weight Llama (or ``architecture=`` one of mistral, qwen2, and on transformers
    4.53 ``NEWER_FAMILIES``, with ``family_options`` for their config) with a byte-level BPE
    tokenizer trained on a tiny corpus (split as GPT-2 does, or by ``split_regex`` first, as
    Llama 3's and Qwen2's tokenizer.json do; ``special_tokens`` added as special), saved
    in fp32 or ``dtype`` (e.g. "bfloat16"). Dims are multiples of 64, as the low-bit
    layers require."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", *special_tokens]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_regex:
        from tokenizers import Regex

        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    extra = {"chat_template": chat_template} if chat_template else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=specials[3:], **extra,
    )
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    if chat_template:  # transformers 4.31 does not know chat_template: write it ourselves
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = chat_template
        cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        max_position_embeddings=context, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=tie_word_embeddings,
    )
    if architecture == "mistral":
        from transformers import MistralConfig, MistralForCausalLM
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **shape))
    elif architecture == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
        for layer in model.model.layers:  # trained q/k/v biases are far from the init's zeros
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    elif architecture in NEWER_FAMILIES:
        model = _newer_family(architecture, shape, heads, sliding_window, rope_scaling, family_options or {})
    else:
        model = LlamaForCausalLM(LlamaConfig(rope_scaling=rope_scaling, **shape))
    if dtype:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(path), safe_serialization=True)
    if rope_theta is not None:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["rope_theta"] = rope_theta
        cfg_path.write_text(json.dumps(cfg))
    return path


# architecture -> (config class, model class) in transformers.models.<module>
NEWER_FAMILIES = {
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def _newer_family(architecture, shape, heads, sliding_window, rope_scaling, options):
    """A model of a family transformers 4.37 does not know, its norms (and Qwen2-style
    biases, if any) randomised: trained ones are far from the init's ones/zeros, and a
    forward that skipped or misplaced one must not pass by luck."""
    import importlib

    import torch

    module, config_name, model_name = NEWER_FAMILIES[architecture]
    models = importlib.import_module(f"transformers.models.{module}")
    shape = dict(shape, head_dim=shape["hidden_size"] // heads, pad_token_id=0)
    if sliding_window is not None:
        shape["sliding_window"] = sliding_window
    if rope_scaling is not None:
        shape["rope_scaling"] = rope_scaling
    if architecture.startswith("gemma"):
        shape["hidden_activation"] = "gelu_pytorch_tanh"
    config = getattr(models, config_name)(**shape, **options)
    model = getattr(models, model_name)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def chat(base_url: str, model: str, content: str = "hello", **extra) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0}
    body.update(extra)
    return requests.post(base_url + "/chat/completions", json=body, timeout=120)


def pids_alive(pids) -> list:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie is dead for our purposes
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    continue
        except OSError:
            continue
        alive.append(pid)
    return alive


@contextlib.contextmanager
def running_stack(**kwargs):
    """controller + low-bit worker + API server on free loopback ports, ready to serve."""
    from fastchat_bigdl.stack.serve import Stack, free_port

    kwargs.setdefault("port", free_port())
    stack = Stack(**kwargs)
    stack.start()
    try:
        stack.wait_ready(240, progress=lambda line: None)
        yield stack
    finally:
        stack.stop()
    assert pids_alive([c.proc.pid for c in stack.children]) == []


def worker_address(stack) -> str:
    """The worker's own address, as the controller hands it out."""
    controller = stack.child("controller")
    port = controller.argv[controller.argv.index("--port") + 1]
    r = requests.post(f"http://127.0.0.1:{port}/get_worker_address", json={"model": stack.model_name}, timeout=10)
    return r.json()["address"]


def write_tiny_gguf(hf_dir: Path, out: Path, quant: str = "F32", arch: str = "llama",
                    pre: Optional[str] = "gpt-2") -> Path:
    """A GGUF of a tiny Hugging Face Llama or Mistral (``build_tiny_llama``), laid out as
    llama.cpp's converter writes it, by the package's own writer (``bench.gguf_export.write_gguf``:
    GGUF tensor names, permuted Q/K rows, weights as F32 or quantized to ``quant``) with the
    tokenizer's byte-level BPE vocabulary and merges, control-token types and chat template.
    ``arch`` and ``pre`` are what the file claims, so tests can make ones the reader refuses."""
    from transformers import AutoTokenizer

    from fastchat_bigdl.bench.gguf_export import NORMAL_TOKEN, write_gguf
    from fastchat_bigdl.lowbit.gguf_checkpoint import CONTROL_TOKEN

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    spec = json.loads(tok.backend_tokenizer.to_str())
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [t for t, i in sorted(added.items(), key=lambda kv: kv[1]) if i >= len(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    template = tok.init_kwargs.get("chat_template")

    def add_bpe_vocabulary(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        if pre:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([CONTROL_TOKEN if t in added else NORMAL_TOKEN for t in tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tok.bos_token_id)
        writer.add_eos_token_id(tok.eos_token_id)
        writer.add_unk_token_id(tok.unk_token_id)
        if template:
            writer.add_chat_template(template)

    config = json.loads((hf_dir / "config.json").read_text())  # any config: tests also write odd ones
    return write_gguf(hf_dir, out, config, add_bpe_vocabulary, quant, arch)


LONG_TURN = " ".join(["the quick brown fox jumps over the lazy dog"] * 5)


def ag2_long_chat(config, turns: int = 6, turn_text: str = LONG_TURN):
    """An ag2 1.x agent chat continued turn by turn (``reply.ask``): with the tiny models'
    256-token context the prompt outgrows it by the third turn. Returns the last reply."""
    import asyncio

    import ag2

    agent = ag2.Agent("assistant", "You are helpful.", config=config)

    async def chat():
        reply = await agent.ask(f"0 {turn_text}")
        for i in range(1, turns):
            reply = await reply.ask(f"{i} {turn_text}")
        return reply

    return asyncio.run(chat())
