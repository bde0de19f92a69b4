"""Load a Hugging Face checkpoint through the low-bit library."""
from __future__ import annotations

import inspect
import json
import logging
import os
import time
from typing import Optional

import transformers
from packaging.version import Version
from transformers import AutoTokenizer

from fastchat_bigdl.lowbit.backend import LowBitBackend, resolve_backend
from fastchat_bigdl.lowbit.converted_weights import load_converted, save_converted
from fastchat_bigdl.lowbit.weights_cache import LowBitCache

logger = logging.getLogger(__name__)

DEFAULT_LOW_BIT = "sym_int4"
DEFAULT_ROPE_THETA = 10000.0


class UnsupportedModel(RuntimeError):
    """This model cannot be served correctly with the installed libraries."""


def _read_config(model_path: str) -> dict:
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_model_supported(model_path: str) -> None:
    """Refuse a model that the installed transformers would run wrongly.

    transformers 4.31 (bigdl-llm 2.4.0's pin) ignores ``rope_theta``: a model with a
    non-default RoPE base (SmolLM2, Llama-3, Qwen2) would load without error and
    produce garbage, so we stop here instead.
    """
    config = _read_config(model_path)
    rope_theta = config.get("rope_theta")
    if rope_theta is None or float(rope_theta) == DEFAULT_ROPE_THETA:
        return
    try:
        config_class = transformers.CONFIG_MAPPING[config.get("model_type", "")]
    except KeyError:  # remote-code model: its own config class decides
        return
    if "rope_theta" in inspect.signature(config_class.__init__).parameters:
        return
    raise UnsupportedModel(
        f"{model_path} uses rope_theta={rope_theta:g}, but transformers {transformers.__version__} "
        f"ignores rope_theta for model_type {config.get('model_type')!r} and would serve wrong "
        "output. Use the default stack (pip install 'fastchat-bigdl[cpu]', transformers 4.53)."
    )


# The newest transformers each library's model optimizations were built against: they
# patch transformers' internals (attention classes, cache layouts) that later releases
# renamed. Measured: bigdl-llm 2.4.0 fits 4.31 (5.x breaks); ipex-llm 2.2.0 fits 4.37,
# and with 4.51 every family's patched forward fails (`Qwen2SdpaAttention` and friends are
# gone). Without them the library still converts the linear layers, which is all the
# lean runner needs.
OPTIMIZED_UP_TO = {"bigdl-llm": "4.35", "ipex-llm": "4.38"}


def optimizations_supported(backend: LowBitBackend) -> bool:
    limit = OPTIMIZED_UP_TO.get(backend.distribution)
    return limit is None or Version(transformers.__version__) < Version(limit)


def conversion_dtype(model_path: str, torch_dtype):
    """The dtype to read a half-precision checkpoint in while converting it, when fp32 is
    wanted afterwards (None: read it in ``torch_dtype``). The library materialises the
    whole model before quantising: read as fp32, a 7B bf16 checkpoint needs ~27 GB (it
    passed 19 GiB at 25 of 34 shards on a 24 GiB machine); read as stored, half (the
    library's own default for such checkpoints). What stays unquantised is widened after."""
    import torch

    stored = _read_config(model_path).get("torch_dtype")
    if torch_dtype == torch.float32 and stored in ("bfloat16", "float16"):
        return getattr(torch, stored)
    return None


def load_tokenizer(model_path: str, revision: str = "main", trust_remote_code: bool = False):
    try:
        return AutoTokenizer.from_pretrained(
            model_path, use_fast=True, revision=revision, trust_remote_code=trust_remote_code
        )
    except TypeError:  # some slow-only tokenizers
        return AutoTokenizer.from_pretrained(
            model_path, use_fast=False, revision=revision, trust_remote_code=trust_remote_code
        )


def _eager_where_sdpa_drops_softcap(model) -> None:
    """transformers' SDPA attention silently ignores Gemma 2's score soft-capping (only its
    eager attention applies it), so the Hugging Face forward of such a model runs eager."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None) and getattr(config, "_attn_implementation", None) != "eager":
        config._attn_implementation = "eager"  # read at every forward (transformers 4.48+)


def load_low_bit_model(
    model_path: str,
    low_bit: str = DEFAULT_LOW_BIT,
    torch_dtype=None,
    revision: str = "main",
    trust_remote_code: bool = False,
    optimize_model: Optional[bool] = None,
    backend: Optional[LowBitBackend] = None,
    cache: Optional[LowBitCache] = None,
):
    """Convert ``model_path`` to ``low_bit`` on load (or load the weights ``cache``
    kept from an earlier conversion); returns (model, tokenizer)."""
    backend = backend or resolve_backend()
    if low_bit not in backend.qtypes:
        raise ValueError(
            f"unknown low-bit format {low_bit!r} for {backend}; choose one of: "
            + ", ".join(backend.qtypes)
        )
    check_model_supported(model_path)
    if optimize_model is None:
        optimize_model = optimizations_supported(backend)
    started = time.monotonic()
    logger.info(
        "Loading %s with %s as %s (optimize_model=%s) ...", model_path, backend, low_bit, optimize_model
    )
    common = {"optimize_model": optimize_model, "trust_remote_code": trust_remote_code, "use_cache": True}
    if torch_dtype is not None:
        common["torch_dtype"] = torch_dtype
    narrow = conversion_dtype(model_path, torch_dtype)

    def convert():
        if narrow is None:
            return backend.auto_model_class.from_pretrained(
                model_path, load_in_low_bit=low_bit, revision=revision, **common
            )
        model = backend.auto_model_class.from_pretrained(
            model_path, load_in_low_bit=low_bit, revision=revision, **{**common, "torch_dtype": narrow}
        )
        return model.to(torch_dtype)  # what stays unquantised (embeddings, norms), widened exactly

    if cache is None or not os.path.isdir(model_path):
        model, hit = convert(), False
    else:
        model, hit = cache.load_or_build(
            model_path, low_bit, backend, str(torch_dtype),
            load=lambda entry: load_converted(entry, backend, low_bit, optimize_model, trust_remote_code),
            build=convert,
            save=lambda model, entry: save_converted(model, entry, backend),
        )
    model.eval()
    _eager_where_sdpa_drops_softcap(model)
    tokenizer = load_tokenizer(model_path, revision, trust_remote_code)
    logger.info("%s %s as %s in %.1f s", "Loaded cached" if hit else "Converted", model_path, low_bit,
                time.monotonic() - started)
    return model, tokenizer
