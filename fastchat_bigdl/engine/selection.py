"""Which forward serves a loaded model: the lean runner where it covers the model
exactly, else the Hugging Face forward, with the reason in one line.

The runner is built from the modules the low-bit library left in the Hugging Face
model (no weight is copied or re-quantized); anything it does not reproduce exactly
(other architectures, dynamic RoPE scaling, formats without a direct CPU kernel, a GPU,
where the library's fused forward is the fast path) keeps the Hugging Face forward.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fastchat_bigdl.engine.kv_cache import KV_CACHE_DTYPES
from fastchat_bigdl.engine.families import Family, NotCovered, family_of, layer_windows, rope_of, rotary_rope
from fastchat_bigdl.engine.llama_runner import DECODE_ROWS, PREFILL_BLOCK, Layer, LlamaRunner, Rope, RunnerShape
from fastchat_bigdl.engine.prefill_recipe import PREFILL_RECIPES, apply_prefill_recipe
from fastchat_bigdl.lowbit.backend import LowBitBackend
from fastchat_bigdl.lowbit.kernels import LowBitMatmul, cpu_matmul

FORWARDS = ("auto", "lean", "hf")
DEFAULT_KV_CACHE_DTYPE = "bf16"  # half of fp32's bytes; the measured effect is in docs/performance.md
__all__ = ["NotCovered", "FORWARDS", "PREFILL_RECIPES", "KV_CACHE_DTYPES", "DEFAULT_KV_CACHE_DTYPE",
           "build_lean_runner", "choose_forward"]


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


ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def _norm(module, family: Family) -> Optional[torch.Tensor]:
    """An RMSNorm's weight as the runner applies it (Gemma's ``1 + w`` folded in once)."""
    if module is None:
        return None
    weight = module.weight.data
    return weight + family.norm_offset if family.norm_offset else weight


def compact_embeddings(module: torch.nn.Embedding) -> torch.Tensor:
    """The embedding table the runner reads: in bf16 where that holds every value exactly
    (a bf16 checkpoint loaded in fp32), halving its memory, else as loaded. The module
    then holds the bf16 table too (the fp32 copy is freed) and hands the rest of the
    Hugging Face forward fp32 rows, as before (it still serves embeddings requests)."""
    weight = module.weight.data
    compact = weight.to(torch.bfloat16)
    if not torch.equal(compact.float(), weight):
        return weight
    module.weight.data = compact
    module.register_forward_hook(_rows_in_fp32)
    return compact


def _rows_in_fp32(module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _layer(block, backend: LowBitBackend, index: int, family: Family, window: Optional[int]) -> Layer:
    attention, mlp = block.self_attn, block.mlp
    where = f"layer {index}"

    def kernel(module):
        return _matmul(module, backend, where)

    if hasattr(attention, "qkv_proj"):
        qkv = (kernel(attention.qkv_proj),)
    else:
        qkv = tuple(kernel(getattr(attention, name)) for name in ("q_proj", "k_proj", "v_proj"))
    if hasattr(mlp, "gate_up_proj"):
        mlp_kernels = {"gate_up": kernel(mlp.gate_up_proj)}
    else:
        mlp_kernels = {"gate": kernel(mlp.gate_proj), "up": kernel(mlp.up_proj)}
    sandwich = hasattr(block, "pre_feedforward_layernorm")  # Gemma: norms after attention and MLP too
    return Layer(
        input_norm=_norm(block.input_layernorm, family),
        post_norm=_norm(block.pre_feedforward_layernorm if sandwich else block.post_attention_layernorm, family),
        attn_out_norm=_norm(block.post_attention_layernorm, family) if sandwich else None,
        mlp_out_norm=_norm(getattr(block, "post_feedforward_layernorm", None), family),
        q_norm=_norm(getattr(attention, "q_norm", None), family),
        k_norm=_norm(getattr(attention, "k_norm", None), family),
        qkv=qkv, o=kernel(attention.o_proj), down=kernel(mlp.down_proj), **mlp_kernels,
        window=window, rope=1 if family.local_rope and window else 0,
    )


def _activation(config) -> str:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if name not in ACTIVATIONS:
        raise NotCovered(f"activation {name}")
    return ACTIVATIONS[name]


def _shape(model, layers: int, rope: Rope, family: Family) -> RunnerShape:
    config = model.config
    heads = config.num_attention_heads
    scalar = getattr(config, "query_pre_attn_scalar", None)  # Gemma: scores scaled by its -1/2 power
    return RunnerShape(
        layers=layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        norm_eps=float(config.rms_norm_eps),
        context=int(config.max_position_embeddings * rope.position_scale),
        activation=_activation(config),
        # the value transformers multiplies by: sqrt(hidden) rounded to the weights' dtype (fp32)
        embed_scale=float(torch.tensor(config.hidden_size ** 0.5)) if family.scales_embeddings else 1.0,
        attention_scale=float(scalar) ** -0.5 if scalar else None,
        attention_softcap=getattr(config, "attn_logit_softcapping", None),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
    )


def _ropes(model, family: Family) -> List[Rope]:
    ropes = [rope_of(model)]
    if family.local_rope:
        ropes.append(rotary_rope(getattr(model.model, family.local_rope)))
    return ropes


def build_lean_runner(model, backend: LowBitBackend, device: str, prefill_recipe: str = "auto",
                      kv_cache_dtype: str = DEFAULT_KV_CACHE_DTYPE) -> LlamaRunner:
    """The runner for ``model`` or NotCovered; its prefill blocks multiply as
    ``prefill_recipe`` says (``auto``: the fastest measured, see ``prefill_recipe``), its
    KV caches hold ``kv_cache_dtype`` (one of ``KV_CACHE_DTYPES``)."""
    if not str(device).startswith("cpu"):
        raise NotCovered(f"device {device} (the library's fused forward serves it)")
    config = model.config
    family = family_of(config)
    if model.model.embed_tokens.weight.dtype != torch.float32:
        raise NotCovered(f"weights kept in {model.model.embed_tokens.weight.dtype}")
    windows = layer_windows(config, family)
    layers = [_layer(block, backend, index, family, windows[index])
              for index, block in enumerate(model.model.layers)]
    ropes = _ropes(model, family)
    shape = _shape(model, len(layers), ropes[0], family)
    lm_head = _matmul(model.lm_head, backend, "lm_head")
    recipe_line = apply_prefill_recipe(layers, lm_head, backend, prefill_recipe)
    probe = layers[0].o
    if not prefill_rows_are_independent(probe):
        raise NotCovered("a low-bit kernel whose result for a row depends on the other rows")
    return LlamaRunner(shape, compact_embeddings(model.model.embed_tokens), layers, _norm(model.model.norm, family),
                       lm_head, ropes, decode_rows=invariant_decode_rows(probe), prefill_line=recipe_line,
                       kv_dtype=KV_CACHE_DTYPES[kv_cache_dtype])


def choose_forward(model, backend: LowBitBackend, device: str, wanted: str = "auto",
                   prefill_recipe: str = "auto",
                   kv_cache_dtype: str = DEFAULT_KV_CACHE_DTYPE) -> Tuple[Optional[LlamaRunner], str]:
    """(runner or None for the Hugging Face forward, a line saying which serves and why,
    and for the runner how its prefill blocks multiply and what its KV caches hold)."""
    if wanted not in FORWARDS:
        raise ValueError(f"unknown forward {wanted!r}; choose one of {', '.join(FORWARDS)}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    if wanted == "hf":
        return None, "decode path: Hugging Face forward (--forward hf)"
    try:
        runner = build_lean_runner(model, backend, device, prefill_recipe, kv_cache_dtype)
    except NotCovered as exc:
        if wanted == "lean":
            raise
        return None, f"decode path: Hugging Face forward (the lean runner does not cover {exc})"
    return runner, (f"decode path: lean {family_of(model.config).name} runner ({runner.shape.layers} layers, "
                    f"{runner.shape.heads}/{runner.shape.kv_heads} heads, low-bit kernels called directly); "
                    f"{runner.prefill_line}; KV cache {kv_cache_dtype}, "
                    f"{runner.kv_bytes_per_position() / 1024:.1f} KiB a position")
