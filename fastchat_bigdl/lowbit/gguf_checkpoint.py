"""GGUF files (what Ollama and llama.cpp users already have) as models: a Llama-family or
Qwen2 GGUF is converted once into a Hugging Face checkpoint in the cache, which the
low-bit library then loads like any other. The tokenizer and chat template come from the
file: byte-level BPE with the GPT-2, SmolLM, Llama 3 (``llama-bpe``) or Qwen2 pre-tokenizer.

The conversion dequantizes one layer at a time (``gguf``'s numpy dequantizers) and
writes safetensors shards of about 1 GiB, so memory holds a shard, not the model. What it
cannot convert (another architecture, a tokenizer or pre-tokenizer it does not know, a
quantization type ``gguf`` cannot dequantize) is refused with one clear line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from fastchat_bigdl.common.paths import cache_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the conversion changes, to rebuild old checkpoints
STAMP = "fastchat_bigdl_gguf.json"
SHARD_BYTES = 1 << 30
CONTROL_TOKEN = 3  # llama.cpp token type for special/control tokens
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




@dataclass(frozen=True)
class Architecture:
    """How a llama.cpp architecture maps onto a Hugging Face one."""
    hf_class: str
    model_type: str
    permuted_qk: bool  # llama.cpp stores Q/K rows permuted for its RoPE (Llama); not for NEOX-style (Qwen2)
    extra_config: Tuple[Tuple[str, object], ...] = ()
    layer_tensors: Tuple[str, ...] = ()  # what every block must have beyond a Llama's


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2", permuted_qk=False,
                          extra_config=(("use_sliding_window", False),),
                          layer_tensors=("attn_q.bias", "attn_k.bias", "attn_v.bias")),
}

# The pre-tokenizers' split patterns, as llama.cpp defines its pre-types (and the models'
# own tokenizer.json files): Llama 3 groups digits by three, Qwen2 splits every digit.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


class UnsupportedGGUF(ValueError):
    """This GGUF cannot be converted; the message says what it has and what is supported."""


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(".gguf")


def served_name(gguf_path: str) -> str:
    """The model name a GGUF is served under: its file name without ``.gguf``."""
    return Path(gguf_path).name[: -len(".gguf")]


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


def architecture_of(reader) -> Tuple[str, Architecture]:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedGGUF(f"only {', '.join(ARCHITECTURES)} GGUF files (Llama, Mistral, SmolLM, Qwen2/2.5) can "
                              f"be converted, not {arch!r}")
    return arch, ARCHITECTURES[arch]


def hf_config(reader) -> dict:
    arch, known = architecture_of(reader)

    def key(name: str):
        return _field(reader, f"{arch}.{name}")

    heads = int(key("attention.head_count"))
    names = {t.name for t in reader.tensors}
    for layer in range(int(key("block_count"))):
        missing = [n for n in known.layer_tensors if f"blk.{layer}.{n}" not in names]
        if missing:
            raise UnsupportedGGUF(f"this {arch} GGUF's block {layer} has no {', '.join(missing)}")
    return {
        "architectures": [known.hf_class],
        "model_type": known.model_type,
        "hidden_size": int(key("embedding_length")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv") or heads),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base") or 10000.0),
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
        **dict(known.extra_config),
    }


def dequantized(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise UnsupportedGGUF(f"tensor {tensor.name} is {tensor.tensor_type.name}, a quantization type the "
                              "installed gguf package cannot dequantize") from None


def hf_tensor(name: str, value: np.ndarray, config: dict) -> Tuple[str, np.ndarray]:
    """A GGUF tensor under its Hugging Face name and layout."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name], value
    try:
        _, layer, kind, suffix = name.split(".")
        hf_name = LAYER_NAMES[kind]
    except (ValueError, KeyError):
        raise UnsupportedGGUF(f"tensor {name!r} has no place in a {config['model_type']} checkpoint") from None
    if ARCHITECTURES[config["model_type"]].permuted_qk and kind in ("attn_q", "attn_k"):
        heads = config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"]
        value = unpermute_rope(value, heads)
    return f"model.layers.{layer}.{hf_name}.{suffix}", value


def hf_shards(reader, config: dict) -> Iterator[Dict[str, np.ndarray]]:
    """The checkpoint's tensors, a layer at a time, in shards of about ``SHARD_BYTES``
    (few shards load fast; memory holds one shard and one layer)."""
    by_layer: Dict[int, List] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        by_layer.setdefault(int(parts[1]) if parts[0] == "blk" else -1, []).append(tensor)
    shard: Dict[str, np.ndarray] = {}
    size = 0
    for layer in sorted(by_layer):
        for tensor in by_layer[layer]:
            name, value = hf_tensor(tensor.name, dequantized(tensor), config)
            shard[name] = value
            size += value.nbytes
        if size >= SHARD_BYTES:
            yield shard
            shard, size = {}, 0
    if shard:
        yield shard


def _pre_tokenizer(name: Optional[str]):
    """llama.cpp's pre-tokenizer name -> how the text is split before byte-level BPE."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if name in (None, "default", "gpt-2", "gpt2"):
        return byte_level
    if name == "smollm":  # single digits, then the GPT-2 split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    splits = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
    if name in splits:  # the pattern splits, then bytes map to characters without GPT-2's own split
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(splits[name]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UnsupportedGGUF(f"the GGUF's pre-tokenizer {name!r} is not supported yet (supported: gpt-2, smollm, "
                          "llama-bpe, qwen2); serve the model's Hugging Face checkpoint instead")


def build_tokenizer(reader):
    """A fast GPT-2-style byte-level BPE tokenizer from the GGUF vocab and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedGGUF(f"only byte-level BPE (gpt2) tokenizers can be converted, not {kind!r} "
                              "(SentencePiece 'llama' tokenizers: serve the Hugging Face checkpoint instead)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = _field(reader, "tokenizer.ggml.pre")
    tok.pre_tokenizer = _pre_tokenizer(pre)
    if pre == "qwen2":  # Qwen2's tokenizer normalizes to NFC first
        tok.normalizer = normalizers.NFC()
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
        model_max_length=int(_field(reader, f"{architecture_of(reader)[0]}.context_length")),
        clean_up_tokenization_spaces=False,
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face checkpoint (config, safetensors shards, tokenizer) for a GGUF."""
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    config = hf_config(reader)
    tokenizer = build_tokenizer(reader)
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for index, tensors in enumerate(hf_shards(reader, config), start=1):
        filename = f"model-{index:05d}.safetensors"
        save_file({k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in tensors.items()},
                  str(out_dir / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in tensors})
        total += sum(v.nbytes for v in tensors.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _source_stamp(gguf_path: Path) -> dict:
    st = gguf_path.stat()
    return {"format": FORMAT_VERSION, "source": str(gguf_path.resolve()), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def ensure_checkpoint(gguf_path, target: Optional[Path] = None) -> Path:
    """The Hugging Face checkpoint converted from ``gguf_path``, converting it on first use
    (again when the file changed). ``target`` defaults to a directory named after the file
    under ``~/.cache/fastchat-bigdl/models/gguf``. Written to a temporary sibling and renamed
    into place, so an interrupted or concurrent conversion never leaves half a model."""
    gguf_path = Path(gguf_path)
    if target is None:
        key = hashlib.sha256(str(gguf_path.resolve()).encode()).hexdigest()[:12]
        target = cache_dir() / "models" / "gguf" / f"{served_name(str(gguf_path))}-{key}"
    stamp, wanted = target / STAMP, _source_stamp(gguf_path)
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return target
    logger.info("Converting %s into a Hugging Face checkpoint at %s (once) ...", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(gguf_path, tmp)
        (tmp / STAMP).write_text(json.dumps(wanted))
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
