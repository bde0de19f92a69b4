"""Device preparation for low-bit models: CPU, or Intel GPU (``xpu``) through IPEX."""
from __future__ import annotations

import gc
import os

import torch

SUPPORTED_DEVICES = ("cpu", "xpu")

XPU_INSTALL_HINT = (
    "install the Intel GPU stack: pip install 'fastchat-bigdl[xpu]' "
    "--extra-index-url https://pytorch-extension.intel.com/release-whl/stable/xpu/us/"
)


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be used; the message says why and how to fix it."""


def prepare_device(device: str) -> None:
    """Fail early, with one clear line, if ``device`` cannot run a low-bit model."""
    if device == "cpu":
        return
    if device != "xpu":
        raise DeviceUnavailable(
            f"--bigdl_load runs on --device cpu or xpu, not {device!r}"
        )
    try:
        # Imported for its side effect: it registers the xpu backend with torch.
        import intel_extension_for_pytorch  # noqa: F401
    except ImportError as exc:
        raise DeviceUnavailable(
            f"--device xpu needs intel_extension_for_pytorch ({exc}); {XPU_INSTALL_HINT}"
        ) from None
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        raise DeviceUnavailable(
            "--device xpu: no Intel GPU is visible to PyTorch (torch.xpu.is_available() "
            "is False). Check the GPU driver and the oneAPI runtime "
            "(source /opt/intel/oneapi/setvars.sh), or use --device cpu."
        )


def use_physical_cores() -> int:
    """One torch thread per physical core (hyperthreads only contend for the same
    units on these memory-bound kernels), unless the user chose with OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def place_model(model, device: str):
    """Move a converted model to its device (fp16 on Intel GPU)."""
    if device == "xpu":
        model = model.half().to("xpu")
        empty_cache(device)
    return model


def empty_cache(device: str) -> None:
    gc.collect()
    if device == "xpu":
        torch.xpu.empty_cache()
