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


# Calls of at least this many rows are prefill blocks (decode calls have at most 16):
# they take the matmul's ``block_recipe`` when one is set.
BLOCK_ROWS = 32


class LowBitMatmul:
    """``y = x @ W.T (+ bias)`` for one converted linear layer; ``x`` is fp32 [rows, in].
    Calls of ``BLOCK_ROWS`` rows or more go through ``block_recipe`` when set (a prefill
    recipe measured faster on this CPU, e.g. ``DequantizedGemm``)."""

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
        self.block_recipe: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.block_recipe is not None and rows >= BLOCK_ROWS:
            return self.block_recipe(x)
        return self.kernel(x)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The library's kernel, whatever the rows."""
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


SYM_INT4_BLOCK = 64  # weights per block of the library's CPU sym_int4 storage


def dequantize_sym_int4(matmul: LowBitMatmul, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] of a ``sym_int4`` matmul in ``dtype``, unpacked in torch: the
    library stores ggml Q4_0 with 64-weight blocks, each an fp16 scale followed by 32 bytes
    of nibbles (low nibbles weights 0-31, high 32-63), a weight being (nibble - 8) * scale.
    Several times faster than the library's single-threaded dequantizer, and equal to it
    (``selection`` checks that on the model's own weights before using it)."""
    raw = matmul.module.weight.data
    blocks = raw.view(-1, 2 + SYM_INT4_BLOCK // 2)
    scale = blocks[:, :2].contiguous().view(torch.float16).to(dtype)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).to(torch.int8) - 8
    high = (nibbles >> 4).to(torch.int8) - 8
    return (torch.cat([low, high], dim=1).to(dtype) * scale).view(matmul.out_features, matmul.in_features)


def library_dequantize(matmul: LowBitMatmul, backend: LowBitBackend) -> torch.Tensor:
    """The weight [out, in] in fp32 as the library itself dequantizes it (the reference)."""
    low_bit_linear = backend._import("transformers.low_bit_linear")
    shape = (matmul.out_features, matmul.in_features)
    return low_bit_linear.ggml_convert_fp32(matmul.module.weight.data, shape, shape[0] * shape[1], matmul.qtype)


class DequantizedGemm:
    """A prefill-block recipe: the weight dequantized (once per call: nothing extra is kept
    in memory), then one dense GEMM in ``dtype`` (oneDNN: AVX-512-BF16 or AMX for bf16).
    A row's result depends only on that row and the call's fixed shape."""

    def __init__(self, matmul: LowBitMatmul, dtype: torch.dtype):
        self.matmul, self.dtype = matmul, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_sym_int4(self.matmul, self.dtype)
        out = torch.nn.functional.linear(x.to(self.dtype), weight).float()
        if self.matmul.bias is not None:
            out += self.matmul.bias
        return out
