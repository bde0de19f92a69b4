"""Prefill recipes (``engine.prefill_recipe``): the torch unpack of the library's sym_int4
storage equals the library's own dequantizer, the dense recipes compute exactly that
product, rows stay independent, decode-sized calls keep the library's kernel, and the
choice by measurement keeps the kernel on close calls and says what it measured."""
import re

import pytest
import torch

from fastchat_bigdl.engine import prefill_recipe
from fastchat_bigdl.engine.llama_runner import PREFILL_BLOCK
from fastchat_bigdl.engine.selection import build_lean_runner, choose_forward, prefill_rows_are_independent
from fastchat_bigdl.lowbit.backend import resolve_backend
from fastchat_bigdl.lowbit.kernels import DequantizedGemm, dequantize_sym_int4, library_dequantize
from fastchat_bigdl.lowbit.loader import load_low_bit_model
from helpers import build_tiny_llama

pytestmark = pytest.mark.backend

BACKEND = resolve_backend()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("recipe") / "tiny", hidden_size=256, heads=4, kv_heads=2)
    return path, load_low_bit_model(str(path), torch_dtype=torch.float32)[0]


def matmuls(runner):
    return [m for layer in runner.layers for m in prefill_recipe._matmuls(layer)] + [runner.lm_head]


def test_the_unpack_equals_the_library_dequantizer_on_every_layer(tiny):
    runner = build_lean_runner(tiny[1], BACKEND, "cpu", prefill_recipe="kernel")
    for matmul in matmuls(runner):
        assert torch.equal(dequantize_sym_int4(matmul), library_dequantize(matmul, BACKEND))


def test_dense_recipes_compute_the_dequantized_product_and_keep_rows_independent(tiny):
    runner = build_lean_runner(tiny[1], BACKEND, "cpu", prefill_recipe="kernel")
    matmul = runner.layers[0].down
    x = torch.randn(PREFILL_BLOCK, matmul.in_features, generator=torch.Generator().manual_seed(0))
    exact = torch.nn.functional.linear(x, library_dequantize(matmul, BACKEND))
    assert torch.equal(DequantizedGemm(matmul, torch.float32)(x), exact)
    bf16 = DequantizedGemm(matmul, torch.bfloat16)(x)
    assert (bf16 - exact).abs().max() < 0.02 * exact.abs().max()
    matmul.block_recipe = DequantizedGemm(matmul, torch.bfloat16)
    try:
        assert prefill_rows_are_independent(matmul)
        assert torch.equal(matmul(x), bf16)  # a block call takes the recipe
        assert torch.equal(matmul(x[:16]), matmul.kernel(x[:16]))  # decode-sized calls the kernel
    finally:
        matmul.block_recipe = None


@pytest.mark.parametrize("recipe", ["kernel", "bf16", "fp32"])
def test_a_forced_recipe_is_set_on_every_sym_int4_layer_and_named(tiny, recipe):
    runner, line = choose_forward(tiny[1], BACKEND, "cpu", prefill_recipe=recipe)
    assert f"prefill blocks: {prefill_recipe.NAMES[recipe]} (asked for)" in line
    dtypes = {m.block_recipe.dtype if m.block_recipe is not None else None for m in matmuls(runner)}
    assert dtypes == {prefill_recipe.RECIPES[recipe]}


def test_auto_measures_and_says_what_it_measured(tiny):
    runner, line = choose_forward(tiny[1], BACKEND, "cpu")
    assert re.search(r"\(measured, 64 rows of the \d+x\d+ layer: ", line) and "low-bit kernel" in line and "bf16 GEMM" in line
    chosen = next(name for name, text in prefill_recipe.NAMES.items() if f"prefill blocks: {text} (measured" in line)
    assert {m.block_recipe is not None for m in matmuls(runner)} == {chosen != "kernel"}


def test_the_kernel_stays_unless_another_recipe_is_clearly_faster():
    assert prefill_recipe.choose({"kernel": 10.0, "bf16": 9.0, "fp32": 12.0}) == "kernel"
    assert prefill_recipe.choose({"kernel": 10.0, "bf16": 5.0, "fp32": 6.0}) == "bf16"
    assert prefill_recipe.choose({"kernel": 10.0, "bf16": 20.0, "fp32": 8.0}) == "fp32"
    with pytest.raises(ValueError, match="unknown prefill recipe"):
        prefill_recipe.apply_prefill_recipe([], None, BACKEND, "fast")


def test_other_formats_keep_the_kernel(tiny):
    model = load_low_bit_model(str(tiny[0]), torch_dtype=torch.float32, low_bit="sym_int8")[0]
    runner, line = choose_forward(model, BACKEND, "cpu", prefill_recipe="bf16")
    assert "low-bit kernel (the only one for this format)" in line
    assert all(m.block_recipe is None for m in matmuls(runner))
