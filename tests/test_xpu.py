"""The Intel GPU path, with torch.xpu and IPEX mocked (no Intel GPU exists here)."""
import sys
import types

import pytest
import torch

from fastchat_bigdl.lowbit.devices import DeviceUnavailable, place_model, prepare_device
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


def test_xpu_model_goes_to_xpu_in_fp16_and_cache_is_emptied(fake_xpu, mocker):
    prepare_device("xpu")
    model = mocker.MagicMock(name="model")
    placed = place_model(model, "xpu")
    model.half.assert_called_once_with()
    model.half.return_value.to.assert_called_once_with("xpu")
    assert placed is model.half.return_value.to.return_value
    fake_xpu.empty_cache.assert_called()
    assert load_dtype("xpu", "sym_int4") is torch.float16 and load_dtype("cpu", "sym_int4") is torch.float32
    assert load_dtype("cpu", "bf16") is torch.bfloat16  # its linears need bf16 inputs


def test_worker_on_xpu_loads_low_bit_fp16_and_generates_on_xpu(fake_xpu, mocker, tiny_llama):
    from transformers import AutoTokenizer

    import fastchat_bigdl
    from fastchat_bigdl.worker.bigdl_worker import BigDLModelWorker

    model = mocker.MagicMock(name="low-bit model")
    model.config.max_position_embeddings = 256
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    load = mocker.patch.object(fastchat_bigdl.bigdl_adapter, "load_model", return_value=(model, tokenizer))
    worker = BigDLModelWorker(
        "http://127.0.0.1:1", "http://127.0.0.1:2", "w", str(tiny_llama), None, 2,
        no_register=True, device="xpu", low_bit="sym_int4",
    )
    kwargs = load.call_args.args[1]
    assert kwargs["low_bit"] == "sym_int4" and kwargs["torch_dtype"] is torch.float16
    assert worker.model is model.half.return_value.to.return_value
    model.half.return_value.to.assert_called_once_with("xpu")

    stream = mocker.MagicMock(return_value=iter([{"text": "hi", "usage": {}, "finish_reason": "stop"}]))
    worker.generate_stream_func = stream
    out = worker.generate_gate({"prompt": "hello", "max_new_tokens": 4})
    assert out["text"] == "hi" and out["error_code"] == 0
    assert stream.call_args.args[3] == "xpu"  # inputs are created on the xpu device
