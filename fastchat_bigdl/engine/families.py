"""Decoder families the lean runner serves, each a small description of how it differs
from Llama (after gpt-fast: one forward, a description per model), read from the model's
config and modules, never a copy of the forward.

What the descriptions say today:
- Llama 1/2/3 and SmolLM: the reference (RoPE plain or linearly scaled);
- Mistral: every layer attends over a sliding window of ``config.sliding_window`` keys;
- Qwen2/2.5: biases on q/k/v (the low-bit kernels add a module's bias, so the forward
  needs nothing more); its optional sliding-window layers are not covered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

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
    sliding_window: Callable[[object], Optional[int]] = _no_window  # keys every layer sees, None: all


FAMILIES: Dict[str, Family] = {
    "llama": Family("Llama"),
    "mistral": Family("Mistral", sliding_window=_every_layer_window),
    "qwen2": Family("Qwen2", sliding_window=_qwen2_window),
}


def family_of(config) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise NotCovered(f"model type {config.model_type} (covered: {', '.join(sorted(FAMILIES))})")
    return family


def rope_of(model) -> Rope:
    """The model's rotary embedding as transformers computed it: one module per model
    (transformers 4.45+: its ``rope_type`` says how it is scaled, folded into ``inv_freq``)
    or one per attention module (older: the class says)."""
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None:
        return _attention_rope(model.model.layers[0].self_attn.rotary_emb)
    kind = getattr(rotary, "rope_type", "default")
    if kind not in STATIC_ROPE_TYPES:  # dynamic, longrope: frequencies change with the length
        raise NotCovered(f"RoPE scaling {kind!r}")
    return Rope(rotary.inv_freq, 1.0, float(getattr(rotary, "attention_scaling", 1.0)))


STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _attention_rope(rotary) -> Rope:
    name = type(rotary).__name__
    if name.endswith("LinearScalingRotaryEmbedding"):
        return Rope(rotary.inv_freq, float(rotary.scaling_factor))
    if name.endswith("RotaryEmbedding") and not any(kind in name for kind in ("Dynamic", "Scaling", "YaRN")):
        return Rope(rotary.inv_freq)
    raise NotCovered(f"RoPE variant {name}")
