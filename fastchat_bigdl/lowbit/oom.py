"""Device out-of-memory during generation: a clear 4xx answer, and the worker lives on.

Upstream FastChat turns an Intel GPU's out-of-memory ``RuntimeError`` into error 50001
and, because the failed request's KV cache was never released, the worker kept failing
until restarted. Here the generation function is wrapped so that any out-of-memory
error (CUDA/XPU ``OutOfMemoryError``, xpu "out of device memory" ``RuntimeError``, CPU
``MemoryError``) leaves the generator (dropping its KV cache) and is re-raised as
:class:`DeviceOutOfMemory`, which upstream's handler does not swallow; the worker then
empties the device cache and answers with FastChat's out-of-memory code.
"""
from __future__ import annotations

import functools
import os

import torch

OOM_MARKERS = ("out of memory", "out of device memory")
# Test-only fault hook: when the file named here exists, the next generation removes it
# and fails the way an Intel GPU does when the history overflows device memory.
SIMULATE_ENV = "FASTCHAT_BIGDL_SIMULATE_OOM"
SIMULATED_MESSAGE = "Allocation is out of device memory on current platform."


class DeviceOutOfMemory(Exception):
    """Deliberately not a RuntimeError: upstream's gate would turn it into 50001."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(exc, oom_types):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS)


def _simulate_if_requested() -> None:
    trigger = os.environ.get(SIMULATE_ENV)
    if trigger and os.path.exists(trigger):
        os.remove(trigger)
        raise RuntimeError(SIMULATED_MESSAGE)


def guard_out_of_memory(generate_stream):
    """Wrap a FastChat generate_stream function (a generator) as described above."""

    @functools.wraps(generate_stream)
    def guarded(*args, **kwargs):
        try:
            _simulate_if_requested()
            yield from generate_stream(*args, **kwargs)
            return
        except BaseException as exc:
            if not is_out_of_memory(exc):
                raise
            message = f"{type(exc).__name__}: {exc}"
        # Raised outside the except block so no traceback keeps the KV cache alive.
        raise DeviceOutOfMemory(message)

    return guarded


def out_of_memory_advice(device: str, low_bit: str, error: str) -> str:
    return (
        f"The model ran out of {device} memory while generating ({error}). The worker freed "
        "its cache and keeps serving. Retry with a shorter history (fewer or shorter "
        "messages), a lower max_tokens, or restart the worker with a smaller --low-bit "
        f"format than {low_bit} (e.g. sym_int4)."
    )
