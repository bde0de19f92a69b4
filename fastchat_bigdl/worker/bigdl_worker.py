"""FastChat's ``ModelWorker`` serving a model loaded through the low-bit library: same
FastAPI app, heartbeat and controller registration; loading, the token loop, prefix
reuse and out-of-memory recovery are this package's."""
from __future__ import annotations

import functools
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import List, Optional

import requests
from fastchat.constants import ErrorCode
from fastchat.model.model_adapter import get_generate_stream_function
from fastchat.serve import model_worker as upstream
from fastchat.serve.inference import generate_stream as fastchat_generate_stream
from fastchat.serve.base_model_worker import BaseModelWorker
from fastchat.utils import get_context_length

from fastchat_bigdl.adapter import conversation_for, register
from fastchat_bigdl.common.chat_template import prompts_need_template
from fastchat_bigdl.engine.kv_budget import (
    KVBudget,
    NeverFits,
    available_memory_bytes,
    default_kv_budget_bytes,
    mapped_bytes_under,
)
from fastchat_bigdl.engine.scheduler import Engine
from fastchat_bigdl.engine.selection import DEFAULT_KV_CACHE_DTYPE, choose_forward
from fastchat_bigdl.lowbit.backend import resolve_backend
from fastchat_bigdl.lowbit.devices import empty_cache, place_model, prepare_device, use_physical_cores
from fastchat_bigdl.lowbit.formats import load_dtype
from fastchat_bigdl.lowbit.loader import DEFAULT_LOW_BIT
from fastchat_bigdl.lowbit.oom import DeviceOutOfMemory, guard_out_of_memory, out_of_memory_advice
from fastchat_bigdl.lowbit.weights_cache import LowBitCache
from fastchat_bigdl.worker.generation import hf_kv_bytes_per_position, token_loop
from fastchat_bigdl.worker.prefix_cache import PrefixCache, default_budget_bytes, physical_memory_bytes

logger = logging.getLogger("fastchat_bigdl.model_worker")


class GenerationFailed(Exception):
    """Deliberately not a RuntimeError/ValueError: upstream's gate would answer those
    with FastChat's "NETWORK ERROR DUE TO HIGH TRAFFIC" text, which blames the network."""


def report_failures(stream_func):
    """Wrap a generate_stream function: any failure is logged with its traceback here and
    re-raised as GenerationFailed carrying its cause in one line (out-of-memory passes
    through to its own handling)."""

    @functools.wraps(stream_func)
    def reporting(*args, **kwargs):
        try:
            yield from stream_func(*args, **kwargs)
            return
        except (DeviceOutOfMemory, NeverFits):
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged in full here
            logger.exception("generation failed; the worker keeps serving")
            lines = str(exc).strip().splitlines()
            cause = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        # Raised outside the except block, so no traceback keeps the failed request's KV cache.
        raise GenerationFailed(cause)

    return reporting


class BigDLModelWorker(upstream.ModelWorker):
    """FastChat's ModelWorker serving a model converted to low-bit on load.

    ``ModelWorker.__init__`` loads through FastChat's own ``load_model``, which has no
    place for a low-bit format, and registers at once; so the base worker's set-up runs
    here instead, then the same attributes are filled the low-bit way."""

    def __init__(
        self,
        controller_addr: str,
        worker_addr: str,
        worker_id: str,
        model_path: str,
        model_names: Optional[List[str]],
        limit_worker_concurrency: int,
        no_register: bool,
        device: str = "cpu",
        low_bit: str = DEFAULT_LOW_BIT,
        low_bit_backend: Optional[str] = None,
        trust_remote_code: bool = False,
        optimize_model: Optional[bool] = None,
        low_bit_cache: Optional[str] = None,
        prefix_cache_mb: Optional[int] = 0,  # None: prefix_cache.default_budget_bytes
        revision: str = "main",
        conv_template: Optional[str] = None,
        stream_interval: int = 2,
        embed_in_truncate: bool = False,
        seed: Optional[int] = None,
        forward: str = "auto",
        prefill_recipe: str = "auto",
        kv_cache_dtype: str = DEFAULT_KV_CACHE_DTYPE,
        kv_budget_mb: Optional[int] = None,  # None: a share of the memory available after loading; 0: none
    ):
        BaseModelWorker.__init__(self, controller_addr, worker_addr, worker_id, model_path, model_names,
                                 limit_worker_concurrency, conv_template=conv_template)
        self.device, self.low_bit = device, low_bit
        self.stream_interval, self.embed_in_truncate, self.seed = stream_interval, embed_in_truncate, seed
        # Registration waits until the HTTP server listens (register_when_listening):
        # upstream registers first, and a controller refresh in that gap drops the
        # worker until its next heartbeat, which users see as error 40301.
        self.no_register = no_register
        prepare_device(device)
        # One thread loads the model and runs every step of every stream (engine.scheduler).
        self.engine = Engine(name="model")
        self.engine.call(use_physical_cores)
        backend = resolve_backend(low_bit_backend)
        self.model, self.tokenizer = self._load(model_path, {
            "low_bit": low_bit, "torch_dtype": load_dtype(device, low_bit), "revision": revision,
            "trust_remote_code": trust_remote_code, "optimize_model": optimize_model, "backend": backend,
            "cache": LowBitCache(Path(low_bit_cache)) if low_bit_cache else None})
        self.context_len = get_context_length(self.model.config)
        self.runner, own_stream = self._choose_decode_path(model_path, backend, dict(
            wanted=forward, prefill_recipe=prefill_recipe, kv_cache_dtype=kv_cache_dtype))
        self.prefix_cache = None if own_stream else self._prefix_cache(prefix_cache_mb)
        self.engine.kv_budget = None if own_stream else self._kv_budget(kv_budget_mb, low_bit_cache)
        if own_stream:  # chunk by chunk, in turns with the other streams
            stream = self.engine.streamer(own_stream, batched=False)
        else:  # every stream's loop on the engine thread; its decode steps batched with the others'
            stream = self.engine.streamer(functools.partial(token_loop, prefix_cache=self.prefix_cache,
                                                            runner=self.runner))
        self.generate_stream_func = report_failures(guard_out_of_memory(stream))
        # The API server renders chats with the tokenizer's template where this one differs.
        self.prompts_need_template = False
        if not conv_template:
            self.conv = conversation_for(model_path, self.tokenizer, logger)
            self.prompts_need_template = prompts_need_template(self.conv, self.tokenizer)
            self.conv.sep_style = int(self.conv.sep_style)
        logger.info("Prompt template: %s", "the tokenizer's chat template (rendered by the API server)"
                    if self.prompts_need_template else self.conv.name)

    def _load(self, model_path: str, options: dict):
        """(model on its device, tokenizer), loaded on the engine thread through the adapter."""
        model, tokenizer = self.engine.call(register().load_model, model_path, options)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return self.engine.call(place_model, model, self.device), tokenizer

    def _choose_decode_path(self, model_path: str, backend, lean_options: dict):
        """(the lean runner or None, the model's own FastChat generate function or None):
        decoder-only LMs run this package's token loop (on the runner where it covers the
        model, else the Hugging Face forward); others keep their own function."""
        own = get_generate_stream_function(self.model, model_path)
        if own is not fastchat_generate_stream:
            self.decode_path = f"decode path: the model's own FastChat generate function ({own.__name__})"
            runner = None
        else:
            # On the engine thread: building the runner runs the kernels (its probes), and
            # kernels run from a second thread slow every later step.
            runner, self.decode_path = self.engine.call(choose_forward, self.model, backend, self.device,
                                                        **lean_options)
            own = None
        self.engine.runner = runner
        logger.info(self.decode_path)
        return runner, own

    def _prefix_cache(self, budget_mb: Optional[int]) -> Optional[PrefixCache]:
        """None for ``--prefix-cache-mb 0``; ``budget_mb`` None: one full context of KV."""
        if budget_mb is not None:
            return PrefixCache(budget_mb << 20) if budget_mb > 0 else None
        per_token = self._kv_bytes_per_position()
        budget = default_budget_bytes(per_token, self.context_len, physical_memory_bytes(), self.device)
        logger.info("prefix cache: %d MiB (one %d-token context of this model's KV on CPU, %.2f MiB a token)",
                    budget >> 20, self.context_len, per_token / 2**20)
        return PrefixCache(budget)

    def _kv_bytes_per_position(self) -> int:
        """KV bytes a position takes: the lean runner's cache type, else the model's dtype."""
        if self.runner is not None:
            return self.runner.kv_bytes_per_position()
        return hf_kv_bytes_per_position(self.model)

    def _kv_budget(self, budget_mb: Optional[int], low_bit_cache: Optional[str]) -> Optional[KVBudget]:
        """The bytes of KV the worker may hold (running requests + prefix cache), logged
        with the longest request that fits."""
        if budget_mb == 0:
            logger.info("KV budget: none (--kv-budget-mb 0): memory is not admitted in bytes")
            return None
        if budget_mb is None and not str(self.device).startswith("cpu"):
            logger.info("KV budget: none by default on %s (its memory is not the host's); set --kv-budget-mb",
                        self.device)
            return None
        mapped = mapped_bytes_under(Path(low_bit_cache)) if low_bit_cache else 0
        available = available_memory_bytes(mapped_weights=mapped)
        total = default_kv_budget_bytes(available) if budget_mb is None else budget_mb << 20
        budget = KVBudget(total, cache=self.prefix_cache)
        if self.prefix_cache is not None:
            self.prefix_cache.room = budget.cache_room
        positions = total // max(1, self._kv_bytes_per_position())
        logger.info("KV budget: %d MiB (%s; %d MiB available after loading, beside %d MiB of weights mapped from "
                    "the low-bit cache) for running requests and the prefix cache: %d positions in all", total >> 20,
                    "--kv-budget-mb" if budget_mb is not None else "default: 60%", available >> 20, mapped >> 20,
                    positions)
        if positions < self.context_len:
            # Served as the context: the API server then trims max_tokens to it and answers a
            # longer prompt with 40303 and both counts, which agent clients trim their history on.
            logger.warning("Context: %d positions, what the KV budget holds (the model's own: %d); a larger "
                           "--kv-budget-mb or more memory serves more", positions, self.context_len)
            self.context_len = positions
        return budget

    def generate_stream_gate(self, params):
        try:
            yield from super().generate_stream_gate(params)
            return
        except NeverFits as exc:
            ret = {"text": str(exc), "error_code": ErrorCode.CONTEXT_OVERFLOW}
            yield json.dumps(ret).encode() + b"\0"
            return
        except GenerationFailed as exc:
            ret = {"text": f"generation failed ({exc}); the worker keeps serving and its log has the details",
                   "error_code": ErrorCode.INTERNAL_ERROR}
            yield json.dumps(ret).encode() + b"\0"
            return
        except DeviceOutOfMemory as exc:
            error = str(exc)
        # After the except block: the failed generation's frames and KV cache are gone.
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        empty_cache(self.device)
        logger.warning("out of %s memory; cache freed, still serving: %s", self.device, error)
        ret = {"text": out_of_memory_advice(self.device, self.low_bit, error),
               "error_code": ErrorCode.CUDA_OUT_OF_MEMORY}
        yield json.dumps(ret).encode() + b"\0"

    def register_when_listening(self, host: str, port: int, retry_seconds: float = 2.0) -> threading.Thread:
        """Register with the controller once this worker accepts connections; keep
        retrying while the controller is unreachable, then start the heartbeat."""

        def run():
            probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
            while True:
                try:
                    socket.create_connection((probe_host, port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            while True:
                try:
                    self.init_heart_beat()
                    return
                except (AssertionError, requests.RequestException) as exc:
                    logger.warning("controller %s not reachable yet (%s); retrying", self.controller_addr, exc)
                    time.sleep(retry_seconds)

        thread = threading.Thread(target=run, name="register-worker", daemon=True)
        if not self.no_register:
            thread.start()
        return thread
