"""``fastchat-bigdl bench``: this package's low-bit worker side by side with FastChat's
stock worker on the same model, measured through the OpenAI API over real HTTP, and with
``--against llama-cpp`` also llama.cpp (``bench.llama_cpp_peer``): on the demo model's GGUF, or
with ``--shape`` on the bench model exported to Q4_0 (``bench.gguf_export``).

Everything runs one after the other (never at once), the stacks as the same three
FastChat processes ``serve`` starts, so the numbers compare like with like on a quiet
machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional

from fastchat_bigdl.bench.measure import measure_bandwidth, measure_stack
from fastchat_bigdl.bench.random_model import (DEFAULT_SHAPE, QUICK_SHAPE, SHAPE_7B, SHAPES, LlamaShape,
                                               build_random_llama)
from fastchat_bigdl.bench.report import (baseline, compare, compare_with_peer, compare_with_profile, format_table,
                                         plot, summarize, targets)
from fastchat_bigdl.bench.settings import (CONV_TEMPLATE, LLAMA_CPP, OURS, BenchSettings, stock_label,
                                           token_counter)
from fastchat_bigdl.common.paths import cache_dir


def run(s: BenchSettings, progress: Callable[[str], None] = print, measure_peer=None) -> dict:
    """``measure_peer``: how llama.cpp is measured (default: ``llama_cpp_peer.measure``)."""
    s.out_dir.mkdir(parents=True, exist_ok=True)
    # This process tokenizes, then starts stacks: without this, a fork warning per start.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shape = s.shape
    if s.model_path:
        model_path = s.model_path.rstrip("/")
    else:
        name = f"bench-llama-{shape.params // 1_000_000}m"
        progress(f"building the benchmark model {name} ({shape.params / 1e6:.0f} M params, random weights) ...")
        # bf16 for the 7B shape: 13 GB to write and read instead of 27 (and what such models ship in)
        dtype = "bfloat16" if shape.params >= SHAPE_7B.params // 2 else "float32"
        model_path = str(build_random_llama(cache_dir() / "bench-models" / name, shape, dtype=dtype,
                                            progress=progress))
    model_name = os.path.basename(model_path)
    count = token_counter(s, model_path)
    progress("measuring memory bandwidth ...")
    bandwidth = measure_bandwidth()
    progress(f"  {bandwidth:.1f} GB/s")
    results = {OURS: measure_stack(s, model_path, model_name, s.low_bit, starts=2, count=count, progress=progress)}
    for dtype in s.stock_dtypes:
        results[stock_label(dtype)] = measure_stack(s, model_path, model_name, None, starts=1, count=count,
                                                    progress=progress, stock_dtype=dtype)
    if "llama-cpp" in s.against:
        from fastchat_bigdl.bench import llama_cpp_peer

        gguf_path, peer_args = s.gguf_path, {}
        if not gguf_path:  # the bench model: the same weights in Q4_0, prompts tokenized here
            from fastchat_bigdl.bench.gguf_export import export_gguf

            progress(f"exporting {model_name} to GGUF Q4_0 for llama.cpp ...")
            gguf_path = str(export_gguf(Path(model_path), Path(model_path).with_suffix(".q4_0.gguf"),
                                        progress=progress))
            peer_args = {"encode": llama_cpp_peer.chat_prompt_ids(model_path, s.conv_template), "count": count}
        results[LLAMA_CPP] = (measure_peer or llama_cpp_peer.measure)(s, gguf_path, progress, **peer_args)
    profile = None
    if s.profile:
        from fastchat_bigdl.bench.profile import run_profile

        progress("profiling one generated token in-process (linears, attention, other ops, token loop) ...")
        profile = run_profile(model_path, s.low_bit, s.out_dir / "profile.json", prompt_tokens=s.prompt_tokens)
    kv_cache = None
    if s.kv_cache:
        from fastchat_bigdl.bench.kv_cache_compare import run_kv_cache_compare

        progress("comparing the KV cache types in-process (greedy agreement, logit error, decode time) ...")
        kv_cache = run_kv_cache_compare(model_path, s.low_bit, s.out_dir / "kv_cache.json")
    report = {
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_description(), "platform": platform.platform(),
                    "python": platform.python_version(), "bandwidth_gbs": bandwidth},
        "model": {"name": model_name, "path": model_path, "shape": asdict(shape), "params": shape.params},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items() if k != "shape"},
        "stacks": {label: summarize(r, shape, bandwidth) for label, r in results.items()},
    }
    report["baseline"] = baseline(report["stacks"])
    report["ratios"] = compare(report["stacks"][OURS], report["stacks"].get(report["baseline"]))
    if kv_cache is not None:
        report["kv_cache"] = kv_cache
    if profile is not None:
        report["profile"] = profile
        report["ratios"].update(compare_with_profile(report["stacks"][OURS], profile))
    if LLAMA_CPP in report["stacks"]:
        report["vs_llama_cpp"] = compare_with_peer(report["stacks"][OURS], report["stacks"][LLAMA_CPP])
        report["llama_cpp"] = {"version": llama_cpp_peer.llama_cpp_version(), "gguf": gguf_path}
    report["targets"] = targets(report)
    (s.out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, s.out_dir / "bench.png")
    return report


def cpu_description() -> str:
    """The CPU model and the instruction sets the low-bit kernels care about."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("unknown CPU", platform.processor()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def shape_of_model(model_path: str) -> LlamaShape:
    config = json.loads((Path(model_path) / "config.json").read_text())
    heads = config["num_attention_heads"]
    return LlamaShape(config["hidden_size"], config["num_hidden_layers"], heads,
                      config.get("num_key_value_heads", heads), config["intermediate_size"],
                      config["vocab_size"], config.get("max_position_embeddings", 2048),
                      tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                      rope_theta=float(config.get("rope_theta", 10000.0)))


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None,
                        help="A Llama-architecture checkpoint (default: a ~374 M random Llama built locally)")
    parser.add_argument("--shape", choices=list(SHAPES), default=None,
                        help="The random-weight model's shape without --model-path: 374m (default), 1.1b "
                             "(TinyLlama's), 7b (Llama-2-7B's, written in bf16 a layer at a time), llama3.2-1b "
                             "and qwen2.5-0.5b (vocabularies of 128k/152k, tied embeddings), quick")
    parser.add_argument("--low-bit", default="sym_int4")
    parser.add_argument("--quick", action="store_true", help="A small model and short runs (well under a minute)")
    parser.add_argument("--turns", type=int, default=None, help="Agent replay turns (default 10; --quick 3)")
    parser.add_argument("--out", default="bench-results", help="Directory for bench.json, bench.png and logs")
    parser.add_argument("--against", choices=["llama-cpp"], action="append", default=[],
                        help="Also measure llama.cpp (llama-cpp-python) on the same model: by default the demo "
                             "model's own GGUF against this package serving the checkpoint converted from it; "
                             "with --shape the bench model exported to GGUF Q4_0")
    parser.add_argument("--profile", action="store_true",
                        help="Also break one generated token's time down in-process (low-bit linears, attention, "
                             "other ops, the token loop) and relate the API's decode speed to it")
    parser.add_argument("--kv-cache", action="store_true",
                        help="Also compare the lean runner's KV cache types (fp32, bf16, int8) in-process: greedy "
                             "agreement and logit error against fp32, decode time at 128 and 1024 positions, bytes")
    parser.add_argument("--concurrency", default=None, metavar="N,N,...",
                        help="Streams at once for the concurrency sweep of this package's stack "
                             "(default 1,2,4,8,16; --quick 1,2; 0 skips it)")
    parser.add_argument("--stock-dtypes", default=None, metavar="DTYPE,...",
                        help="Stock FastChat's dtypes, measured in order (default float32; with --shape 7b "
                             "float32,bfloat16: fp32 does not fit in 24 GB and is stopped by a memory watchdog; "
                             "none: this package alone)")
    parser.add_argument("--long-prompt", type=int, default=None, metavar="TOKENS",
                        help="Also the time to first token of one prompt this long (default 0; --shape 7b 1000)")
    parser.add_argument("--agent-chat", type=int, default=None, metavar="TURNS",
                        help="Also run an AutoGen two-agent chat (autogen-agentchat) against this package's stack "
                             "and time its turns (default 0; --shape 7b 5; needs autogen-agentchat: the autogen extra)")
    parser.add_argument("--long-chat", type=int, default=None, metavar="TOKENS",
                        help="Also grow an agent chat (whole history sent each turn) to this many tokens against "
                             "this package's stack, with the worker's peak memory over it (default 0; --shape 7b 4000)")
    parser.add_argument("--memory-cgroup", type=float, default=None, metavar="GIB",
                        help="Run this package's worker inside a memory cgroup this big (the kernel enforces it as "
                             "on a machine that small; needs root or a delegated cgroup)")
    parser.add_argument("--gguf", default=None,
                        help="The GGUF llama.cpp runs (default with --against llama-cpp: the demo model's); "
                             "--model-path must then be the same model as a Hugging Face checkpoint")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    quick = args.quick
    model_path, gguf, against = args.model_path, args.gguf, tuple(args.against)
    if "llama-cpp" in against and not gguf and not getattr(args, "shape", None):
        if model_path:
            raise SystemExit("fastchat-bigdl bench: --against llama-cpp with --model-path needs --gguf "
                             "(the same model as a GGUF)")
        from fastchat_bigdl.stack.demo_model import demo_gguf_path, ensure_demo_model

        gguf, model_path = str(demo_gguf_path()), str(ensure_demo_model())
    real_model = bool(model_path)
    if model_path:
        shape = shape_of_model(model_path)
    else:
        shape = SHAPES[args.shape] if getattr(args, "shape", None) else (QUICK_SHAPE if quick else DEFAULT_SHAPE)
    big = shape.params >= SHAPE_7B.params // 2  # seconds a token for stock: fewer, shorter runs

    def option(name: str, default):
        given = getattr(args, name, None)
        return default if given is None else given

    return BenchSettings(
        shape=shape, model_path=model_path, low_bit=args.low_bit,
        prompt_tokens=32 if quick else 128, max_tokens=16 if quick else (32 if big else 64),
        repeats=1 if quick or big else 3,
        turns=args.turns or (3 if quick else 10), turn_tokens=16 if quick else 48,
        turn_max_tokens=8 if quick else 32, out_dir=Path(args.out),
        # A real model answers best in its own template (llama.cpp uses the GGUF's, too).
        conv_template=None if real_model else CONV_TEMPLATE,
        prompt_style="english" if real_model else "words",
        against=against, gguf_path=gguf, profile=args.profile, kv_cache=getattr(args, "kv_cache", False),
        concurrency=concurrency_levels(args.concurrency, quick) if args.concurrency or not big else (1, 4),
        stock_dtypes=stock_dtypes(option("stock_dtypes", "float32,bfloat16" if big else "float32")),
        long_prompt_tokens=option("long_prompt", 1000 if big else 0),
        agent_chat_turns=option("agent_chat", 5 if big else 0),
        long_chat_tokens=option("long_chat", 4000 if big else 0),
        memory_cgroup_mb=args.memory_cgroup * 1024 if getattr(args, "memory_cgroup", None) else None,
    )


def stock_dtypes(text: str) -> tuple:
    """``none``: no stock stack (this package alone, e.g. to re-measure it at 7B)."""
    if text.strip() == "none":
        return ()
    dtypes = tuple(part.strip() for part in text.split(",") if part.strip())
    wrong = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if wrong or not dtypes:
        raise SystemExit("fastchat-bigdl bench: --stock-dtypes takes float32, bfloat16, float16 or none, "
                         f"not {text!r}")
    return dtypes


def concurrency_levels(text: Optional[str], quick: bool) -> tuple:
    if text is None:
        return (1, 2) if quick else (1, 2, 4, 8, 16)
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SystemExit(f"fastchat-bigdl bench: --concurrency takes numbers like 1,2,4,8, not {text!r}")
    if any(n < 0 for n in levels):
        raise SystemExit("fastchat-bigdl bench: --concurrency levels must be positive")
    return tuple(n for n in levels if n > 0)


def main_args(args: argparse.Namespace) -> int:
    s = settings_from_args(args)
    peers = f" and {LLAMA_CPP} ({os.path.basename(s.gguf_path or 'the bench model in Q4_0')})" if s.against else ""
    stocks = " and ".join(f"{stock_label(d)} ({d})" for d in s.stock_dtypes) or "no stock stack"
    print(f"fastchat-bigdl bench: {OURS} ({s.low_bit}) vs {stocks}{peers}, results in {s.out_dir}", flush=True)
    if s.against:
        from fastchat_bigdl.bench.llama_cpp_peer import INSTALL_HINT, llama_cpp_version

        if llama_cpp_version() is None:
            print(f"fastchat-bigdl bench: --against llama-cpp needs llama-cpp-python: {INSTALL_HINT}", file=sys.stderr)
            return 2
    if s.memory_cgroup_mb:
        from fastchat_bigdl.bench.memory_cgroup import CgroupUnavailable, MemoryCgroup

        try:
            MemoryCgroup(f"fastchat-bigdl-bench-probe-{os.getpid()}", s.memory_cgroup_mb).remove()
        except CgroupUnavailable as exc:
            print(f"fastchat-bigdl bench: --memory-cgroup: {exc}", file=sys.stderr)
            return 2
    report = run(s, progress=lambda line: print(line, flush=True))
    print()
    print(format_table(report))
    print(f"\nwrote {s.out_dir / 'bench.json'} and {s.out_dir / 'bench.png'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastchat-bigdl bench", description=__doc__)
    add_bench_args(parser)
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
