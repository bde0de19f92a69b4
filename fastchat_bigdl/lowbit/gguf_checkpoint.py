"""GGUF files (what Ollama and llama.cpp users already have) as models: a Llama-family,
Qwen2/3, Phi-3 or Gemma 2/3 GGUF is converted once into a Hugging Face checkpoint in the cache,
which the low-bit library then loads like any other. The tokenizer and chat template come
from the file: byte-level BPE with the GPT-2, SmolLM, Llama 3 (``llama-bpe``) or Qwen2
pre-tokenizer, or a SentencePiece vocabulary (Llama 2, Mistral v0.x, Gemma) rebuilt as
the BPE with byte fallback that SentencePiece runs.

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
from functools import cached_property
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from fastchat_bigdl.common.paths import cache_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 4  # bump when the conversion changes, to rebuild old checkpoints
STAMP = "fastchat_bigdl_gguf.json"
SUGGESTION = "fastchat_bigdl_gguf_low_bit.json"  # the format the file's quantization suggests
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
    permuted_qk: bool  # llama.cpp stores Q/K rows permuted for its RoPE (Llama); not for NEOX-style (Qwen, Gemma)
    extra_config: Tuple[Tuple[str, object], ...] = ()
    layer_tensors: Tuple[str, ...] = ()  # what every block must have beyond a Llama's
    layer_names: Tuple[Tuple[str, str], ...] = ()  # llama.cpp name -> Hugging Face name, beyond LAYER_NAMES
    norm_shift: float = 0.0  # llama.cpp stores Gemma's RMSNorm weights as 1 + w
    config: Optional[Callable[..., dict]] = None  # (key, shape, reader) -> more config from the file

    @cached_property
    def block_names(self) -> Dict[str, str]:
        """llama.cpp block tensor kind -> Hugging Face module path, for this architecture."""
        return {**LAYER_NAMES, **dict(self.layer_names)}


QK_NORMS = (("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm"))
# Gemma's four norms a block: llama.cpp's ffn_norm is the one before the MLP
GEMMA_NORMS = (("post_attention_norm", "post_attention_layernorm"), ("ffn_norm", "pre_feedforward_layernorm"),
               ("post_ffw_norm", "post_feedforward_layernorm"))


def _head_dim(key, shape: dict, reader=None) -> dict:
    return {"head_dim": int(key("attention.key_length") or shape["hidden_size"] // shape["num_attention_heads"])}


def _layer_types(key, layers: int, every: int) -> List[str]:
    """llama.cpp's sliding-window layers: the file's per-layer flags or its period (else
    ``every``), in which all but the last layer slide."""
    pattern = key("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        sliding = [bool(flag) for flag in pattern]
    else:
        period = int(pattern or every)
        sliding = [(i + 1) % period != 0 for i in range(layers)]
    return ["sliding_attention" if flag else "full_attention" for flag in sliding]


def _gemma_config(key, shape: dict, every: int, default_window: Optional[int],
                  default_caps: Tuple[Optional[float], Optional[float]]) -> dict:
    """What llama.cpp's Gemma 2/3 loaders assume beyond the file's keys (``src/models/
    gemma2.cpp``, ``gemma3.cpp``): a sliding-window period (2, 6), Gemma 2's 4096-key window
    and soft-caps 50/30 when absent, Gemma 3 without a window key slides nowhere, the
    local layers' RoPE base ``rope.freq_base_swa`` (Gemma 3: 10000), and a query scale of
    head_dim^-1/2 except on the 27B models (46 or 62 blocks): (hidden/heads)^-1/2."""
    config = _head_dim(key, shape)
    window = key("attention.sliding_window")
    window = default_window if window is None else int(window)
    layers = shape["num_hidden_layers"]
    config["layer_types"] = _layer_types(key, layers, every) if window else ["full_attention"] * layers
    scalar = shape["hidden_size"] // shape["num_attention_heads"] if layers in (46, 62) else config["head_dim"]
    attn_cap, final_cap = key("attn_logit_softcapping"), key("final_logit_softcapping")
    config.update(query_pre_attn_scalar=scalar, hidden_act="gelu_pytorch_tanh",
                  hidden_activation="gelu_pytorch_tanh", sliding_window=window or None,
                  attn_logit_softcapping=default_caps[0] if attn_cap is None else attn_cap,
                  final_logit_softcapping=default_caps[1] if final_cap is None else final_cap,
                  rope_local_base_freq=float(key("rope.freq_base_swa") or 10000.0))
    if key("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    return config


def _phi3_config(key, shape: dict, reader) -> dict:
    """Phi-3/3.5/4-mini as llama.cpp writes them (``conversion/phi.py``): partial rotary as
    ``rope.dimension_count``, a sliding window of 0 for none, and longrope's factors as
    the tensors ``rope_factors_long``/``rope_factors_short`` with the original context."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    config = {"partial_rotary_factor": int(key("rope.dimension_count") or head_dim) / head_dim,
              "sliding_window": int(key("attention.sliding_window") or 0) or None}
    factors = {t.name: [float(x) for x in np.asarray(t.data).reshape(-1)] for t in reader.tensors
               if t.name in ROPE_FACTOR_TENSORS}
    if factors:
        config["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length"))
        config["rope_scaling"] = {"type": "longrope", "long_factor": factors["rope_factors_long.weight"],
                                  "short_factor": factors["rope_factors_short.weight"]}
    return config


ROPE_FACTOR_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")  # config, not weights

ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2", permuted_qk=False,
                          extra_config=(("use_sliding_window", False),),
                          layer_tensors=("attn_q.bias", "attn_k.bias", "attn_v.bias")),
    "qwen3": Architecture("Qwen3ForCausalLM", "qwen3", permuted_qk=False, extra_config=(("use_sliding_window", False),),
                          layer_tensors=("attn_q_norm.weight", "attn_k_norm.weight"), layer_names=QK_NORMS,
                          config=_head_dim),
    "phi3": Architecture("Phi3ForCausalLM", "phi3", permuted_qk=False, layer_tensors=("attn_qkv.weight",),
                         layer_names=(("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")),
                         config=_phi3_config),
    "gemma2": Architecture("Gemma2ForCausalLM", "gemma2", permuted_qk=False, layer_names=GEMMA_NORMS,
                           layer_tensors=("post_attention_norm.weight", "post_ffw_norm.weight"), norm_shift=1.0,
                           config=lambda key, shape, reader: _gemma_config(key, shape, 2, 4096, (50.0, 30.0))),
    "gemma3": Architecture("Gemma3ForCausalLM", "gemma3_text", permuted_qk=False, layer_names=GEMMA_NORMS + QK_NORMS,
                           layer_tensors=("post_attention_norm.weight", "post_ffw_norm.weight", "attn_q_norm.weight"),
                           norm_shift=1.0,
                           config=lambda key, shape, reader: _gemma_config(key, shape, 6, None, (None, None))),
}


# The pre-tokenizers' split patterns, as llama.cpp defines its pre-types (and the models'
# own tokenizer.json files): Llama 3 groups digits by three, Qwen2 splits every digit.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# GPT-4o's o200k split (Phi-4-mini, llama.cpp's "gpt-4o"): case-aware words that keep their
# contraction, digits in threes, punctuation runs that take a following '/'.
_O200K_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _O200K_CONTRACTION
               + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _O200K_CONTRACTION
               + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


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
        raise UnsupportedGGUF(f"only {', '.join(ARCHITECTURES)} GGUF files (Llama, Mistral, SmolLM, Qwen2/2.5/3, "
                              f"Phi-3/3.5/4-mini, Gemma 2/3) can be converted, not {arch!r}")
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
    shape = {
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
    return {**shape, **known.config(key, shape, reader)} if known.config else shape


def architecture_for(model_type: str) -> Architecture:
    return next(known for known in ARCHITECTURES.values() if known.model_type == model_type)


def dequantized(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise UnsupportedGGUF(f"tensor {tensor.name} is {tensor.tensor_type.name}, a quantization type the "
                              "installed gguf package cannot dequantize") from None


def hf_tensor(name: str, value: np.ndarray, config: dict) -> Tuple[str, np.ndarray]:
    """A GGUF tensor under its Hugging Face name and layout."""
    known = architecture_for(config["model_type"])
    if known.norm_shift and name.endswith("norm.weight"):
        value = value - known.norm_shift
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name], value
    try:
        _, layer, kind, suffix = name.split(".")
        hf_name = known.block_names[kind]
    except (ValueError, KeyError):
        raise UnsupportedGGUF(f"tensor {name!r} has no place in a {config['model_type']} checkpoint") from None
    if known.permuted_qk and kind in ("attn_q", "attn_k"):
        heads = config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"]
        value = unpermute_rope(value, heads)
    return f"model.layers.{layer}.{hf_name}.{suffix}", value


def hf_shards(reader, config: dict) -> Iterator[Dict[str, np.ndarray]]:
    """The checkpoint's tensors, a layer at a time, in shards of about ``SHARD_BYTES``
    (few shards load fast; memory holds one shard and one layer)."""
    by_layer: Dict[int, List] = {}
    for tensor in reader.tensors:
        if tensor.name in ROPE_FACTOR_TENSORS:  # read into the config (Phi-3's longrope)
            continue
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
    splits = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "gpt-4o": GPT4O_SPLIT}
    if name in splits:  # the pattern splits, then bytes map to characters without GPT-2's own split
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(splits[name]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UnsupportedGGUF(f"the GGUF's pre-tokenizer {name!r} is not supported yet (supported: gpt-2, smollm, "
                          "llama-bpe, qwen2, gpt-4o); serve the model's Hugging Face checkpoint instead")


NORMAL_TOKEN, USER_DEFINED_TOKEN = 1, 4  # llama.cpp token types (3: control)


def _byte_level_bpe(reader, tokens: List[str]):
    """GPT-2-style byte-level BPE from the file's merges and pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = _field(reader, "tokenizer.ggml.pre")
    tok.pre_tokenizer = _pre_tokenizer(pre)
    if pre == "qwen2":  # Qwen2's tokenizer normalizes to NFC first
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(reader, tokens: List[str], types: List[int]):
    """What SentencePiece runs for a BPE model (Llama 2, Mistral v0.x, Gemma): spaces as
    '▁' (and one in front where the model adds a dummy prefix), pieces merged by score
    (transformers' ``generate_merges``, as its SentencePiece converters do), bytes for what
    the vocabulary lacks. User-defined pieces (Gemma's newlines, tabs, runs of spaces) are
    matched whole, as SentencePiece does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges

    scores = [float(x) for x in _field(reader, "tokenizer.ggml.scores")]
    # llama.cpp writes a user-defined run of spaces as spaces; SentencePiece matches '▁'s
    pieces = [t.replace(" ", "\u2581") if kind == USER_DEFINED_TOKEN else t for t, kind in zip(tokens, types)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    mergeable = {piece: score for piece, score, kind in zip(pieces, scores, types) if kind == NORMAL_TOKEN}
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab, mergeable), fuse_unk=True,
                               byte_fallback=True, unk_token=pieces[int(unk)] if unk is not None else None))
    prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
    prefix = True if prefix is None else bool(prefix)  # llama.cpp's default for these vocabularies
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    # Added tokens are matched in the normalized text (all are ``normalized``), so the
    # prefix goes in front of the whole text once, as SentencePiece puts it.
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_tokens([AddedToken(piece, normalized=True, special=False)
                    for piece, kind in zip(pieces, types) if kind == USER_DEFINED_TOKEN])
    return tok


def build_tokenizer(reader):
    """A fast tokenizer from the GGUF vocabulary: byte-level BPE (``gpt2``) or SentencePiece (``llama``)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    if kind == "gpt2":
        tok = _byte_level_bpe(reader, tokens)
    elif kind == "llama":
        tok = _sentencepiece_bpe(reader, tokens, types)
    else:
        raise UnsupportedGGUF(f"only byte-level BPE (gpt2) and SentencePiece (llama) vocabularies can be "
                              f"converted, not {kind!r}")
    specials = [t for t, kind in zip(tokens, types) if kind == CONTROL_TOKEN]
    in_normalized_text = kind == "llama"  # see _sentencepiece_bpe
    tok.add_special_tokens([AddedToken(t, special=True, normalized=in_normalized_text) for t in specials])

    template = _field(reader, "tokenizer.chat_template")
    bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    bos, eos = tokens[bos_id], tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))]
    if _field(reader, "tokenizer.ggml.add_bos_token"):  # SentencePiece models start every text with it
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    # A chat model's turn ends with the template's end-of-turn token (<|im_end|>,
    # <end_of_turn>), which is what the original Hugging Face release uses as EOS.
    for turn_end in ("<|im_end|>", "<end_of_turn>"):
        if template and turn_end in tokens and turn_end in template:
            eos = turn_end
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=tokens[int(unk or 0)],
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
    low_bit, why = low_bit_for(reader)  # decided here, where the file is already open
    (out_dir / SUGGESTION).write_text(json.dumps({"low_bit": low_bit, "why": why}))
    return out_dir


# The low-bit format that keeps at least what a GGUF's own quantization kept, by the type
# of most of its block matrices. Measured on Gemma 3 270M (Q4_K_M: Q5_0 and Q4_K matrices):
# re-quantized to sym_int4 it answers "Q: What is the capital of France?" with " A. The
# capital of France is 50"; sym_int5 and sym_int8, like the file's own dequantized weights
# and llama.cpp, with " The capital of France is Paris.". sym_int5 is not used: its kernel
# took 3.4 ms a token for one layer's linears against 0.55 ms for sym_int8 and 0.52 ms for
# sym_int4 (AMD EPYC, AVX2, 2 threads).
LOW_BIT_FOR_GGUF = {
    "Q4_0": "sym_int4", "Q4_1": "sym_int4", "IQ4_NL": "sym_int4", "IQ4_XS": "sym_int4",
    "Q4_K": "sym_int8", "Q5_0": "sym_int8", "Q5_1": "sym_int8", "Q5_K": "sym_int8",
    "Q6_K": "sym_int8", "Q8_0": "sym_int8",
}


def low_bit_for(reader) -> Tuple[str, str]:
    """(low-bit format, why) for serving a GGUF when none is asked for: the one closest to
    its block matrices' own type (sym_int4, the default, for full precision)."""
    from collections import Counter

    kinds = Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    if not kinds:
        return "sym_int4", "no quantized block matrices"
    kind = kinds.most_common(1)[0][0]
    return LOW_BIT_FOR_GGUF.get(kind, "sym_int4"), f"its block matrices are mostly {kind}"


def suggested_low_bit(checkpoint: Path) -> Tuple[str, str]:
    """What ``low_bit_for`` said when ``checkpoint`` was converted (parsing a GGUF's
    metadata again would cost seconds at every start: 15 s for Gemma 3's 262,144 pieces)."""
    suggestion = json.loads((Path(checkpoint) / SUGGESTION).read_text())
    return suggestion["low_bit"], suggestion["why"]


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
