"""Which forward serves a loaded model: the lean runner where it covers the model
exactly, else the Hugging Face forward, with the reason in one line.

The runner is built from the modules the low-bit library left in the Hugging Face
model (no weight is copied or re-quantized); anything it does not reproduce exactly
(other architectures, dynamic RoPE scaling, formats without a direct CPU kernel, a GPU,
where the library's fused forward is the fast path) keeps the Hugging Face forward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastchat_bigdl.engine.llama_runner import DECODE_ROWS, PREFILL_BLOCK, LayerWeights, LlamaRunner, RunnerShape
from fastchat_bigdl.lowbit.backend import LowBitBackend
from fastchat_bigdl.lowbit.kernels import LowBitMatmul, cpu_matmul

LLAMA_FAMILY = ("llama", "mistral")
FORWARDS = ("auto", "lean", "hf")


class NotCovered(ValueError):
    """The lean runner does not reproduce this model; the message says why."""


def _matmul(module, backend, where: str):
    kernel, why = cpu_matmul(module, backend)
    if kernel is None:
        raise NotCovered(f"{where}: {why}")
    return kernel


def _rope_of(attention) -> Tuple[torch.Tensor, float]:
    rotary = attention.rotary_emb
    name = type(rotary).__name__
    if name == "LlamaRotaryEmbedding" or name == "MistralRotaryEmbedding":
        return rotary.inv_freq, 1.0
    if name == "LlamaLinearScalingRotaryEmbedding":
        return rotary.inv_freq, float(rotary.scaling_factor)
    raise NotCovered(f"RoPE variant {name}")


def invariant_decode_rows(matmul: LowBitMatmul, limit: int = DECODE_ROWS) -> int:
    """The largest call size up to ``limit`` in which the kernel gives every row exactly
    what it gives that row alone (so batched decode steps round like single ones)."""
    x = torch.randn(limit, matmul.in_features, generator=torch.Generator().manual_seed(0))
    alone = torch.cat([matmul(x[i:i + 1]) for i in range(limit)])
    rows = limit
    while rows > 1 and not torch.equal(matmul(x[:rows]), alone[:rows]):
        rows //= 2
    return rows


def prefill_rows_are_independent(matmul: LowBitMatmul) -> bool:
    """A row's result in a full prefill block depends only on that row."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(PREFILL_BLOCK, matmul.in_features, generator=generator)
    b = torch.randn(PREFILL_BLOCK, matmul.in_features, generator=generator)
    b[7] = a[7]
    return torch.equal(matmul(a)[7], matmul(b)[7])


def build_lean_runner(model, backend: LowBitBackend, device: str) -> LlamaRunner:
    """The runner for ``model`` or NotCovered."""
    if not str(device).startswith("cpu"):
        raise NotCovered(f"device {device} (the library's fused forward serves it)")
    config = model.config
    if config.model_type not in LLAMA_FAMILY:
        raise NotCovered(f"model type {config.model_type}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise NotCovered(f"activation {config.hidden_act}")
    if model.model.embed_tokens.weight.dtype != torch.float32:
        raise NotCovered(f"weights kept in {model.model.embed_tokens.weight.dtype}")
    layers = []
    first_attention = model.model.layers[0].self_attn
    for index, block in enumerate(model.model.layers):
        attention, mlp = block.self_attn, block.mlp
        where = f"layer {index}"
        if hasattr(attention, "qkv_proj"):
            qkv = (_matmul(attention.qkv_proj, backend, where),)
        else:
            qkv = tuple(_matmul(getattr(attention, name), backend, where)
                        for name in ("q_proj", "k_proj", "v_proj"))
        layers.append(LayerWeights(
            input_norm=block.input_layernorm.weight.data,
            post_norm=block.post_attention_layernorm.weight.data,
            qkv=qkv,
            o=_matmul(attention.o_proj, backend, where),
            gate=_matmul(mlp.gate_proj, backend, where),
            up=_matmul(mlp.up_proj, backend, where),
            down=_matmul(mlp.down_proj, backend, where),
        ))
    inv_freq, position_scale = _rope_of(first_attention)
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    shape = RunnerShape(
        layers=len(layers),
        hidden=config.hidden_size,
        heads=first_attention.num_heads,
        kv_heads=first_attention.num_key_value_heads,
        head_dim=first_attention.head_dim,
        vocab=config.vocab_size,
        norm_eps=float(model.model.layers[0].input_layernorm.variance_epsilon),
        context=int(config.max_position_embeddings * position_scale),
        sliding_window=int(window) if window else None,
    )
    probe = layers[0].o
    if not prefill_rows_are_independent(probe):
        raise NotCovered("a low-bit kernel whose result for a row depends on the other rows")
    return LlamaRunner(shape, model.model.embed_tokens.weight.data, layers, model.model.norm.weight.data,
                       _matmul(model.lm_head, backend, "lm_head"), inv_freq, position_scale,
                       decode_rows=invariant_decode_rows(probe))


def choose_forward(model, backend: LowBitBackend, device: str, wanted: str = "auto") -> Tuple[Optional[LlamaRunner], str]:
    """(runner or None for the Hugging Face forward, a line saying which serves and why)."""
    if wanted not in FORWARDS:
        raise ValueError(f"unknown forward {wanted!r}; choose one of {', '.join(FORWARDS)}")
    if wanted == "hf":
        return None, "decode path: Hugging Face forward (--forward hf)"
    try:
        runner = build_lean_runner(model, backend, device)
    except NotCovered as exc:
        if wanted == "lean":
            raise
        return None, f"decode path: Hugging Face forward (the lean runner does not cover {exc})"
    return runner, (f"decode path: lean Llama runner ({runner.shape.layers} layers, "
                    f"{runner.shape.heads}/{runner.shape.kv_heads} heads, low-bit kernels called directly)")
