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
import fastchat_bigdl  # registers the adapter and keeps proxies off loopback
from fastchat.constants import ErrorCode
from fastchat.model.model_adapter import get_generate_stream_function
from fastchat.serve import model_worker as upstream
from fastchat.serve.inference import generate_stream as fastchat_generate_stream
from fastchat.serve.base_model_worker import BaseModelWorker
from fastchat.utils import get_context_length

from fastchat_bigdl.adapter import conversation_for
from fastchat_bigdl.engine.scheduler import Engine
from fastchat_bigdl.engine.selection import choose_forward
from fastchat_bigdl.lowbit.backend import resolve_backend
from fastchat_bigdl.lowbit.devices import empty_cache, place_model, prepare_device, use_physical_cores
from fastchat_bigdl.lowbit.formats import load_dtype
from fastchat_bigdl.lowbit.loader import DEFAULT_LOW_BIT
from fastchat_bigdl.lowbit.oom import DeviceOutOfMemory, guard_out_of_memory, out_of_memory_advice
from fastchat_bigdl.lowbit.weights_cache import LowBitCache
from fastchat_bigdl.worker.generation import token_loop
from fastchat_bigdl.worker.prefix_cache import (PrefixCache, default_budget_mb, kv_bytes_per_token,
                                                physical_memory_bytes)

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
        except DeviceOutOfMemory:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged in full here
            logger.exception("generation failed; the worker keeps serving")
            lines = str(exc).strip().splitlines()
            cause = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        # Raised outside the except block, so no traceback keeps the failed request's KV cache.
        raise GenerationFailed(cause)

    return reporting


class BigDLModelWorker(upstream.ModelWorker):
    """FastChat's ModelWorker serving a model converted to low-bit on load."""

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
        prefix_cache_mb: Optional[int] = 0,  # None: prefix_cache.default_budget_mb
        revision: str = "main",
        conv_template: Optional[str] = None,
        stream_interval: int = 2,
        embed_in_truncate: bool = False,
        seed: Optional[int] = None,
        forward: str = "auto",
    ):
        # ModelWorker.__init__ would load through FastChat's loader; run the base
        # worker's set-up instead and load through the BigDL adapter.
        BaseModelWorker.__init__(
            self,
            controller_addr,
            worker_addr,
            worker_id,
            model_path,
            model_names,
            limit_worker_concurrency,
            conv_template=conv_template,
        )
        prepare_device(device)
        # One thread loads the model and runs every step of every stream (engine.scheduler).
        self.engine = Engine(name="model")
        self.engine.call(use_physical_cores)
        backend = resolve_backend(low_bit_backend)
        model, self.tokenizer = self.engine.call(
            fastchat_bigdl.bigdl_adapter.load_model,
            model_path,
            {
                "low_bit": low_bit,
                "torch_dtype": load_dtype(device, low_bit),
                "revision": revision,
                "trust_remote_code": trust_remote_code,
                "optimize_model": optimize_model,
                "backend": backend,
                "cache": LowBitCache(Path(low_bit_cache)) if low_bit_cache else None,
            },
        )
        self.model = self.engine.call(place_model, model, device)
        self.device = device
        self.low_bit = low_bit
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.context_len = get_context_length(self.model.config)
        if prefix_cache_mb is None:
            prefix_cache_mb = default_budget_mb(self.model.config, self.context_len, physical_memory_bytes(), device)
            logger.info("prefix cache: %d MiB (one %d-token context of this model's KV on CPU, %.2f MiB a token)",
                        prefix_cache_mb, self.context_len, kv_bytes_per_token(self.model.config) / 2**20)
        self.prefix_cache = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
        stream_func = get_generate_stream_function(self.model, model_path)
        self.runner = None
        if stream_func is fastchat_generate_stream:  # decoder-only LMs: our loop, same contract
            # On the engine thread: building the runner runs the kernels (its probes), and
            # kernels run from a second thread slow every later step.
            self.runner, self.decode_path = self.engine.call(choose_forward, self.model, backend, device, forward)
            self.engine.runner = self.runner
            # Every stream's loop on the engine thread; its decode steps batched with the others'.
            stream_func = self.engine.streamer(functools.partial(token_loop, prefix_cache=self.prefix_cache,
                                                                 runner=self.runner))
        else:
            self.decode_path = f"decode path: the model's own FastChat generate function ({stream_func.__name__})"
            stream_func = self.engine.streamer(stream_func, batched=False)  # chunk by chunk, in turns
        logger.info(self.decode_path)
        self.generate_stream_func = report_failures(guard_out_of_memory(stream_func))
        self.stream_interval = stream_interval
        self.embed_in_truncate = embed_in_truncate
        self.seed = seed
        if not conv_template:
            self.conv = conversation_for(model_path, self.tokenizer, logger)
            self.conv.sep_style = int(self.conv.sep_style)
        logger.info("Prompt template: %s", self.conv.name)
        # Registration waits until the HTTP server listens (register_when_listening):
        # upstream registers first, and a controller refresh in that gap drops the
        # worker until its next heartbeat, which users see as error 40301.
        self.no_register = no_register

    def generate_stream_gate(self, params):
        try:
            yield from super().generate_stream_gate(params)
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
