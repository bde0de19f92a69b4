"""Random-weight Llama checkpoints for benchmarking, built locally (no model hub).

The weights are written straight to safetensors shards, one decoder layer per shard,
without building the model: a Llama-2-7B shape (~6.7 B parameters) never needs more
than one layer in memory. The tokenizer is word-level with exactly one word per model
token, so a prompt of N words is exactly N tokens for every stack being compared, and
generated text never decodes to nothing.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    context: int
    tied_embeddings: bool = False  # lm_head shares the input embedding (SmolLM2)
    rope_theta: float = 10000.0

    @property
    def linear_params(self) -> int:
        """Weights of the layers the low-bit library converts (attention, MLP, lm_head)."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attention + mlp) + self.hidden * self.vocab

    @property
    def params(self) -> int:
        return self.linear_params + (0 if self.tied_embeddings else self.hidden * self.vocab)  # + input embeddings


# ~374 M parameters: the shape the measurements used.
DEFAULT_SHAPE = LlamaShape(hidden=1024, layers=24, heads=16, kv_heads=16, intermediate=2816, vocab=32000,
                           context=2048)
QUICK_SHAPE = LlamaShape(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=768, vocab=4096, context=1024)
# TinyLlama-1.1B's shape (grouped-query attention) and Llama-2-7B's.
SHAPE_1B = LlamaShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000, context=2048)
SHAPE_7B = LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, context=4096)
# Today's small models with big vocabularies (their lm_head is a large part of a token):
# Llama-3.2-1B (tied, RoPE base 5e5; its llama3 RoPE scaling only matters past 8k
# positions and is left out, so llama.cpp reads the same model) and Qwen2.5-0.5B's shape
# in the Llama layout (its q/k/v biases, 3 vectors a layer, left out).
SHAPE_LLAMA32_1B = LlamaShape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                              context=8192, tied_embeddings=True, rope_theta=500000.0)
SHAPE_QWEN25_05B = LlamaShape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                              context=8192, tied_embeddings=True, rope_theta=1000000.0)
SHAPES = {"quick": QUICK_SHAPE, "374m": DEFAULT_SHAPE, "1.1b": SHAPE_1B, "7b": SHAPE_7B,
          "llama3.2-1b": SHAPE_LLAMA32_1B, "qwen2.5-0.5b": SHAPE_QWEN25_05B}


def word(i: int) -> str:
    return f"w{i}"


def layer_tensors(shape: LlamaShape, layer: int) -> dict:
    """Hugging Face names and shapes of one decoder layer's weights."""
    head_dim = shape.hidden // shape.heads
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    p = f"model.layers.{layer}."
    return {
        p + "self_attn.q_proj.weight": (q, shape.hidden), p + "self_attn.k_proj.weight": (kv, shape.hidden),
        p + "self_attn.v_proj.weight": (kv, shape.hidden), p + "self_attn.o_proj.weight": (shape.hidden, q),
        p + "mlp.gate_proj.weight": (shape.intermediate, shape.hidden),
        p + "mlp.up_proj.weight": (shape.intermediate, shape.hidden),
        p + "mlp.down_proj.weight": (shape.hidden, shape.intermediate),
        p + "input_layernorm.weight": (shape.hidden,), p + "post_attention_layernorm.weight": (shape.hidden,),
    }


def build_random_llama(path: Path, shape: LlamaShape, seed: int = 0, dtype: str = "float32",
                       progress=lambda line: None) -> Path:
    """Write config, random weights (normal, std 0.02, as Hugging Face initialises a
    Llama; norms 1) in ``dtype`` and a matching tokenizer; reuse an existing build."""
    stamp = path / "fastchat_bigdl_bench.json"
    wanted = {**asdict(shape), "dtype": dtype, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return path
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({word(i): i for i in range(len(SPECIALS), shape.vocab)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=shape.tied_embeddings, torch_dtype=dtype, rope_theta=shape.rope_theta,
    )
    path.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)

    def weight(size) -> "torch.Tensor":
        if len(size) == 1:  # a norm
            return torch.ones(size, dtype=torch_dtype)
        return torch.empty(size).normal_(0.0, 0.02, generator=generator).to(torch_dtype)

    shards = [{"model.embed_tokens.weight": (shape.vocab, shape.hidden)}]
    shards += [layer_tensors(shape, layer) for layer in range(shape.layers)]
    shards.append({"model.norm.weight": (shape.hidden,),
                   **({} if shape.tied_embeddings else {"lm_head.weight": (shape.vocab, shape.hidden)})})
    index, total = {}, 0
    for number, names in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: weight(size) for name, size in names.items()}  # one layer in memory
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(path / filename), metadata={"format": "pt"})
        index.update({name: filename for name in names})
        progress(f"  wrote {filename} ({total / 2**30:.1f} GiB so far)")
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    (path / "model.safetensors").unlink(missing_ok=True)  # an older single-file build
    config.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    stamp.write_text(json.dumps(wanted))
    return path


def words(n: int, seed: int, vocab: int) -> str:
    """Text of exactly ``n`` tokens for the bench tokenizer (no special tokens)."""
    rng = random.Random(seed)
    return " ".join(word(rng.randrange(len(SPECIALS), vocab)) for _ in range(n))
