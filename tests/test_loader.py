import pytest
import torch

from fastchat_bigdl.lowbit import loader
from fastchat_bigdl.lowbit.backend import resolve_backend
from fastchat_bigdl.lowbit.loader import UnsupportedModel, check_model_supported, load_low_bit_model, optimizations_supported
from helpers import build_tiny_llama

pytestmark = pytest.mark.backend


def low_bit_linears(model):
    types = resolve_backend().low_bit_linear_types()
    return {name: m for name, m in model.named_modules() if isinstance(m, types)}


@pytest.mark.parametrize("low_bit", ["sym_int4", "sym_int8"])
def test_linear_layers_really_are_low_bit_of_the_requested_qtype(tiny_llama, low_bit):
    model, tokenizer = load_low_bit_model(str(tiny_llama), low_bit=low_bit, torch_dtype=torch.float32)
    layers = low_bit_linears(model)
    assert layers, "no low-bit layers after conversion"
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear], "fp32 nn.Linear left"
    assert {m.qtype for m in layers.values()} == {resolve_backend().qtypes[low_bit]}
    # and the converted model still runs
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_unknown_low_bit_lists_the_choices(tiny_llama):
    with pytest.raises(ValueError, match="unknown low-bit format 'int3'.*sym_int4.*sym_int8"):
        load_low_bit_model(str(tiny_llama), low_bit="int3")


def test_non_default_rope_base_refused_where_transformers_ignores_it(tmp_path, monkeypatch):
    path = build_tiny_llama(tmp_path / "smol-like", rope_theta=100000.0, hidden_size=64, layers=1)

    class LlamaConfigWithoutRopeTheta:  # what transformers 4.31 has
        def __init__(self, vocab_size=32000, hidden_size=4096, **kwargs):
            pass

    monkeypatch.setattr(loader.transformers, "CONFIG_MAPPING", {"llama": LlamaConfigWithoutRopeTheta})
    with pytest.raises(UnsupportedModel, match="rope_theta=100000.*would serve wrong output.*fastchat-bigdl\\[cpu\\]"):
        check_model_supported(str(path))


def test_rope_theta_check_matches_the_installed_transformers(tmp_path):
    import inspect

    from transformers import LlamaConfig

    path = build_tiny_llama(tmp_path / "smol-like", rope_theta=100000.0, hidden_size=64, layers=1)
    if "rope_theta" in inspect.signature(LlamaConfig.__init__).parameters:
        check_model_supported(str(path))  # supported: no error
    else:
        with pytest.raises(UnsupportedModel):
            check_model_supported(str(path))
    check_model_supported(str(build_tiny_llama(tmp_path / "plain", hidden_size=64, layers=1)))


@pytest.mark.backend
@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_checkpoints_convert_in_their_own_dtype_to_the_same_model(tmp_path, stored, mocker):
    """Read as stored while converting (half the memory of an fp32 copy, what lets a 7B
    checkpoint convert on a 24 GiB machine; the library's own default for such
    checkpoints), then what stays unquantised is widened to fp32, so the lean runner
    serves it. The library quantises half-precision weights with slightly different
    rounding than their fp32 copy: logits agree within 2% of the largest (measured
    ~0.5%)."""
    import json

    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path / "half")
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=getattr(torch, stored))
    model.save_pretrained(str(path), safe_serialization=True)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == stored

    backend = resolve_backend()
    reads = mocker.spy(backend.auto_model_class, "from_pretrained")
    ours, tokenizer = load_low_bit_model(str(path), torch_dtype=torch.float32, backend=backend)
    assert reads.call_args.kwargs["torch_dtype"] == getattr(torch, stored)
    assert ours.model.embed_tokens.weight.dtype == torch.float32
    assert ours.model.norm.weight.dtype == torch.float32
    as_fp32 = backend.auto_model_class.from_pretrained(str(path), load_in_low_bit="sym_int4",
                                                       torch_dtype=torch.float32,
                                                       optimize_model=optimizations_supported(backend),
                                                       use_cache=True)
    ids = torch.tensor([tokenizer("hello world how are you today").input_ids])
    with torch.inference_mode():
        a, b = ours(input_ids=ids).logits, as_fp32(input_ids=ids).logits
    assert (a - b).abs().max() < 0.02 * b.abs().max()
    assert loader.conversion_dtype(str(path), torch.bfloat16) is None  # asked for a half dtype anyway

    from fastchat_bigdl.engine.selection import choose_forward

    runner, line = choose_forward(ours, backend, "cpu")
    assert runner is not None, line
