"""A converted low-bit model written to disk and read back, in a format of our own.

The libraries' own ``save_low_bit`` / ``load_low_bit`` rebuild the model through
transformers' private loading functions: ipex-llm 2.2.0's ``load_low_bit`` breaks from
transformers 4.51 on (``no_init_weights(_enable=...)`` and the 4.37-era
``_load_pretrained_model`` are gone). Ours uses only public pieces, on every
transformers we support: ``config.json`` plus one safetensors file holding the converted
state dict as it is (packed int4 bytes included) and the computed buffers. Reading builds the model on the meta
device, lets the library convert the empty shapes (``device="meta"``, no arithmetic),
then puts the stored tensors in place: the result is bit-identical to the conversion
that wrote them. Tied weights are stored once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fastchat_bigdl.lowbit.backend import LowBitBackend

WEIGHTS = "low_bit_weights.safetensors"
# Per low-bit weight: its qtype and logical shape; aliases: tied names -> stored name.
LAYOUT_KEY = "fastchat_bigdl_layout"


class EntryMismatch(ValueError):
    """The stored weights do not fit the model this library builds from their config."""


def _low_bit_params(model, low_bit_linear_types):
    for name, module in model.named_modules():
        if isinstance(module, low_bit_linear_types):
            yield f"{name}.weight" if name else "weight", module.weight


def save_converted(model, directory, backend: LowBitBackend) -> None:
    """Write ``model`` (already converted by ``backend``) to ``directory``."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tensors, aliases, seen = {}, {}, {}
    # Non-persistent buffers too (RoPE tables): they carry the rounding of the dtype the
    # model was converted in, and a reload must compute exactly what the conversion did.
    everything = {**dict(model.named_buffers()), **model.state_dict(keep_vars=True)}
    for name, value in everything.items():
        key = (value.data_ptr(), value.dtype, tuple(value.shape)) if value.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = value.detach().as_subclass(torch.Tensor).contiguous()
    low_bit = {name: {"qtype": int(p.qtype), "shape": list(p._shape)}
               for name, p in _low_bit_params(model, backend.low_bit_linear_types())}
    layout = {"low_bit": low_bit, "aliases": aliases}
    save_file(tensors, str(directory / WEIGHTS), metadata={LAYOUT_KEY: json.dumps(layout)})


def _put(module, pname, value, old, low_bit_linear_types, layout, full):
    import torch

    if isinstance(module, low_bit_linear_types) and pname == "weight":
        stored = layout["low_bit"].get(full)
        if stored is None or stored["qtype"] != int(old.qtype) or stored["shape"] != list(old._shape):
            raise EntryMismatch(f"{full}: stored as {stored}, the library builds qtype {old.qtype} "
                                f"shape {list(old._shape)}")
        extra = {"in_features": old.in_features} if hasattr(old, "in_features") else {}
        module._parameters[pname] = type(old)(value, requires_grad=False, quantized=True,
                                              _shape=old._shape, qtype=old.qtype, **extra)
    elif pname in module._parameters:
        module._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[pname] = value


def load_converted(directory, backend: LowBitBackend, low_bit: str, optimize_model: bool,
                   trust_remote_code: bool = False):
    """Read what :func:`save_converted` wrote, onto the model ``backend`` builds for
    ``low_bit`` (with ``optimize_model`` as at conversion) on the meta device."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    path = os.fspath(directory / WEIGHTS)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model = backend.convert_empty(model, low_bit, optimize_model)
    low_bit_linear_types = backend.low_bit_linear_types()
    with safe_open(path, framework="pt") as stored:
        layout = json.loads(stored.metadata()[LAYOUT_KEY])
        names = set(stored.keys())
        values = {}
        for mname, module in model.named_modules():
            own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for pname, old in own:
                full = f"{mname}.{pname}" if mname else pname
                key = layout["aliases"].get(full, full)
                if key not in names:
                    if old.device.type == "meta":
                        raise EntryMismatch(f"{full} is not in {path}")
                    continue  # a buffer the model computes itself (not in the state dict)
                if key not in values:
                    values[key] = stored.get_tensor(key)
                _put(module, pname, values[key], old, low_bit_linear_types, layout, full)
    return model.eval()
