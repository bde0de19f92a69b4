"""The Intel GPU path, with torch.xpu and IPEX mocked (no Intel GPU exists here)."""
import sys
import types

import pytest
import torch

from fastchat_bigdl.lowbit.devices import DeviceUnavailable, prepare_device
from fastchat_bigdl.lowbit.formats import load_dtype


@pytest.fixture
def fake_ipex(monkeypatch):
    module = types.ModuleType("intel_extension_for_pytorch")
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", module)
    return module


@pytest.fixture
def fake_xpu(mocker, fake_ipex):
    xpu = mocker.MagicMock(name="torch.xpu")
    xpu.is_available.return_value = True
    mocker.patch.object(torch, "xpu", xpu, create=True)
    return xpu


def test_missing_ipex_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)  # import fails
    with pytest.raises(DeviceUnavailable) as err:
        prepare_device("xpu")
    assert "intel_extension_for_pytorch" in str(err.value) and "fastchat-bigdl[xpu]" in str(err.value)
    assert "\n" not in str(err.value)


def test_no_intel_gpu_is_one_clear_line(fake_xpu):
    fake_xpu.is_available.return_value = False
    with pytest.raises(DeviceUnavailable, match="no Intel GPU is visible.*--device cpu"):
        prepare_device("xpu")


def test_other_devices_are_refused():
    with pytest.raises(DeviceUnavailable, match="cpu or xpu"):
        prepare_device("cuda")


class DeviceModel(torch.nn.Module):
    """A converted model as the worker sees it: where it was moved, in which dtype."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.device_name = "cpu"

    @property
    def dtype(self):  # as transformers' models have it
        return self.weight.dtype

    def to(self, device):  # no Intel GPU here: record the move, keep the storage
        self.device_name = str(device)
        return self


def test_load_dtypes_are_the_ones_each_device_runs():
    assert load_dtype("xpu", "sym_int4") is torch.float16 and load_dtype("cpu", "sym_int4") is torch.float32
    assert load_dtype("cpu", "bf16") is torch.bfloat16  # its linears need bf16 inputs


def test_a_worker_on_xpu_serves_the_fp16_model_on_the_gpu_with_the_librarys_forward(fake_xpu, mocker, tiny_llama,
                                                                                       caplog):
    """What the user sees at start-up on an Intel GPU: the model in fp16 on xpu, the
    library's fused Hugging Face forward (the lean runner is CPU-only, and says why), a
    GPU-sized prefix cache, no KV budget from the host's memory, and device memory
    released after loading."""
    import fastchat_bigdl
    from transformers import AutoConfig, AutoTokenizer

    from fastchat_bigdl.worker.bigdl_worker import BigDLModelWorker

    model = DeviceModel(AutoConfig.from_pretrained(str(tiny_llama)))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    mocker.patch.object(fastchat_bigdl.register(), "load_model", return_value=(model, tokenizer))
    with caplog.at_level("INFO"):
        worker = BigDLModelWorker("http://127.0.0.1:1", "http://127.0.0.1:2", "w", str(tiny_llama), None, 2,
                                  no_register=True, device="xpu", low_bit="sym_int4", prefix_cache_mb=None)
    assert worker.model.device_name == "xpu" and worker.model.weight.dtype == torch.float16
    assert worker.runner is None and "Hugging Face forward" in worker.decode_path
    assert "device xpu" in worker.decode_path
    assert worker.prefix_cache.budget_bytes == 1 << 30 and "prefix cache: 1024 MiB" in caplog.text
    assert fake_xpu.empty_cache.called  # after moving the weights
    # the host's free memory says nothing of the GPU's: no KV budget unless one is given
    assert worker.engine.kv_budget is None and "KV budget: none by default on xpu" in caplog.text


def test_the_lean_runner_on_xpu_is_refused_with_the_reason(fake_xpu, mocker, tiny_llama):
    import fastchat_bigdl
    from transformers import AutoConfig, AutoTokenizer

    from fastchat_bigdl.engine.selection import NotCovered
    from fastchat_bigdl.worker.bigdl_worker import BigDLModelWorker

    model = DeviceModel(AutoConfig.from_pretrained(str(tiny_llama)))
    mocker.patch.object(fastchat_bigdl.register(), "load_model",
                        return_value=(model, AutoTokenizer.from_pretrained(str(tiny_llama))))
    with pytest.raises(NotCovered, match="device xpu"):
        BigDLModelWorker("http://127.0.0.1:1", "http://127.0.0.1:2", "w", str(tiny_llama), None, 2,
                         no_register=True, device="xpu", forward="lean")
