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

from fastchat_bigdl.engine.families import NotCovered, family_of, rope_of
from fastchat_bigdl.engine.llama_runner import DECODE_ROWS, PREFILL_BLOCK, LayerWeights, LlamaRunner, Rope, RunnerShape
from fastchat_bigdl.lowbit.backend import LowBitBackend
from fastchat_bigdl.lowbit.kernels import LowBitMatmul, cpu_matmul

FORWARDS = ("auto", "lean", "hf")
__all__ = ["NotCovered", "FORWARDS", "build_lean_runner", "choose_forward"]


def _matmul(module, backend, where: str):
    kernel, why = cpu_matmul(module, backend)
    if kernel is None:
        raise NotCovered(f"{where}: {why}")
    return kernel


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


def _layer_weights(block, backend: LowBitBackend, index: int) -> LayerWeights:
    attention, mlp = block.self_attn, block.mlp
    where = f"layer {index}"
    if hasattr(attention, "qkv_proj"):
        qkv = (_matmul(attention.qkv_proj, backend, where),)
    else:
        qkv = tuple(_matmul(getattr(attention, name), backend, where) for name in ("q_proj", "k_proj", "v_proj"))
    return LayerWeights(
        input_norm=block.input_layernorm.weight.data,
        post_norm=block.post_attention_layernorm.weight.data,
        qkv=qkv,
        o=_matmul(attention.o_proj, backend, where),
        gate=_matmul(mlp.gate_proj, backend, where),
        up=_matmul(mlp.up_proj, backend, where),
        down=_matmul(mlp.down_proj, backend, where),
    )


def _shape(model, layers: int, rope: Rope, window: Optional[int]) -> RunnerShape:
    config = model.config
    heads = config.num_attention_heads
    return RunnerShape(
        layers=layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        norm_eps=float(model.model.layers[0].input_layernorm.variance_epsilon),
        context=int(config.max_position_embeddings * rope.position_scale),
        sliding_window=window,
    )


def build_lean_runner(model, backend: LowBitBackend, device: str) -> LlamaRunner:
    """The runner for ``model`` or NotCovered."""
    if not str(device).startswith("cpu"):
        raise NotCovered(f"device {device} (the library's fused forward serves it)")
    config = model.config
    family = family_of(config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise NotCovered(f"activation {config.hidden_act}")
    if model.model.embed_tokens.weight.dtype != torch.float32:
        raise NotCovered(f"weights kept in {model.model.embed_tokens.weight.dtype}")
    layers = [_layer_weights(block, backend, index) for index, block in enumerate(model.model.layers)]
    rope = rope_of(model)
    shape = _shape(model, len(layers), rope, family.sliding_window(config))
    probe = layers[0].o
    if not prefill_rows_are_independent(probe):
        raise NotCovered("a low-bit kernel whose result for a row depends on the other rows")
    return LlamaRunner(shape, model.model.embed_tokens.weight.data, layers, model.model.norm.weight.data,
                       _matmul(model.lm_head, backend, "lm_head"), rope, decode_rows=invariant_decode_rows(probe))


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
    return runner, (f"decode path: lean {family_of(model.config).name} runner ({runner.shape.layers} layers, "
                    f"{runner.shape.heads}/{runner.shape.kv_heads} heads, low-bit kernels called directly)")
