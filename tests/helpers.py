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
) -> Path:
    """A random-weight Llama (or Mistral: ``architecture="mistral"``) with a byte-level BPE
    tokenizer trained on a tiny corpus. Dims are multiples of 64, as the low-bit layers
    require."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
    else:
        model = LlamaForCausalLM(LlamaConfig(rope_scaling=rope_scaling, **shape))
    model.save_pretrained(str(path), safe_serialization=True)
    if rope_theta is not None:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["rope_theta"] = rope_theta
        cfg_path.write_text(json.dumps(cfg))
    return path


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


def permute_rope(weight, n_head: int):
    """llama.cpp's Q/K row order (the inverse of the converter's ``unpermute_rope``)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf(hf_dir: Path, out: Path, quant: str = "F32", arch: str = "llama",
                    pre: Optional[str] = "gpt-2") -> Path:
    """A GGUF of a tiny Hugging Face Llama (``build_tiny_llama``), laid out as llama.cpp's
    converter writes it: GGUF tensor names, permuted Q/K rows, the BPE vocabulary and merges,
    control-token types and the chat template, weights as F32 or quantized (``quant``)."""
    import numpy as np
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = [t for t, _ in vocab]
    for content, i in sorted(added.items(), key=lambda kv: kv[1]):
        if i >= len(tokens):
            tokens.append(content)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_tokenizer_model("gpt2")
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    template = tok.init_kwargs.get("chat_template")
    if template:
        writer.add_chat_template(template)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    qtype = gguf.GGMLQuantizationType[quant]
    for name, value in load_file(str(hf_dir / "model.safetensors")).items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer transformers 4.31 saves; GGUF has none
            continue
        value = value.astype(np.float32)
        if name in names:
            gguf_name = names[name]
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            kind = layer_names[rest[: -len(".weight")]]
            gguf_name = f"blk.{layer}.{kind}.weight"
            if kind == "attn_q":
                value = permute_rope(value, cfg["num_attention_heads"])
            elif kind == "attn_k":
                value = permute_rope(value, cfg["num_key_value_heads"])
        if value.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
