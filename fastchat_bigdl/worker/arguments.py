"""The worker's command line: FastChat's own worker parser (captured, not copied) plus the
low-bit flags, and the checks of combinations that cannot work."""
from __future__ import annotations

import argparse
from typing import List, Optional
from unittest import mock

from fastchat.serve import model_worker as upstream

from fastchat_bigdl.common.paths import low_bit_cache_dir
from fastchat_bigdl.engine.selection import DEFAULT_KV_CACHE_DTYPE, FORWARDS, KV_CACHE_DTYPES, PREFILL_RECIPES
from fastchat_bigdl.lowbit.backend import BACKEND_ENV, LIBRARIES, BackendError, resolve_backend
from fastchat_bigdl.lowbit.devices import SUPPORTED_DEVICES
from fastchat_bigdl.lowbit.formats import UnsupportedFormat, check_format, formats_help
from fastchat_bigdl.lowbit.loader import DEFAULT_LOW_BIT

DEFAULT_MAX_QUEUED = 64
# --limit-worker-concurrency with --bigdl_load (FastChat's own default is 5): the engine
# batches the decode steps of the streams that run, up to 16 rows a kernel call.
DEFAULT_CONCURRENCY = 16

# Upstream options that select another loader; they cannot be combined with --bigdl_load.
CONFLICTING_OPTIONS = {
    "load_8bit": "--load-8bit",
    "cpu_offloading": "--cpu-offloading",
    "enable_exllama": "--enable-exllama",
    "enable_xft": "--enable-xft",
}


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


def low_bit_help() -> str:
    try:
        per_device = f" Formats that run: {formats_help(resolve_backend())}."
    except BackendError:
        per_device = ""
    return f"Low-bit weight format (default {DEFAULT_LOW_BIT}).{per_device}"


def add_bigdl_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("fastchat-bigdl low-bit loading")
    _add_loading_args(group)
    _add_serving_args(group)
    return parser


def _add_loading_args(group) -> None:
    """How the model is loaded and converted."""
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
        metavar="FORMAT",
        help=low_bit_help(),
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


def _add_serving_args(group) -> None:
    """How the loaded model serves: caches, queueing, the forward pass."""
    group.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=None,
        metavar="MB",
        help="Memory budget for reusing the KV cache of earlier requests whose tokens a new "
        "prompt starts with (agent chats resend their history); 0 disables (default on CPU: one "
        "full context of the model's KV, at least 1024 and at most a quarter of the machine's "
        "memory; on xpu 1024).",
    )
    group.add_argument(
        "--kv-budget-mb",
        type=int,
        default=None,
        metavar="MB",
        help="Memory for KV caches: running requests reserve theirs (prompt + max_tokens) against it "
        "and wait while it is full, the prefix cache gives way to them; a request larger than all of it "
        "gets error 40303 (default: 60%% of the memory available after loading, within any cgroup "
        "limit; 0: no limit).",
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
        "--forward",
        default="auto",
        choices=FORWARDS,
        help="Which forward pass decodes: 'lean' is this package's runner for Llama, Mistral, "
        "Qwen2/3, Phi-3 and Gemma 2/3 models on CPU (faster; greedy output independent of batching and "
        "prefix reuse), 'hf' the Hugging Face forward; 'auto' (default) takes the lean runner where it "
        "covers the model.",
    )
    group.add_argument(
        "--prefill-recipe",
        default="auto",
        choices=PREFILL_RECIPES,
        help="How the lean runner's prompt blocks multiply by sym_int4 weights: 'kernel' (the "
        "library's int4 kernel), 'bf16' or 'fp32' (dequantize, then one dense GEMM); 'auto' "
        "(default) times them at start-up and logs the numbers.",
    )
    group.add_argument(
        "--kv-cache-dtype",
        default=DEFAULT_KV_CACHE_DTYPE,
        choices=tuple(KV_CACHE_DTYPES),
        help="What the lean runner's KV caches hold: 'bf16' (default: half of fp32's memory), 'fp32', "
        "or 'int8' (a quarter of fp32's plus one scale per position and head; attention converts the "
        "context it reads, so long contexts decode slower). The Hugging Face forward keeps its own cache.",
    )


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
    try:  # before anything is converted: a format the device cannot run fails every request
        check_format(resolve_backend(args.low_bit_backend), args.device, args.low_bit or DEFAULT_LOW_BIT)
    except (BackendError, UnsupportedFormat) as exc:
        parser.error(str(exc))
