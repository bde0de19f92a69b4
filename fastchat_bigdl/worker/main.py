"""``python -m fastchat_bigdl.model_worker``: FastChat's model worker plus ``--bigdl_load``.

Every flag of ``fastchat.serve.model_worker`` is accepted (its own parser is reused),
plus the low-bit flags (``arguments``). Without ``--bigdl_load`` the upstream worker
runs unchanged; with it, ``BigDLModelWorker`` serves a model loaded through ipex-llm /
bigdl-llm, behind request checks and bounded queueing.
"""
from __future__ import annotations

import argparse
import logging
import runpy
import sys
import traceback
import warnings
from typing import List, NoReturn, Optional

from fastchat.serve import model_worker as upstream
from fastchat.serve.base_model_worker import app

from fastchat_bigdl.adapter import register
from fastchat_bigdl.common.app_runner import run_app
from fastchat_bigdl.common.logs import log_to_file, plain_console
from fastchat_bigdl.common.netenv import bypass_proxy_for_loopback
from fastchat_bigdl.common.paths import low_bit_cache_dir
from fastchat_bigdl.common.validation import ValidateRequests
from fastchat_bigdl.lowbit.backend import BackendError
from fastchat_bigdl.lowbit.devices import DeviceUnavailable, use_physical_cores
from fastchat_bigdl.lowbit.gguf_checkpoint import ensure_checkpoint, is_gguf, served_name, suggested_low_bit
from fastchat_bigdl.lowbit.loader import DEFAULT_LOW_BIT, UnsupportedModel
from fastchat_bigdl.worker.admission import AdmissionControl
from fastchat_bigdl.worker.arguments import DEFAULT_CONCURRENCY, build_parser, own_options_given, validate_bigdl_args
from fastchat_bigdl.worker.bigdl_worker import BigDLModelWorker
from fastchat_bigdl.worker.request_checks import WORKER_CHECKS
from fastchat_bigdl.worker.routes import extra_worker_routes

logger = logging.getLogger("fastchat_bigdl.model_worker")


def run_upstream(argv: List[str]) -> None:
    """Run fastchat.serve.model_worker exactly as ``python -m`` would."""
    sys.argv = ["fastchat.serve.model_worker", *argv]
    with warnings.catch_warnings():
        # It was imported to read its parser; running it as __main__ is still intended.
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("fastchat.serve.model_worker", run_name="__main__", alter_sys=True)


def create_bigdl_worker(args: argparse.Namespace) -> BigDLModelWorker:
    model_path, model_names, low_bit = args.model_path, args.model_names, args.low_bit or DEFAULT_LOW_BIT
    if is_gguf(model_path):  # converted once into a cached Hugging Face checkpoint
        model_names = model_names or [served_name(model_path)]
        gguf_path, model_path = model_path, str(ensure_checkpoint(model_path))
        if not args.low_bit:
            low_bit, why = suggested_low_bit(model_path)
            logger.info("Serving %s as %s: %s (--low-bit chooses another)", gguf_path, low_bit, why)
    return BigDLModelWorker(
        args.controller_address,
        args.worker_address,
        upstream.worker_id,
        model_path,
        model_names,
        args.limit_worker_concurrency,
        no_register=args.no_register,
        device=args.device,
        low_bit=low_bit,
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
        forward=args.forward,
        prefill_recipe=args.prefill_recipe,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_budget_mb=args.kv_budget_mb,
    )


def refuse_to_start(prog: str, why: str) -> NoReturn:
    """One line on the real console (FastChat reroutes stderr through its logger), exit 2."""
    logger.error("cannot start the worker: %s", why)
    print(f"{prog}: error: {why}", file=sys.__stderr__, flush=True)
    sys.exit(2)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Upstream defaults --device to cuda; in low-bit mode an unset device means cpu.
    parser = build_parser()
    # Upstream's defaults, unless low-bit mode has its own: an unset device means cpu there,
    # and the engine batches concurrent streams, so more may run at once.
    parser.set_defaults(device=None, limit_worker_concurrency=None)
    with plain_console():
        args = parser.parse_args(argv)
        given = [] if args.bigdl_load else own_options_given(argv)
        if given:
            parser.error(f"{', '.join(given)} only applies with --bigdl_load")
        if args.bigdl_load:
            args.device = args.device or "cpu"
            if args.limit_worker_concurrency is None:
                args.limit_worker_concurrency = DEFAULT_CONCURRENCY
            validate_bigdl_args(parser, args)
    log_path = log_to_file(f"model_worker_{upstream.worker_id}.log")
    bypass_proxy_for_loopback()  # before any HTTP client exists: no proxy sees loopback traffic
    register()  # a `-bigdl` model directory loads low-bit in upstream mode too
    if not args.bigdl_load:
        return run_upstream(argv)

    use_physical_cores()
    try:
        worker = create_bigdl_worker(args)
    except (BackendError, DeviceUnavailable, UnsupportedModel, ValueError, OSError) as exc:
        refuse_to_start(parser.prog, str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. a damaged checkpoint: one line, the traceback in the log
        with open(log_path, "a", encoding="utf-8") as log:
            traceback.print_exc(file=log)
        lines = str(exc).strip().splitlines()
        refuse_to_start(parser.prog, f"cannot load {args.model_path}: {type(exc).__name__}"
                                     f"{': ' + lines[0] if lines else ''} (traceback in {log_path})")
    worker.register_when_listening(args.host, args.port)
    app.include_router(extra_worker_routes(worker))
    app.add_middleware(ValidateRequests, checks=WORKER_CHECKS)
    app.add_middleware(AdmissionControl, worker=worker, max_queued=args.max_queued_requests)
    run_app(app, args)
