"""Decoder families the lean runner serves, each a small description of how it differs
from Llama (after gpt-fast: one forward, a description per model). What a model's config
or modules say for themselves is read from them, not described: fused q/k/v and
gate/up projections (Phi-3), q/k norms (Qwen3, Gemma 3), the norms around attention and
MLP (Gemma 2/3), partial rotary (Phi-4-mini), the activation, soft-capping and attention
scale (Gemma 2), per-layer sliding windows (``config.layer_types``, transformers 4.53).
A family says only what the config does not:

- Llama 1/2/3, SmolLM, Qwen3: nothing;
- Mistral, Phi-3/3.5/4-mini: every layer attends over ``config.sliding_window`` keys
  where the config sets one (their configs have no per-layer types);
- Qwen2/2.5: q/k/v biases need nothing (the low-bit kernels add a module's bias); on
  transformers without per-layer types its optional sliding-window layers are refused;
- Gemma 2/3: RMSNorm weights stored as ``w`` and applied as ``1 + w``, embeddings scaled
  by sqrt(hidden); Gemma 3's sliding-window layers have a RoPE of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from fastchat_bigdl.engine.llama_runner import Rope


class NotCovered(ValueError):
    """The lean runner does not reproduce this model; the message says why."""


def _no_window(config) -> Optional[int]:
    return None


def _every_layer_window(config) -> Optional[int]:
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def _qwen2_window(config) -> Optional[int]:
    if getattr(config, "use_sliding_window", False):
        raise NotCovered("Qwen2 sliding-window layers (use_sliding_window)")
    return None


@dataclass(frozen=True)
class Family:
    name: str
    default_window: Callable[[object], Optional[int]] = _no_window  # configs without layer_types
    norm_offset: float = 0.0  # Gemma: RMSNorm applies (norm_offset + w)
    scales_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden)
    local_rope: Optional[str] = None  # the model's module giving sliding-window layers their RoPE


GEMMA = dict(norm_offset=1.0, scales_embeddings=True)
FAMILIES: Dict[str, Family] = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral", default_window=_every_layer_window),
    "qwen2": Family("Qwen2", default_window=_qwen2_window),
    "qwen3": Family("Qwen3"),
    "phi3": Family("Phi-3", default_window=_every_layer_window),  # Phi-3-mini-4k: 2047 keys
    "gemma2": Family("Gemma 2", **GEMMA),
    "gemma3_text": Family("Gemma 3", local_rope="rotary_emb_local", **GEMMA),
}


def family_of(config) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise NotCovered(f"model type {config.model_type} (covered: {', '.join(sorted(FAMILIES))})")
    return family


def layer_windows(config, family: Family) -> Tuple[Optional[int], ...]:
    """Per layer, the keys a position sees (None: all before it)."""
    types = getattr(config, "layer_types", None)
    if types:
        window = getattr(config, "sliding_window", None)
        return tuple(int(window) if kind == "sliding_attention" and window else None for kind in types)
    return (family.default_window(config),) * config.num_hidden_layers


def rope_of(model) -> Rope:
    """The model's rotary embedding as transformers computed it: one module per model
    (transformers 4.45+: its ``rope_type`` says how it is scaled, folded into ``inv_freq``)
    or one per attention module (older: the class says)."""
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None:
        return _attention_rope(model.model.layers[0].self_attn.rotary_emb)
    return rotary_rope(rotary)


def rotary_rope(rotary) -> Rope:
    """A model-level rotary module (transformers 4.45+) as a ``Rope``."""
    kind = getattr(rotary, "rope_type", "default")
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if kind == "longrope":
        return _longrope(rotary, scaling)
    if kind not in STATIC_ROPE_TYPES:  # dynamic: frequencies change with the length
        raise NotCovered(f"RoPE scaling {kind!r}")
    return Rope(rotary.inv_freq, 1.0, scaling)


STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _longrope(rotary, scaling: float) -> Rope:
    """Phi-3's longrope: short factors up to the original context, long ones past it.
    transformers switches the whole forward once a sequence passes the original context;
    we switch per position (as vLLM does): identical below it, length-independent beyond."""
    config = rotary.config
    original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
    short = getattr(rotary, "original_inv_freq", rotary.inv_freq)
    long_inv_freq, _ = rotary.rope_init_fn(config, short.device, seq_len=original + 1)
    return Rope(short, 1.0, scaling, long_inv_freq=long_inv_freq, long_from=int(original))


def _attention_rope(rotary) -> Rope:
    name = type(rotary).__name__
    if name.endswith("LinearScalingRotaryEmbedding"):
        return Rope(rotary.inv_freq, float(rotary.scaling_factor))
    if name.endswith("RotaryEmbedding") and not any(kind in name for kind in ("Dynamic", "Scaling", "YaRN")):
        return Rope(rotary.inv_freq)
    raise NotCovered(f"RoPE variant {name}")
