"""Random-weight Llama checkpoints for benchmarking, built locally (no model hub).

The tokenizer is word-level with exactly one word per model token, so a prompt of N
words is exactly N tokens for every stack being compared, and generated text never
decodes to nothing.
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


def word(i: int) -> str:
    return f"w{i}"


def build_random_llama(path: Path, shape: LlamaShape, seed: int = 0) -> Path:
    """Write config, random fp32 weights and a matching tokenizer; reuse an existing build."""
    stamp = path / "fastchat_bigdl_bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(shape):
        return path
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({word(i): i for i in range(len(SPECIALS), shape.vocab)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context, bos_token_id=1, eos_token_id=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(path), safe_serialization=True)
    fast.save_pretrained(str(path))
    stamp.write_text(json.dumps(asdict(shape)))
    return path


def words(n: int, seed: int, vocab: int) -> str:
    """Text of exactly ``n`` tokens for the bench tokenizer (no special tokens)."""
    rng = random.Random(seed)
    return " ".join(word(rng.randrange(len(SPECIALS), vocab)) for _ in range(n))
