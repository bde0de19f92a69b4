"""``python -m fastchat_bigdl.model_worker``: FastChat's model worker plus ``--bigdl_load``.

Every flag of ``fastchat.serve.model_worker`` is accepted (its own parser is reused),
plus the low-bit flags below. Without ``--bigdl_load`` the upstream worker runs
unchanged; with it, FastChat's ``ModelWorker`` (same FastAPI app, heartbeat and
controller registration) serves a model loaded through ipex-llm / bigdl-llm.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import runpy
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional
from unittest import mock

import requests
import fastchat_bigdl  # registers the adapter and keeps proxies off loopback
from fastchat.constants import ErrorCode
from fastchat.model.model_adapter import get_generate_stream_function
from fastchat.serve import model_worker as upstream
from fastchat.serve.inference import generate_stream as fastchat_generate_stream
from fastchat.serve.base_model_worker import BaseModelWorker, app
from fastchat.utils import get_context_length

from fastchat_bigdl.adapter import conversation_for
from fastchat_bigdl.admission import AdmissionControl
from fastchat_bigdl.app_runner import run_app
from fastchat_bigdl.backend import BACKEND_ENV, LIBRARIES, BackendError, resolve_backend
from fastchat_bigdl.devices import (
    SUPPORTED_DEVICES,
    DeviceUnavailable,
    empty_cache,
    use_physical_cores,
    load_dtype,
    place_model,
    prepare_device,
)
from fastchat_bigdl.generation import generate_stream
from fastchat_bigdl.kv_cache import PrefixCache
from fastchat_bigdl.loader import DEFAULT_LOW_BIT, UnsupportedModel
from fastchat_bigdl.low_bit_cache import LowBitCache
from fastchat_bigdl.paths import low_bit_cache_dir
from fastchat_bigdl.validation import WORKER_CHECKS, ValidateRequests
from fastchat_bigdl.worker_routes import extra_worker_routes
from fastchat_bigdl.oom import DeviceOutOfMemory, guard_out_of_memory, out_of_memory_advice

logger = logging.getLogger("fastchat_bigdl.model_worker")

DEFAULT_PREFIX_CACHE_MB = 1024
DEFAULT_MAX_QUEUED = 64

# Upstream options that select another loader; they cannot be combined with --bigdl_load.
CONFLICTING_OPTIONS = {
    "load_8bit": "--load-8bit",
    "cpu_offloading": "--cpu-offloading",
    "enable_exllama": "--enable-exllama",
    "enable_xft": "--enable-xft",
}


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
        prefix_cache_mb: int = 0,
        revision: str = "main",
        conv_template: Optional[str] = None,
        stream_interval: int = 2,
        embed_in_truncate: bool = False,
        seed: Optional[int] = None,
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
        model, self.tokenizer = fastchat_bigdl.bigdl_adapter.load_model(
            model_path,
            {
                "low_bit": low_bit,
                "torch_dtype": load_dtype(device),
                "revision": revision,
                "trust_remote_code": trust_remote_code,
                "optimize_model": optimize_model,
                "backend": resolve_backend(low_bit_backend),
                "cache": LowBitCache(Path(low_bit_cache)) if low_bit_cache else None,
            },
        )
        self.model = place_model(model, device)
        self.device = device
        self.low_bit = low_bit
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.context_len = get_context_length(self.model.config)
        self.prefix_cache = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
        stream_func = get_generate_stream_function(self.model, model_path)
        if stream_func is fastchat_generate_stream:  # decoder-only LMs: our loop, same contract
            stream_func = functools.partial(generate_stream, prefix_cache=self.prefix_cache,
                                            model_lock=threading.Lock())
        self.generate_stream_func = guard_out_of_memory(stream_func)
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


def upstream_parser() -> argparse.ArgumentParser:
    """FastChat's worker parser, with all its flags (present and future, no copy).

    ``create_model_worker()`` builds its parser and parses straight away; it is
    stopped at that point, before anything is loaded, to keep the parser.
    """

    class _Captured(Exception):
        pass

    captured: List[argparse.ArgumentParser] = []

    def capture(parser, *args, **kwargs):
        captured.append(parser)
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            upstream.create_model_worker()
        except _Captured:
            pass
    return captured[0]


def low_bit_choices() -> Optional[List[str]]:
    try:
        return list(resolve_backend().qtypes)
    except BackendError:
        return None  # reported when --bigdl_load is used


def add_bigdl_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("fastchat-bigdl low-bit loading")
    group.add_argument(
        "--bigdl_load",
        "--bigdl-load",
        action="store_true",
        help="Load the model through the low-bit library (ipex-llm / bigdl-llm). "
        "Use with --device cpu or --device xpu (Intel GPU).",
    )
    group.add_argument(
        "--low-bit",
        default=None,
        choices=low_bit_choices(),
        help=f"Low-bit weight format (default {DEFAULT_LOW_BIT}).",
    )
    group.add_argument(
        "--low-bit-backend",
        default=None,
        choices=list(LIBRARIES),
        help=f"Which low-bit library to use (default: ${BACKEND_ENV}, else ipex-llm if "
        "installed, else bigdl-llm).",
    )
    group.add_argument(
        "--low-bit-cache",
        default=None,
        metavar="DIR",
        help=f"Keep converted low-bit weights here, so later starts skip conversion "
        f"(default {low_bit_cache_dir()}).",
    )
    group.add_argument(
        "--no-low-bit-cache",
        action="store_true",
        help="Convert on every start; read and write no low-bit cache.",
    )
    group.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=DEFAULT_PREFIX_CACHE_MB,
        metavar="MB",
        help="Memory budget for reusing the KV cache of earlier requests whose tokens a new "
        f"prompt starts with (agent chats resend their history); 0 disables (default {DEFAULT_PREFIX_CACHE_MB}).",
    )
    group.add_argument(
        "--max-queued-requests",
        type=int,
        default=DEFAULT_MAX_QUEUED,
        metavar="N",
        help="Requests that may wait for a free slot (beyond --limit-worker-concurrency); more "
        f"are answered at once with FastChat's overload error 42903 (default {DEFAULT_MAX_QUEUED}).",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow the model's own Python code from its repository (off by default).",
    )
    group.add_argument(
        "--no-optimize-model",
        action="store_true",
        help="Skip the library's model optimizations (on where the installed "
        "transformers supports them).",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = upstream_parser()
    parser.prog = "python -m fastchat_bigdl.model_worker"
    return add_bigdl_args(parser)


def own_options_given(argv: List[str]) -> List[str]:
    own = add_bigdl_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    known, _ = own.parse_known_args(argv)
    defaults = vars(own.parse_args([]))
    return [own_option(own, dest) for dest, value in vars(known).items() if value != defaults[dest]]


def own_option(parser: argparse.ArgumentParser, dest: str) -> str:
    return next(a.option_strings[0] for a in parser._actions if a.dest == dest)


def run_upstream(argv: List[str]) -> None:
    """Run fastchat.serve.model_worker exactly as ``python -m`` would."""
    sys.argv = ["fastchat.serve.model_worker", *argv]
    with warnings.catch_warnings():
        # It was imported to read its parser; running it as __main__ is still intended.
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("fastchat.serve.model_worker", run_name="__main__", alter_sys=True)


def validate_bigdl_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device not in SUPPORTED_DEVICES:
        parser.error(f"--bigdl_load runs on --device cpu or xpu, not {args.device!r}")
    for dest, flag in CONFLICTING_OPTIONS.items():
        if getattr(args, dest, False):
            parser.error(f"{flag} selects another loader and cannot be combined with --bigdl_load")
    if getattr(args, "gptq_wbits", 16) < 16 or getattr(args, "awq_wbits", 16) < 16:
        parser.error("GPTQ/AWQ checkpoints cannot be combined with --bigdl_load")
    if args.num_gpus != 1:
        parser.error("--bigdl_load serves on one device; start one worker per GPU instead")


def create_bigdl_worker(args: argparse.Namespace) -> BigDLModelWorker:
    return BigDLModelWorker(
        args.controller_address,
        args.worker_address,
        upstream.worker_id,
        args.model_path,
        args.model_names,
        args.limit_worker_concurrency,
        no_register=args.no_register,
        device=args.device,
        low_bit=args.low_bit or DEFAULT_LOW_BIT,
        low_bit_backend=args.low_bit_backend,
        trust_remote_code=args.trust_remote_code,
        optimize_model=False if args.no_optimize_model else None,
        low_bit_cache=None if args.no_low_bit_cache else (args.low_bit_cache or str(low_bit_cache_dir())),
        prefix_cache_mb=args.prefix_cache_mb,
        revision=args.revision,
        conv_template=args.conv_template,
        stream_interval=args.stream_interval,
        embed_in_truncate=args.embed_in_truncate,
        seed=args.seed,
    )


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Upstream defaults --device to cuda; in low-bit mode an unset device means cpu.
    parser = build_parser()
    parser.set_defaults(device=None)
    args = parser.parse_args(argv)
    if not args.bigdl_load:
        given = own_options_given(argv)
        if given:
            parser.error(f"{', '.join(given)} only applies with --bigdl_load")
        return run_upstream(argv)

    args.device = args.device or "cpu"
    validate_bigdl_args(parser, args)
    use_physical_cores()
    try:
        worker = create_bigdl_worker(args)
    except (BackendError, DeviceUnavailable, UnsupportedModel, ValueError, OSError) as exc:
        logger.error("cannot start the worker: %s", exc)
        print(f"{parser.prog}: error: {exc}", file=sys.__stderr__, flush=True)
        sys.exit(2)
    worker.register_when_listening(args.host, args.port)
    app.include_router(extra_worker_routes(worker))
    app.add_middleware(ValidateRequests, checks=WORKER_CHECKS)
    app.add_middleware(AdmissionControl, worker=worker, max_queued=args.max_queued_requests)
    run_app(app, args)


if __name__ == "__main__":
    main()
