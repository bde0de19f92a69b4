"""How the runner's prefill blocks multiply by the low-bit weights, chosen by measurement.

The library's int4 kernel is fast for a few rows, but on some CPUs its cost grows
linearly with the rows (measured on AMD EPYC: 64 rows of a 2048x5632 linear 37-42 ms,
against 2.6-3.1 ms for a bf16 GEMM), so a prompt costs as many weight passes as it has
tokens. The alternative recipes dequantize the layer's weight (a torch unpack of the
library's storage, checked equal to the library's own dequantizer) and run one dense
GEMM in bf16 or fp32. At start-up one prefill block of the model's widest layer is timed
each way and the fastest is kept for every ``sym_int4`` layer, unless the kernel is
within ``MARGIN`` of it (a close call would flip between starts). Every prompt position
is always computed by the same recipe, in a call of the same shape, so greedy output
stays independent of batching, prompt splits and prefix reuse.
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, Optional

import torch

from fastchat_bigdl.engine.llama_runner import PREFILL_BLOCK, Layer
from fastchat_bigdl.lowbit.backend import LowBitBackend
from fastchat_bigdl.lowbit.kernels import DequantizedGemm, LowBitMatmul, dequantize_sym_int4, library_dequantize

RECIPES = {"kernel": None, "bf16": torch.bfloat16, "fp32": torch.float32}
PREFILL_RECIPES = ("auto", *RECIPES)
NAMES = {"kernel": "the library's low-bit kernel", "bf16": "dequantize + bf16 GEMM", "fp32": "dequantize + fp32 GEMM"}
MARGIN = 1.15  # another recipe replaces the kernel only when this much faster
REPEATS = 3


def _matmuls(layer: Layer) -> Iterable[LowBitMatmul]:
    yield from layer.qkv
    for m in (layer.o, layer.down, layer.gate, layer.up, layer.gate_up):
        if m is not None:
            yield m


def _milliseconds(call, x: torch.Tensor) -> float:
    call(x)  # warm-up (oneDNN picks its kernel on the first call)
    start = time.perf_counter()
    for _ in range(REPEATS):
        call(x)
    return (time.perf_counter() - start) / REPEATS * 1e3


def _unpackable(matmul: LowBitMatmul, backend: LowBitBackend) -> bool:
    """Whether the torch unpack gives exactly what the library's dequantizer gives (a
    library storing sym_int4 otherwise keeps its kernel)."""
    if matmul.qtype != backend.qtypes.get("sym_int4"):
        return False
    try:
        return torch.equal(dequantize_sym_int4(matmul), library_dequantize(matmul, backend))
    except (RuntimeError, ValueError, AttributeError):  # another layout or no dequantizer
        return False


def measure(probe: LowBitMatmul) -> Dict[str, float]:
    """Milliseconds for one prefill block of ``probe`` by each recipe."""
    x = torch.randn(PREFILL_BLOCK, probe.in_features, generator=torch.Generator().manual_seed(2))
    return {name: _milliseconds(probe.kernel if dtype is None else DequantizedGemm(probe, dtype), x)
            for name, dtype in RECIPES.items()}


def choose(times: Dict[str, float]) -> str:
    best = min(times, key=times.get)
    return "kernel" if best != "kernel" and times["kernel"] < MARGIN * times[best] else best


def apply_prefill_recipe(layers, lm_head: LowBitMatmul, backend: LowBitBackend, wanted: str = "auto") -> str:
    """Set every ``sym_int4`` matmul's block recipe; returns a line saying which and why."""
    if wanted not in PREFILL_RECIPES:
        raise ValueError(f"unknown prefill recipe {wanted!r}; choose one of {', '.join(PREFILL_RECIPES)}")
    probe = max(_matmuls(layers[0]), key=lambda m: m.in_features * m.out_features)
    if wanted == "kernel" or not _unpackable(probe, backend):
        why = "asked for" if wanted == "kernel" else "the only one for this format"
        return f"prefill blocks: {NAMES['kernel']} ({why})"
    times: Optional[Dict[str, float]] = None
    if wanted == "auto":
        times = measure(probe)
        wanted = choose(times)
    dtype = RECIPES[wanted]
    for matmul in [m for layer in layers for m in _matmuls(layer)] + [lm_head]:
        if dtype is not None and matmul.qtype == probe.qtype:
            matmul.block_recipe = DequantizedGemm(matmul, dtype)
    if times is None:
        return f"prefill blocks: {NAMES[wanted]} (asked for)"
    shape = f"{PREFILL_BLOCK} rows of the {probe.in_features}x{probe.out_features} layer"
    measured = ", ".join(f"{NAMES[n]} {t:.1f} ms" for n, t in times.items())
    return f"prefill blocks: {NAMES[wanted]} (measured, {shape}: {measured})"
