"""The one place that knows which low-bit library is installed.

ipex-llm (module ``ipex_llm``) is the renamed successor of bigdl-llm (module
``bigdl.llm``); both expose the same ``transformers`` API. Everything else in the
package asks this module for the library instead of importing it directly.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Dict, Optional, Tuple

BACKEND_ENV = "FASTCHAT_BIGDL_BACKEND"

# distribution name -> import name, in order of preference.
LIBRARIES: Dict[str, str] = {"ipex-llm": "ipex_llm", "bigdl-llm": "bigdl.llm"}
ALIASES = {"ipex_llm": "ipex-llm", "ipex": "ipex-llm", "bigdl": "bigdl-llm", "bigdl.llm": "bigdl-llm"}

INSTALL_HINT = (
    "no low-bit library is installed: install one with "
    "`pip install 'fastchat-bigdl[cpu]'` (ipex-llm, CPU), "
    "`pip install 'fastchat-bigdl[bigdl]'` (bigdl-llm 2.4.0, CPU) or "
    "`pip install 'fastchat-bigdl[xpu]'` (Intel GPU)"
)


class BackendError(RuntimeError):
    """The low-bit library is missing or unusable; the message says how to fix it."""


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class LowBitBackend:
    distribution: str  # "ipex-llm" or "bigdl-llm"
    module_name: str  # "ipex_llm" or "bigdl.llm"
    version: str

    def _import(self, submodule: str) -> ModuleType:
        with warnings.catch_warnings():
            # The library imports transformers.deepspeed, deprecated since 4.37: noise on every start.
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module(f"{self.module_name}.{submodule}")

    @property
    def qtypes(self) -> Dict[str, int]:
        """Low-bit formats the library supports, name -> ggml qtype id."""
        return dict(self._import("ggml.quantize").ggml_tensor_qtype)

    @property
    def auto_model_class(self):
        return self._import("transformers").AutoModelForCausalLM

    def convert_empty(self, model, qtype: str, optimize_model: bool):
        """Swap a meta-device model's linear layers for the library's low-bit ones,
        shapes only (what reading stored converted weights starts from); with
        ``optimize_model`` also the library's layer rewrites (e.g. fused q/k/v)."""
        convert = self._import("transformers.convert").ggml_convert_low_bit
        return convert(model, self.qtypes[qtype], optimize_model=optimize_model, device="meta")

    def low_bit_linear_types(self) -> Tuple[type, ...]:
        """The nn.Module classes the library swaps nn.Linear for."""
        mod = self._import("transformers.low_bit_linear")
        names = ("LowBitLinear", "FP16Linear", "BF16Linear")
        return tuple(getattr(mod, n) for n in names if hasattr(mod, n))

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


def _normalise(name: str) -> str:
    name = name.strip().lower()
    name = ALIASES.get(name, name)
    if name not in LIBRARIES:
        raise BackendError(
            f"unknown low-bit library {name!r} (from --low-bit-backend or ${BACKEND_ENV}); "
            f"choose one of: {', '.join(LIBRARIES)}"
        )
    return name


@lru_cache(maxsize=None)
def resolve_backend(prefer: Optional[str] = None) -> LowBitBackend:
    """Pick the low-bit library: ``prefer``, else $FASTCHAT_BIGDL_BACKEND, else
    ipex-llm if installed, else bigdl-llm. Fails with the extra to install."""
    wanted = prefer or os.environ.get(BACKEND_ENV) or None
    candidates = [_normalise(wanted)] if wanted else list(LIBRARIES)
    for dist in candidates:
        version = installed_version(dist)
        if version is None:
            continue
        backend = LowBitBackend(dist, LIBRARIES[dist], version)
        try:
            backend._import("ggml.quantize")
        except Exception as exc:  # broken install: say which and why
            raise BackendError(f"{backend} is installed but does not import: {exc}") from exc
        return backend
    if wanted:
        raise BackendError(f"{candidates[0]} was requested but is not installed; {INSTALL_HINT}")
    raise BackendError(INSTALL_HINT)
