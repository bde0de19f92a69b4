"""Direct calls into the low-bit library's CPU matmul kernel, for the decode engine.

The library's ``LowBitLinear.forward`` wraps one ggml call in per-call Python (training
checks, device lookups, an import, ctypes argument building, a threshold test): about
as long as the kernel itself for the small projections of a 135 M model, times 151 calls
a token. ``LowBitMatmul`` keeps the kernel call and builds its arguments once.

It also always takes the same kernel: on AVX-512 server CPUs other than Sapphire Rapids
the library switches sym_int4 to dequantize-then-GEMM above a row threshold
(``BIGDL_LLM_LINEAR_THRESHOLD``). The ggml kernel itself rounds a row one way in calls
of fewer than 32 rows and another way inside the 16-row tiles of larger calls (measured
on a Xeon with AMX); ``engine.llama_runner`` keeps each position on one of the two.
"""
from __future__ import annotations

import ctypes
from typing import Callable, Dict, Optional, Tuple

import torch

from fastchat_bigdl.lowbit.backend import LowBitBackend

# Formats whose CPU forward is exactly one ggml_compute_forward_mul_mat_q_fp32 call.
GGML_CPU_FORMATS = ("sym_int4", "asym_int4", "sym_int5", "asym_int5", "sym_int8")


class LowBitMatmul:
    """``y = x @ W.T (+ bias)`` for one converted linear layer; ``x`` is fp32 [rows, in]."""

    def __init__(self, module: torch.nn.Module, kernel: Callable):
        self.module = module  # keeps the packed weight (and the pointer below) alive
        self.in_features = int(module.in_len)
        self.out_features = int(module.out_len)
        self.qtype = int(module.qtype)
        out_len, in_len = tuple(module.weight_shape)
        self._kernel = kernel
        self._weight_ne = (ctypes.c_int64 * 2)(in_len, out_len)
        self._weight_ptr = ctypes.c_void_p(module.weight.data.data_ptr())
        self._rows_ne: Dict[int, ctypes.Array] = {}
        self.bias = module.bias.data if module.bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if not x.is_contiguous():
            x = x.contiguous()
        out = torch.empty(rows, self.out_features, dtype=torch.float32)
        ne = self._rows_ne.get(rows)
        if ne is None:
            ne = self._rows_ne[rows] = (ctypes.c_int64 * 2)(self.in_features, rows)
        self._kernel(self._weight_ne, self._weight_ptr, self.qtype, ne,
                     ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()))
        if self.bias is not None:
            out += self.bias
        return out


def cpu_matmul(module: torch.nn.Module, backend: LowBitBackend) -> Tuple[Optional[LowBitMatmul], str]:
    """(a direct kernel call for ``module``, "") or (None, why it cannot have one)."""
    linear_types = backend.low_bit_linear_types()
    if type(module) is not linear_types[0]:  # LowBitLinear itself, not an FP16/BF16 variant
        return None, f"{type(module).__name__} is not the library's low-bit linear layer"
    names = {qtype: name for name, qtype in backend.qtypes.items()}
    name = names.get(int(module.qtype), str(module.qtype))
    if name not in GGML_CPU_FORMATS:
        return None, f"format {name} has no direct CPU kernel here"
    if module.weight.data.device.type != "cpu":
        return None, "weights are not on the CPU"
    if getattr(module, "act_order", False) or getattr(module, "mp_group", None) is not None:
        return None, "act-order or tensor-parallel layers"
    bindings = backend._import("ggml.model.llama.llama_cpp")
    # The ctypes function itself, not the module's Python wrapper around it.
    kernel = getattr(getattr(bindings, "_lib", None), "ggml_compute_forward_mul_mat_q_fp32", None) \
        or bindings.ggml_compute_forward_mul_mat_q_fp32
    return LowBitMatmul(module, kernel), ""
