"""The low-bit cache: hit, miss, stale, corrupt, concurrent starts."""
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from fastchat_bigdl.lowbit.backend import resolve_backend
from fastchat_bigdl.lowbit.loader import load_low_bit_model
from fastchat_bigdl.lowbit.weights_cache import MANIFEST, LowBitCache
from helpers import build_tiny_llama

pytestmark = pytest.mark.backend


@pytest.fixture
def model(tmp_path):
    return build_tiny_llama(tmp_path / "cache-me-llama", hidden_size=64, layers=1)


def logits(model, ids=(5, 17, 42, 99)):
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits


def load(path, cache, mocker=None):
    spy = mocker.spy(resolve_backend().auto_model_class, "from_pretrained") if mocker else None
    m, _ = load_low_bit_model(str(path), torch_dtype=torch.float32, cache=cache)
    return m, (spy.call_count if spy else None)


def entries(cache):
    return [p for p in cache.root.iterdir() if not p.name.startswith(".")]


def test_miss_converts_and_saves_then_hit_skips_conversion_with_identical_output(model, tmp_path, mocker):
    cache = LowBitCache(tmp_path / "cache")
    first, conversions = load(model, cache, mocker)
    assert conversions == 1 and len(entries(cache)) == 1
    manifest = json.loads((entries(cache)[0] / MANIFEST).read_text())
    assert manifest["source"] == str(model) and manifest["files"]
    mocker.stopall()
    second, conversions = load(model, cache, mocker)
    assert conversions == 0
    assert torch.equal(logits(first), logits(second))
    types = resolve_backend().low_bit_linear_types()
    assert any(isinstance(m, types) for m in second.modules())


@pytest.mark.parametrize("kind", ["tied-embeddings", "qwen2-biases", "bf16-checkpoint"])
def test_cached_weights_reload_bit_identical_for_every_layout(tmp_path, kind):
    """Our own entry format (config + one safetensors file, read back onto a meta-device
    model the library converts shapes-only) gives the very model the conversion gave."""
    if kind == "tied-embeddings":
        path = build_tiny_llama(tmp_path / "tied", hidden_size=64, layers=1, tie_word_embeddings=True)
    elif kind == "qwen2-biases":
        pytest.importorskip("transformers.models.qwen2", reason="this transformers has no Qwen2")
        path = build_tiny_llama(tmp_path / "qwen2", hidden_size=64, layers=2, architecture="qwen2")
    else:
        path = build_tiny_llama(tmp_path / "bf16", hidden_size=64, layers=1)
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16).save_pretrained(path)
    cache = LowBitCache(tmp_path / "cache")
    first, _ = load(path, cache)
    second, _ = load(path, cache)
    assert torch.equal(logits(first), logits(second))
    assert {n: p.dtype for n, p in first.named_parameters()} == {n: p.dtype for n, p in second.named_parameters()}
    assert set(first.state_dict()) == set(second.state_dict())


def test_an_entry_the_library_would_build_differently_is_rebuilt(model, tmp_path, mocker, caplog):
    """Weights stored as one format under another format's name (a library change, a
    hand-copied entry): refused and rebuilt, never served as garbage."""
    from fastchat_bigdl.lowbit.converted_weights import LAYOUT_KEY, WEIGHTS
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    cache = LowBitCache(tmp_path / "cache")
    reference, _ = load(model, cache)
    entry = entries(cache)[0]
    with safe_open(str(entry / WEIGHTS), framework="pt") as f:
        layout = json.loads(f.metadata()[LAYOUT_KEY])
    for item in layout["low_bit"].values():
        item["qtype"] += 1
    save_file(load_file(str(entry / WEIGHTS)), str(entry / WEIGHTS), metadata={LAYOUT_KEY: json.dumps(layout)})
    manifest = json.loads((entry / MANIFEST).read_text())
    from fastchat_bigdl.lowbit.weights_cache import file_stamps
    manifest["files"] = file_stamps(entry, skip=MANIFEST)  # consistent stamps: only the content is wrong
    (entry / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        rebuilt, conversions = load(model, cache, mocker)
    assert conversions == 1 and "EntryMismatch" in caplog.text
    assert torch.equal(logits(reference), logits(rebuilt))


def test_entries_are_per_low_bit_format(model, tmp_path):
    cache = LowBitCache(tmp_path / "cache")
    backend = resolve_backend()
    a = cache.entry_dir(str(model), "sym_int4", backend, "torch.float32")
    b = cache.entry_dir(str(model), "sym_int8", backend, "torch.float32")
    assert a != b and "sym_int4" in a.name and "sym_int8" in b.name


def test_stale_entry_is_rebuilt_with_a_warning(model, tmp_path, mocker, caplog):
    cache = LowBitCache(tmp_path / "cache")
    load(model, cache)
    later = time.time() + 10
    os.utime(model / "config.json", (later, later))  # the model changed
    mocker.stopall()
    with caplog.at_level(logging.WARNING):
        _, conversions = load(model, cache, mocker)
    assert conversions == 1
    assert "stale" in caplog.text
    mocker.stopall()
    assert load(model, cache, mocker)[1] == 0  # rebuilt entry is good again


@pytest.mark.parametrize("damage", ["flip-bytes", "truncate", "delete-manifest"])
def test_corrupt_entry_is_rebuilt_with_a_warning(model, tmp_path, mocker, caplog, damage):
    cache = LowBitCache(tmp_path / "cache")
    reference, _ = load(model, cache)
    entry = entries(cache)[0]
    weights = max((p for p in entry.iterdir() if p.name != MANIFEST), key=lambda p: p.stat().st_size)
    if damage == "flip-bytes":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (entry / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        rebuilt, conversions = load(model, cache, mocker)
    assert conversions == 1 and "Rebuilding" in caplog.text
    assert torch.equal(logits(reference), logits(rebuilt))


CONCURRENT = """
import sys, torch
from fastchat_bigdl.lowbit.loader import load_low_bit_model
from fastchat_bigdl.lowbit.weights_cache import LowBitCache
from pathlib import Path
m, _ = load_low_bit_model(sys.argv[1], torch_dtype=torch.float32, cache=LowBitCache(Path(sys.argv[2])))
with torch.inference_mode():
    print(m(torch.tensor([[5, 17, 42, 99]])).logits.sum().item())
"""


@pytest.mark.slow
def test_two_workers_starting_at_once_do_not_corrupt_the_cache(model, tmp_path):
    cache_root = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(model), str(cache_root)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    cache = LowBitCache(cache_root)
    assert len(entries(cache)) == 1 and not [p for p in cache_root.iterdir() if p.name.startswith(".")]
    entry = entries(cache)[0]
    assert cache._check(entry, str(model)) is None
    # a third start loads the entry the others left
    out = subprocess.run([sys.executable, "-c", CONCURRENT, str(model), str(cache_root)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Loading sym_int4 weights from the low-bit cache" in out.stderr
    assert float(out.stdout.split()[-1]) == pytest.approx(float(outs[0][0].split()[-1]), rel=1e-5)


def test_worker_flags_choose_or_disable_the_cache(tiny_llama, tmp_path):
    from fastchat_bigdl.worker.bigdl_worker import BigDLModelWorker

    BigDLModelWorker("http://127.0.0.1:1", "http://127.0.0.1:2", "w", str(tiny_llama), None, 1,
                     no_register=True, low_bit_cache=str(tmp_path / "chosen"))
    assert len(list((tmp_path / "chosen").iterdir())) == 1
    BigDLModelWorker("http://127.0.0.1:1", "http://127.0.0.1:2", "w", str(tiny_llama), None, 1,
                     no_register=True, low_bit_cache=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chosen"]
