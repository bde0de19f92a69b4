"""Hugging Face Llama checkpoints as GGUF files, so llama.cpp runs the very weights this
package serves.

``write_gguf`` is the one GGUF writer: the reverse of ``lowbit.gguf_checkpoint`` (same
tensor names, Q/K rows permuted back to llama.cpp's RoPE layout), the architecture
metadata, and the tensors streamed one at a time (a 7B model never sits in memory), the
matrices quantized with ``gguf``'s own quantizers and the norms kept in F32. The
vocabulary is the caller's: a function that adds the tokenizer's keys to the writer.
``write_gguf`` refuses nothing about the config; callers decide what they write (the
tests' tiny models go through it with their byte-level BPE vocabulary, as
``tests/helpers.write_tiny_gguf``).

``export_gguf`` is the bench's use of it, for plain Llama checkpoints only. Q4_0 is
llama.cpp's twin of ipex-llm's ``sym_int4``: the same round-to-nearest 4-bit values with
one fp16 scale per block (blocks of 32 weights there, 64 in ipex-llm's CPU layout: 4.5
and 4.25 bits a weight), quantized from the same bf16/fp32 weights. Only the bench's
word-level tokenizer is exported (one token per word, as a SentencePiece vocabulary of
``▁word`` pieces, so llama.cpp's output decodes to the same words); the bench hands
llama.cpp token ids, never text to tokenize. Real models come with GGUFs of their own
(or llama.cpp's ``convert_hf_to_gguf.py``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Tuple

import numpy as np

from fastchat_bigdl.lowbit.gguf_checkpoint import ARCHITECTURES, CONTROL_TOKEN, GLOBAL_NAMES, ROPE_FACTOR_TENSORS

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFWriter

NORMAL_TOKEN, UNKNOWN_TOKEN = 1, 2  # llama.cpp token types
TYPES = ("q4_0", "f32")
HF_TO_GGUF = {hf: gguf for gguf, hf in GLOBAL_NAMES.items()}
Progress = Callable[[str], None]
AddVocabulary = Callable[["GGUFWriter"], None]  # adds the tokenizer.* keys
# (Hugging Face name, loader of the float32 array, shape) of one checkpoint tensor
LazyTensor = Tuple[str, Callable[[], np.ndarray], Tuple[int, ...]]


class NotExportable(ValueError):
    """This checkpoint is not one the exporter writes (the message says why)."""


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face Q/K rows (RoPE on the two halves of a head) in llama.cpp's order
    (RoPE on adjacent pairs); ``gguf_checkpoint.unpermute_rope`` undoes it."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    if hf_name in ROPE_FACTOR_TENSORS:  # llama.cpp's own name already
        return hf_name
    layout = ARCHITECTURES.get(arch, ARCHITECTURES["llama"])
    layer_names = {hf: gguf for gguf, hf in layout.block_names.items()}
    parts = hf_name.split(".")  # model.layers.N.<module path>.weight|bias
    module = ".".join(parts[3:-1])
    if (len(parts) < 5 or parts[:2] != ["model", "layers"] or module not in layer_names
            or parts[-1] not in ("weight", "bias")):
        raise NotExportable(f"tensor {hf_name!r} has no place in a llama.cpp {arch}")
    return f"blk.{parts[2]}.{layer_names[module]}.{parts[-1]}"


def plain_llama_config(model_path: Path) -> dict:
    """The checkpoint's config, refused unless it is a plain Llama (the bench's models)."""
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


def add_word_vocabulary(writer: GGUFWriter, pieces: List[str], types: List[int],
                        specials: Dict[str, int]) -> None:
    """The bench's ``word_vocabulary`` as a llama.cpp SentencePiece ("llama") tokenizer."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * len(pieces))
    writer.add_token_types(types)
    writer.add_bos_token_id(specials.get("<s>", 1))
    writer.add_eos_token_id(specials.get("</s>", 2))
    writer.add_unk_token_id(specials.get("<unk>", 0))
    writer.add_add_bos_token(False)  # the bench sends token ids, already as the server would


def _hf_tensors(model_path: Path) -> Iterator[LazyTensor]:
    """Every weight of the checkpoint's safetensors shards, lazily (loaded when written)."""
    from safetensors import safe_open

    def loader(shard: Path, name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            with safe_open(str(shard), framework="pt") as f:
                return f.get_tensor(name).float().numpy()
        return load

    for shard in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):  # a buffer transformers 4.31 saves
                    continue
                yield name, loader(shard, name), tuple(f.get_slice(name).get_shape())


def _rope_factor_tensors(config: dict) -> Iterator[LazyTensor]:
    """Longrope's factors as llama.cpp stores them: two F32 tensors (Phi-3)."""
    scaling = config.get("rope_scaling") or {}
    for which in ("long", "short"):
        factors = scaling.get(f"{which}_factor")
        if factors:
            value = np.asarray(factors, dtype=np.float32)
            yield f"rope_factors_{which}.weight", (lambda v=value: v), value.shape


def _head_counts(config: dict) -> Tuple[int, int]:
    """(query heads, key/value heads) of a Hugging Face Llama config."""
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads


def add_architecture(writer: GGUFWriter, model_name: str, config: dict,
                     matrix_type: GGMLQuantizationType) -> None:
    """The general and ``<arch>.*`` keys llama.cpp reads for a Llama, from a Hugging Face config."""
    heads, kv_heads = _head_counts(config)
    writer.add_name(model_name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_rope_dimension_count(int(config.get("partial_rotary_factor", 1.0) * head_dim))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    if config.get("head_dim"):  # Qwen3, Gemma: not hidden / heads
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if config.get("model_type", "").startswith("gemma") or config.get("model_type") == "phi3":
        writer.add_sliding_window(config.get("sliding_window") or 0)  # 0: none (llama.cpp's Phi-3 rule)
    rope_scaling = config.get("rope_scaling") or {}
    if rope_scaling.get("type", rope_scaling.get("rope_type")) in ("longrope", "su"):
        writer.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
    if config.get("attn_logit_softcapping"):  # Gemma 2
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    file_type = _file_type(matrix_type)
    if file_type is not None:
        writer.add_file_type(file_type)


def _file_type(matrix_type: GGMLQuantizationType):
    """llama.cpp's file type for matrices in ``matrix_type`` (None: it names none, e.g. Q4_K)."""
    from gguf import GGMLQuantizationType, LlamaFileType

    if matrix_type == GGMLQuantizationType.F32:
        return LlamaFileType.ALL_F32
    return LlamaFileType.__members__.get(f"MOSTLY_{matrix_type.name}")


def _add_tensor_infos(writer: GGUFWriter, tensors: List[LazyTensor],
                      matrix_type: GGMLQuantizationType, arch: str) -> list:
    """Each tensor's GGUF name, type and shape, added to the header before any data is
    written; returns (Hugging Face name, loader, GGML type) in file order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    plan = []
    for name, load, shape in tensors:
        kind = matrix_type if len(shape) == 2 else GGMLQuantizationType.F32  # norms stay exact
        byte_shape = quant_shape_to_byte_shape(shape, kind)
        writer.add_tensor_info(gguf_name(name, arch), byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=kind)
        plan.append((name, load, kind))
    return plan


def _write_tensor_data(writer: GGUFWriter, plan: list, config: dict, progress: Progress,
                       label: str, layout) -> None:
    """Load, permute (Q/K, where the architecture's RoPE wants it), shift (Gemma's norms,
    stored as 1 + w) and quantize each tensor in turn: one tensor in memory at a time."""
    from gguf.quants import quantize

    heads, kv_heads = _head_counts(config)
    permuted_qk = layout.permuted_qk
    for number, (name, load, kind) in enumerate(plan, start=1):
        value = load()
        if layout.norm_shift and name.endswith("norm.weight"):
            value = value + np.float32(layout.norm_shift)
        if permuted_qk and name.endswith("self_attn.q_proj.weight"):
            value = permute_rope(value, heads)
        elif permuted_qk and name.endswith("self_attn.k_proj.weight"):
            value = permute_rope(value, kv_heads)
        writer.write_tensor_data(quantize(value, kind))
        if number % 50 == 0 or number == len(plan):
            progress(f"  GGUF {label}: {number}/{len(plan)} tensors")


def write_gguf(model_path: Path, out_path: Path, config: dict, add_vocabulary: AddVocabulary,
               matrix_type: str = "F32", arch: str = "llama",
               progress: Progress = lambda line: None) -> Path:
    """Write the checkpoint at ``model_path`` as the GGUF ``out_path``: ``config``'s
    architecture under ``arch``, the vocabulary ``add_vocabulary(writer)`` adds, matrices
    in ``matrix_type`` (a ``gguf.GGMLQuantizationType`` name: F32, Q8_0, Q4_0, ...) and
    norms in F32. Written to ``<out_path>.partial`` and renamed into place."""
    from gguf import GGMLQuantizationType, GGUFWriter

    model_path, out_path = Path(model_path), Path(out_path)
    kind = GGMLQuantizationType[matrix_type]
    writer = GGUFWriter(None, arch)
    add_architecture(writer, model_path.name, config, kind)
    add_vocabulary(writer)
    tensors = list(_hf_tensors(model_path)) + list(_rope_factor_tensors(config))
    plan = _add_tensor_infos(writer, tensors, kind, arch)
    partial = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(partial)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    layout = ARCHITECTURES.get(arch, ARCHITECTURES["llama"])  # files of other names: tests of refusals
    _write_tensor_data(writer, plan, config, progress, kind.name.lower(), layout)
    writer.close()
    os.replace(partial, out_path)
    return out_path


def export_gguf(model_path: Path, out_path: Path, qtype: str = "q4_0",
                progress: Progress = lambda line: None) -> Path:
    """Write the bench checkpoint ``model_path`` as ``out_path`` (GGUF: matrices in
    ``qtype``, norms in F32, its word-level vocabulary); reuse it if it is newer than the
    checkpoint's config. Refuses other types, non-plain-Llama configs and other tokenizers."""
    if qtype not in TYPES:
        raise NotExportable(f"GGUF type {qtype!r}: this exporter writes {', '.join(TYPES)}")
    model_path, out_path = Path(model_path), Path(out_path)
    config = plain_llama_config(model_path)
    vocabulary = word_vocabulary(model_path)
    if out_path.is_file() and out_path.stat().st_mtime > (model_path / "config.json").stat().st_mtime:
        return out_path
    return write_gguf(model_path, out_path, config, lambda writer: add_word_vocabulary(writer, *vocabulary),
                      qtype.upper(), progress=progress)
