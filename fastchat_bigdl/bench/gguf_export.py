"""A bench checkpoint as a GGUF, so llama.cpp runs the very weights this package serves.

The reverse of ``lowbit.gguf_checkpoint`` (same tensor names, Q/K rows permuted back to
llama.cpp's RoPE layout), written with ``gguf``'s own writer and quantizers. Q4_0 is
llama.cpp's twin of ipex-llm's ``sym_int4``: the same round-to-nearest 4-bit values with
one fp16 scale per block (blocks of 32 weights there, 64 in ipex-llm's CPU layout: 4.5
and 4.25 bits a weight), quantized from the same bf16/fp32 weights. Tensors are streamed
one at a time: a 7B model never sits in memory.

Only the bench's word-level tokenizer is exported (one token per word, as a SentencePiece
vocabulary of ``▁word`` pieces, so llama.cpp's output decodes to the same words); the bench
hands llama.cpp token ids, never text to tokenize. Real models come with GGUFs of their own
(or llama.cpp's ``convert_hf_to_gguf.py``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np

from fastchat_bigdl.lowbit.gguf_checkpoint import CONTROL_TOKEN, GLOBAL_NAMES, LAYER_NAMES

NORMAL_TOKEN, UNKNOWN_TOKEN = 1, 2  # llama.cpp token types
TYPES = ("q4_0", "f32")
HF_TO_GGUF = {hf: gguf for gguf, hf in GLOBAL_NAMES.items()}
HF_LAYER_TO_GGUF = {hf: gguf for gguf, hf in LAYER_NAMES.items()}


class NotExportable(ValueError):
    """This checkpoint is not one the exporter writes (the message says why)."""


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face Q/K rows (RoPE on the two halves of a head) in llama.cpp's order
    (RoPE on adjacent pairs); ``gguf_checkpoint.unpermute_rope`` undoes it."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<module path>.weight
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or ".".join(parts[3:-1]) not in HF_LAYER_TO_GGUF:
        raise NotExportable(f"tensor {hf_name!r} has no place in a llama.cpp Llama")
    return f"blk.{parts[2]}.{HF_LAYER_TO_GGUF['.'.join(parts[3:-1])]}.weight"


def _config(model_path: Path) -> dict:
    config = json.loads((model_path / "config.json").read_text())
    if config.get("model_type") != "llama" or config.get("rope_scaling"):
        raise NotExportable(f"{model_path} is not a plain Llama (model_type {config.get('model_type')!r}, "
                            f"rope_scaling {config.get('rope_scaling')!r})")
    return config


def word_vocabulary(model_path: Path) -> Tuple[List[str], List[int], Dict[str, int]]:
    """(pieces, llama.cpp token types, special ids) of a word-level bench tokenizer."""
    tokenizer = json.loads((model_path / "tokenizer.json").read_text())
    model = tokenizer.get("model", {})
    if model.get("type") != "WordLevel":
        raise NotExportable(f"{model_path}'s tokenizer is {model.get('type')!r}, not the bench's word-level one; "
                            "use the model's own GGUF")
    by_id = {i: token for token, i in model["vocab"].items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise NotExportable(f"{model_path}'s vocabulary has gaps")
    specials = {"<unk>": 0, "<s>": 0, "</s>": 0}
    specials = {token: i for i, token in by_id.items() if token in specials}
    pieces, types = [], []
    for i in range(len(by_id)):
        token = by_id[i]
        if token in specials:
            pieces.append(token)
            types.append(UNKNOWN_TOKEN if token == "<unk>" else CONTROL_TOKEN)
        else:
            pieces.append("\u2581" + token)  # SentencePiece's word-start mark: decodes as " word"
            types.append(NORMAL_TOKEN)
    return pieces, types, specials


def _tensors(model_path: Path) -> Iterator[Tuple[str, Callable[[], np.ndarray], Tuple[int, ...]]]:
    """(Hugging Face name, loader of the float32 array, shape) for every tensor, lazily."""
    from safetensors import safe_open

    def loader(shard: Path, name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            with safe_open(str(shard), framework="pt") as f:
                return f.get_tensor(name).float().numpy()
        return load

    for shard in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                yield name, loader(shard, name), tuple(f.get_slice(name).get_shape())


def export_gguf(model_path: Path, out_path: Path, qtype: str = "q4_0",
                progress: Callable[[str], None] = lambda line: None) -> Path:
    """Write ``out_path`` (GGUF: matrices in ``qtype``, norms in F32); reuse it if it is
    newer than the checkpoint's config."""
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quant_shape_to_byte_shape, quantize

    if qtype not in TYPES:
        raise NotExportable(f"GGUF type {qtype!r}: this exporter writes {', '.join(TYPES)}")
    model_path, out_path = Path(model_path), Path(out_path)
    config = _config(model_path)
    pieces, types, specials = word_vocabulary(model_path)
    if out_path.is_file() and out_path.stat().st_mtime > (model_path / "config.json").stat().st_mtime:
        return out_path
    matrix_type = GGMLQuantizationType.Q4_0 if qtype == "q4_0" else GGMLQuantizationType.F32
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads

    writer = GGUFWriter(None, "llama")
    writer.add_name(model_path.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_0 if qtype == "q4_0" else LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * len(pieces))
    writer.add_token_types(types)
    writer.add_bos_token_id(specials.get("<s>", 1))
    writer.add_eos_token_id(specials.get("</s>", 2))
    writer.add_unk_token_id(specials.get("<unk>", 0))
    writer.add_add_bos_token(False)  # the bench sends token ids, already as the server would

    tensors = list(_tensors(model_path))
    plan = []
    for name, load, shape in tensors:
        kind = matrix_type if len(shape) == 2 else GGMLQuantizationType.F32
        byte_shape = quant_shape_to_byte_shape(shape, kind) if kind != GGMLQuantizationType.F32 else shape
        itemsize = 1 if kind != GGMLQuantizationType.F32 else 4
        writer.add_tensor_info(gguf_name(name), byte_shape, np.dtype(np.uint8 if itemsize == 1 else np.float32),
                               int(np.prod(byte_shape)) * itemsize, raw_dtype=kind)
        plan.append((name, load, kind))
    partial = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(partial)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for number, (name, load, kind) in enumerate(plan, start=1):
        value = load()
        if name.endswith("self_attn.q_proj.weight"):
            value = permute_rope(value, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            value = permute_rope(value, kv_heads)
        writer.write_tensor_data(quantize(value, kind))
        if number % 50 == 0 or number == len(plan):
            progress(f"  GGUF {qtype}: {number}/{len(plan)} tensors")
    writer.close()
    os.replace(partial, out_path)
    return out_path
