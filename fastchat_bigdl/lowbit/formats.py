"""Which low-bit formats run on which device, checked before anything is loaded.

The library lists ~30 formats (``ggml_tensor_qtype``) but implements the matmul of only
some of them on each device. On CPU the others convert without complaint and then fail
at the first request ("NF3, NF4, FP4 and FP8 quantization are currently not supported
on CPU", "FP16Linear only works for Intel GPUs") or abort the whole process inside ggml
(GGML_ASSERT: mixed_fp4/8, the k-quants, fp6, gguf_iq1_m). Measured with one request per
format on ipex-llm 2.2.0 and bigdl-llm 2.4.0; ``tests/test_formats.py`` serves a request
with every format listed here, so the list cannot drift from the library.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List

from fastchat_bigdl.lowbit.backend import LowBitBackend

if TYPE_CHECKING:
    import torch

# The ggml formats with a CPU kernel, plus bf16 (native torch matmul; needs a bf16 model).
CPU_FORMATS = ("sym_int4", "asym_int4", "sym_int5", "asym_int5", "sym_int8", "woq_int4", "bf16")
# Never usable through from_pretrained: NPU-only formats, and formats that need an
# importance matrix (the library asks for one at conversion).
NOT_LOADABLE = ("sym_int4_rtn", "sym_int8_rtn", "asym_int4_rtn",
                "gguf_iq2_xxs", "gguf_iq2_xs", "gguf_iq1_s", "gguf_iq1_m")


class UnsupportedFormat(ValueError):
    """This low-bit format cannot run on the chosen device; the message lists those that can."""


def formats_for(backend: LowBitBackend, device: str) -> List[str]:
    """The formats ``backend`` can serve on ``device``, in the library's order."""
    if device == "cpu":
        return [name for name in backend.qtypes if name in CPU_FORMATS]
    return [name for name in backend.qtypes if name not in NOT_LOADABLE]


def check_format(backend: LowBitBackend, device: str, low_bit: str) -> None:
    if low_bit in formats_for(backend, device):
        return
    known = "" if low_bit in backend.qtypes else f" ({backend} has no format {low_bit!r})"
    raise UnsupportedFormat(
        f"--low-bit {low_bit} does not run on {device} with {backend}{known}; "
        f"formats that do: {', '.join(formats_for(backend, device))}"
    )


def load_dtype(device: str, low_bit: str) -> torch.dtype:
    """dtype for the layers the library leaves unquantised (norms, embeddings): fp16 on
    Intel GPU; on CPU fp32, or bf16 for the bf16 format, whose linears need bf16 inputs."""
    import torch

    if device == "xpu":
        return torch.float16
    return torch.bfloat16 if low_bit == "bf16" else torch.float32


def formats_help(backend: LowBitBackend) -> str:
    return (f"cpu: {', '.join(formats_for(backend, 'cpu'))}; "
            f"xpu: {', '.join(formats_for(backend, 'xpu'))}")
