"""``fastchat-bigdl bench``: this package's low-bit worker side by side with FastChat's
stock worker on the same model, measured through the OpenAI API over real HTTP, and with
``--against llama-cpp`` also llama.cpp on the demo model's GGUF (``bench_llama_cpp``).

Everything runs one after the other (never at once), the stacks as the same three
FastChat processes ``serve`` starts, so the numbers compare like with like on a quiet
machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import requests

from fastchat_bigdl.bench_model import DEFAULT_SHAPE, QUICK_SHAPE, LlamaShape, build_random_llama, words
from fastchat_bigdl.paths import cache_dir
from fastchat_bigdl.serve import Stack, free_port

OURS, STOCK = "fastchat-bigdl", "stock-fastchat"
LLAMA_CPP = "llama.cpp"
# Same prompt format for both stacks, so both prefill the same number of tokens.
CONV_TEMPLATE = "vicuna_v1.1"
SYSTEM = "A chat between a user and an assistant."
# Bytes read per weight for each low-bit format (ggml block layouts: data + scales).
BYTES_PER_WEIGHT = {
    "sym_int4": 18 / 32, "asym_int4": 20 / 32, "sym_int5": 22 / 32, "asym_int5": 24 / 32,
    "sym_int8": 34 / 32, "nf4": 18 / 32, "nf3": 14 / 32, "fp4": 18 / 32, "fp6": 26 / 32,
    "fp8": 33 / 32, "fp8_e4m3": 33 / 32, "fp8_e5m2": 33 / 32, "fp16": 2.0, "bf16": 2.0, None: 4.0,
    "q4_1": 20 / 32,  # llama.cpp's Q4_1: 16 bytes of nibbles + fp16 scale + fp16 min per 32
}
# Plain English for real tokenizers (the demo model); the bench model has its own words.
ENGLISH = ("the a of and to in is was for on that with as by at from it an be this which or are have had not "
           "but one all were when there can more if out so up said what its about into than them only "
           "other new some could time these two may first then do any like my now over such our man me "
           "even most made after also did many before must through back years where much your way well "
           "down should because each just those people how too little state good very make world still "
           "own see men work long get here between both life being under never day same another know "
           "while last might us great old year off come since against go came right used take three").split()


@dataclass
class BenchSettings:
    shape: LlamaShape
    model_path: Optional[str]
    low_bit: str
    prompt_tokens: int
    max_tokens: int
    repeats: int
    turns: int
    turn_tokens: int
    turn_max_tokens: int
    out_dir: Path
    ready_timeout: float = 900
    conv_template: Optional[str] = CONV_TEMPLATE  # None: each stack uses the model's own template
    prompt_style: str = "words"  # "words": the bench tokenizer's; "english": for a real tokenizer
    against: Tuple[str, ...] = ()
    gguf_path: Optional[str] = None
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


def prompt(s: BenchSettings, n: int, seed: int) -> str:
    if s.prompt_style == "words":
        return words(n, seed, s.shape.vocab)
    rng = random.Random(seed)
    return " ".join(rng.choice(ENGLISH) for _ in range(n))


def token_counter(s: BenchSettings, model_path: str) -> Callable[[str], int]:
    """Tokens in a text, the same way for every stack: the bench tokenizer has one token
    per word; a real model's tokenizer counts for itself."""
    if s.prompt_style == "words":
        return lambda text: len(text.split())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


@dataclass
class StackResult:
    label: str
    low_bit: Optional[str]
    starts_s: List[float] = field(default_factory=list)
    load_s: List[float] = field(default_factory=list)
    decode: List[dict] = field(default_factory=list)
    replay: List[dict] = field(default_factory=list)
    peak_rss_mb: Optional[float] = None


def measure_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Memory copy bandwidth in GB/s (bytes read + written), best of ``repeats``."""
    import numpy as np

    src = np.ones(mb * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def stream_chat(base_url: str, model: str, messages: List[dict], max_tokens: int) -> Tuple[float, float, str]:
    """(time to first token, total time, text) of one streamed chat completion."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first, text = None, ""
    with requests.post(base_url + "/chat/completions", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error_code" in chunk:
                raise RuntimeError(f"the server answered an error: {chunk}")
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter()
                text += delta
    ended = time.perf_counter()
    return (first or ended) - started, ended - started, text


def peak_rss_mb(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def worker_load_seconds(log: str) -> Optional[float]:
    match = re.findall(r"(?:Converted|Loaded cached) .* in ([0-9.]+) s", log)
    return float(match[-1]) if match else None


Chat = Callable[[List[dict], int], Tuple[float, float, str]]  # (messages, max_tokens) -> ttft, total, text


def decode_runs(s: BenchSettings, chat: Chat, count: Callable[[str], int], progress) -> List[dict]:
    runs = []
    for i in range(s.repeats):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt(s, s.prompt_tokens, 1000 + i)}]
        ttft, total, text = chat(messages, s.max_tokens)
        tokens = count(text)
        runs.append({"ttft_s": ttft, "total_s": total, "tokens": tokens,
                     "tok_s": (tokens - 1) / (total - ttft) if tokens > 1 and total > ttft else None})
        progress(f"    decode run {i + 1}/{s.repeats}: {tokens} tokens, "
                 f"ttft {ttft * 1000:.0f} ms, {runs[-1]['tok_s'] or 0:.1f} tok/s")
    return runs


def agent_replay(s: BenchSettings, chat: Chat, count: Callable[[str], int], progress) -> List[dict]:
    """A two-agent chat replayed the way AutoGen sends it: the whole history every turn."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt(s, s.prompt_tokens, 1)}]
    turns = []
    for turn in range(1, s.turns + 1):
        history_tokens = sum(count(m["content"]) for m in messages)
        ttft, total, text = chat(messages, s.turn_max_tokens)
        turns.append({"turn": turn, "history_tokens": history_tokens, "ttft_s": ttft, "latency_s": total,
                      "tokens": count(text)})
        progress(f"    replay turn {turn}/{s.turns}: history {history_tokens} tokens, ttft {ttft * 1000:.0f} ms")
        messages.append({"role": "assistant", "content": text})
        messages.append({"role": "user", "content": prompt(s, s.turn_tokens, 100 + turn)})
    return turns


def measure_stack(s: BenchSettings, model_path: str, model_name: str, low_bit: Optional[str], starts: int,
                  count: Callable[[str], int], progress: Callable[[str], None]) -> StackResult:
    label = OURS if low_bit else STOCK
    result = StackResult(label, low_bit)
    low_bit_cache = s.out_dir / "low-bit-cache"
    for start in range(starts):
        worker_args = ["--stream-interval", "1"]
        if s.conv_template:
            worker_args += ["--conv-template", s.conv_template]
        if low_bit:
            worker_args += ["--low-bit-cache", str(low_bit_cache)]
        stack = Stack(model_path=model_path, model_name=model_name, port=free_port(), low_bit=low_bit,
                      log_dir=s.out_dir / "logs" / f"{label}-{start + 1}", worker_args=worker_args)
        what = "converting" if low_bit and start == 0 else ("cached" if low_bit else "fp32")
        progress(f"  {label}: start {start + 1}/{starts} ({what}) ...")
        began = time.perf_counter()
        stack.start()
        try:
            stack.wait_ready(s.ready_timeout, progress=lambda line: None)
            result.starts_s.append(time.perf_counter() - began)
            load = worker_load_seconds(stack.child("worker").log_path.read_text(errors="replace"))
            if load is not None:
                result.load_s.append(load)
            progress(f"    ready in {result.starts_s[-1]:.1f} s")
            if start == starts - 1:
                stream_chat(stack.base_url, model_name, [{"role": "user", "content": "w5 w6"}], 2)  # warm-up
                chat = functools.partial(stream_chat, stack.base_url, model_name)
                result.decode = decode_runs(s, chat, count, progress)
                result.replay = agent_replay(s, chat, count, progress)
                result.peak_rss_mb = peak_rss_mb(stack.child("worker").proc.pid)
        finally:
            stack.stop()
    return result


def _median(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(result: StackResult, shape: LlamaShape, bandwidth_gbs: float) -> dict:
    tok_s = _median([r["tok_s"] for r in result.decode])
    bytes_per_token = shape.linear_params * BYTES_PER_WEIGHT.get(result.low_bit, 1.0)
    roofline = bandwidth_gbs * 1e9 / bytes_per_token
    replay = result.replay
    return {
        "low_bit": result.low_bit or "fp32",
        "start_s": result.starts_s,
        "model_load_s": result.load_s,
        "decode": {"tok_s": tok_s, "ttft_s": _median([r["ttft_s"] for r in result.decode]), "runs": result.decode},
        "replay": replay,
        "replay_ttft_last_over_first": replay[-1]["ttft_s"] / replay[0]["ttft_s"] if replay else None,
        "peak_rss_mb": result.peak_rss_mb,
        "roofline": {"bytes_per_token": bytes_per_token, "tok_s": roofline,
                     "percent": 100 * tok_s / roofline if tok_s else None},
    }


def _ratio(a, b):
    return a / b if a and b else None


def compare(ours: dict, stock: dict) -> dict:
    return {
        "decode_speedup": _ratio(ours["decode"]["tok_s"], stock["decode"]["tok_s"]),
        "ttft_speedup": _ratio(stock["decode"]["ttft_s"], ours["decode"]["ttft_s"]),
        "replay_last_turn_ttft_speedup": _ratio(stock["replay"][-1]["ttft_s"], ours["replay"][-1]["ttft_s"]),
        "cached_start_speedup": _ratio(ours["start_s"][0], ours["start_s"][-1]),
        "cached_model_load_speedup": _ratio(ours["model_load_s"][0], ours["model_load_s"][-1])
        if len(ours["model_load_s"]) > 1 else None,
        "peak_rss_ratio": _ratio(ours["peak_rss_mb"], stock["peak_rss_mb"]),
    }


def compare_with_peer(ours: dict, peer: dict) -> dict:
    """Ours relative to a peer (llama.cpp), read as in ``compare``: speed ratios above 1
    mean ours is faster; the RSS ratio is ours / theirs."""
    return {
        "decode_speedup": _ratio(ours["decode"]["tok_s"], peer["decode"]["tok_s"]),
        "ttft_speedup": _ratio(peer["decode"]["ttft_s"], ours["decode"]["ttft_s"]),
        "replay_last_turn_ttft_speedup": _ratio(peer["replay"][-1]["ttft_s"], ours["replay"][-1]["ttft_s"]),
        "peak_rss_ratio": _ratio(ours["peak_rss_mb"], peer["peak_rss_mb"]),
    }


def targets(report: dict) -> dict:
    ours, ratios = report["stacks"][OURS], report["ratios"]
    checks = {
        "decode >= 3x stock fp32": (ratios["decode_speedup"], 3.0, "ge"),
        "replay turn-last TTFT <= 1.5x turn-1": (ours["replay_ttft_last_over_first"], 1.5, "le"),
        "cached start >= 5x faster (model load)": (ratios["cached_model_load_speedup"], 5.0, "ge"),
        "roofline >= 50%": (ours["roofline"]["percent"], 50.0, "ge"),
    }
    return {name: {"value": v, "target": t, "met": (v is not None and (v >= t if op == "ge" else v <= t))}
            for name, (v, t, op) in checks.items()}


def format_table(report: dict) -> str:
    ours, stock, r = report["stacks"][OURS], report["stacks"][STOCK], report["ratios"]
    peer = report["stacks"].get(LLAMA_CPP)
    vs = report.get("vs_llama_cpp") or {}

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    def x(v, note=""):
        return "-" if v is None else f"{v:.2f}x{note}"

    def p(key, fmt="{:.3f}", pick=lambda st: st):
        return f(pick(peer)[key], fmt) if peer else None

    rows = [
        ("decode tok/s", f(ours["decode"]["tok_s"], "{:.1f}"), f(stock["decode"]["tok_s"], "{:.1f}"),
         x(r["decode_speedup"]), p("tok_s", "{:.1f}", lambda st: st["decode"]), x(vs.get("decode_speedup"))),
        ("TTFT (s)", f(ours["decode"]["ttft_s"], "{:.3f}"), f(stock["decode"]["ttft_s"], "{:.3f}"),
         x(r["ttft_speedup"]), p("ttft_s", pick=lambda st: st["decode"]), x(vs.get("ttft_speedup"))),
        ("replay turn-1 TTFT (s)", f(ours["replay"][0]["ttft_s"], "{:.3f}"),
         f(stock["replay"][0]["ttft_s"], "{:.3f}"), "", p("ttft_s", pick=lambda st: st["replay"][0]), ""),
        (f"replay turn-{len(ours['replay'])} TTFT (s)", f(ours["replay"][-1]["ttft_s"], "{:.3f}"),
         f(stock["replay"][-1]["ttft_s"], "{:.3f}"), x(r["replay_last_turn_ttft_speedup"]),
         p("ttft_s", pick=lambda st: st["replay"][-1]), x(vs.get("replay_last_turn_ttft_speedup"))),
        ("replay last/first TTFT", f(ours["replay_ttft_last_over_first"]), f(stock["replay_ttft_last_over_first"]), "",
         p("replay_ttft_last_over_first", "{:.2f}"), ""),
        ("start to ready (s)", " / ".join(f(v, "{:.1f}") for v in ours["start_s"]) + " (convert / cached)",
         f(stock["start_s"][0], "{:.1f}"), x(r["cached_start_speedup"], " (cached vs first)"),
         f((peer["start_s"] or [None])[0], "{:.1f}") if peer else None, ""),
        ("model load (s)", " / ".join(f(v, "{:.2f}") for v in ours["model_load_s"]), "-",
         x(r["cached_model_load_speedup"], " (cached vs first)"),
         f((peer["model_load_s"] or [None])[0], "{:.2f}") if peer else None, ""),
        ("worker peak RSS (MB)", f(ours["peak_rss_mb"], "{:.0f}"), f(stock["peak_rss_mb"], "{:.0f}"),
         x(r["peak_rss_ratio"]), p("peak_rss_mb", "{:.0f}"), x(vs.get("peak_rss_ratio"))),
        ("roofline tok/s", f(ours["roofline"]["tok_s"], "{:.1f}"), f(stock["roofline"]["tok_s"], "{:.1f}"), "",
         p("tok_s", "{:.1f}", lambda st: st["roofline"]), ""),
        ("% of roofline", f(ours["roofline"]["percent"], "{:.0f}%"), f(stock["roofline"]["percent"], "{:.0f}%"), "",
         p("percent", "{:.0f}%", lambda st: st["roofline"]), ""),
    ]
    header = ("", f"{OURS} ({ours['low_bit']})", f"{STOCK} (fp32)", "ours vs stock")
    if peer:
        header += (f"{LLAMA_CPP} ({peer['low_bit']})", "ours vs llama.cpp")
    rows = [row[:len(header)] for row in rows]
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [line(header), line(tuple("-" * w for w in widths))] + [line(row) for row in rows]
    out.append("ratios: speed above 1 means ours is faster; RSS is ours / theirs")
    out.append(f"memory bandwidth {report['machine']['bandwidth_gbs']:.1f} GB/s; "
               f"model {report['model']['params'] / 1e6:.0f} M params")
    for name, t in report["targets"].items():
        out.append(f"target {name}: {f(t['value'])} -> {'met' if t['met'] else 'NOT met'}")
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [(OURS, "o-", "tab:blue"), (STOCK, "s--", "tab:orange"), (LLAMA_CPP, "^-.", "tab:green")]
    series = [item for item in series if item[0] in report["stacks"]]
    for label, style, _ in series:
        replay = report["stacks"][label]["replay"]
        left.plot([t["turn"] for t in replay], [t["ttft_s"] for t in replay], style,
                  label=f"{label} ({report['stacks'][label]['low_bit']})")
    left.set(title="Agent replay: time to first token per turn", xlabel="turn (history grows)",
             ylabel="TTFT (s)", ylim=(0, None))
    left.xaxis.get_major_locator().set_params(integer=True)
    left.legend()
    labels, values, colors = [], [], []
    for label, _, color in series:
        stack = report["stacks"][label]
        labels += [f"{label}\n{stack['low_bit']}", f"roofline\n{stack['low_bit']}"]
        values += [stack["decode"]["tok_s"] or 0, stack["roofline"]["tok_s"]]
        colors += [color, "lightgray"]
    bars = right.bar(labels, values, color=colors)
    right.tick_params(axis="x", labelsize=8)
    right.bar_label(bars, fmt="%.0f")
    right.set(title="Decode speed through the API (gray: memory roofline)", ylabel="tokens/s (log)", yscale="log")
    fig.suptitle(f"{report['model']['name']} ({report['model']['params'] / 1e6:.0f} M params), "
                 f"{report['machine']['cpus']} CPUs, {report['machine']['bandwidth_gbs']:.0f} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(s: BenchSettings, progress: Callable[[str], None] = print, measure_peer=None) -> dict:
    """``measure_peer``: how llama.cpp is measured (default: ``bench_llama_cpp.measure``)."""
    s.out_dir.mkdir(parents=True, exist_ok=True)
    shape = s.shape
    if s.model_path:
        model_path = s.model_path.rstrip("/")
    else:
        name = f"bench-llama-{shape.params // 1_000_000}m"
        progress(f"building the benchmark model {name} ({shape.params / 1e6:.0f} M params, random weights) ...")
        model_path = str(build_random_llama(cache_dir() / "bench-models" / name, shape))
    model_name = os.path.basename(model_path)
    count = token_counter(s, model_path)
    progress("measuring memory bandwidth ...")
    bandwidth = measure_bandwidth()
    progress(f"  {bandwidth:.1f} GB/s")
    results = {
        OURS: measure_stack(s, model_path, model_name, s.low_bit, starts=2, count=count, progress=progress),
        STOCK: measure_stack(s, model_path, model_name, None, starts=1, count=count, progress=progress),
    }
    if "llama-cpp" in s.against:
        from fastchat_bigdl import bench_llama_cpp

        results[LLAMA_CPP] = (measure_peer or bench_llama_cpp.measure)(s, s.gguf_path, progress)
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "bandwidth_gbs": bandwidth},
        "model": {"name": model_name, "path": model_path, "shape": asdict(shape), "params": shape.params},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items() if k != "shape"},
        "stacks": {label: summarize(r, shape, bandwidth) for label, r in results.items()},
    }
    report["ratios"] = compare(report["stacks"][OURS], report["stacks"][STOCK])
    if LLAMA_CPP in report["stacks"]:
        report["vs_llama_cpp"] = compare_with_peer(report["stacks"][OURS], report["stacks"][LLAMA_CPP])
        report["llama_cpp"] = {"version": bench_llama_cpp.llama_cpp_version(), "gguf": s.gguf_path}
    report["targets"] = targets(report)
    (s.out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    plot(report, s.out_dir / "bench.png")
    return report


def shape_of_model(model_path: str) -> LlamaShape:
    config = json.loads((Path(model_path) / "config.json").read_text())
    heads = config["num_attention_heads"]
    return LlamaShape(config["hidden_size"], config["num_hidden_layers"], heads,
                      config.get("num_key_value_heads", heads), config["intermediate_size"],
                      config["vocab_size"], config.get("max_position_embeddings", 2048),
                      tied_embeddings=bool(config.get("tie_word_embeddings", False)))


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None,
                        help="A Llama-architecture checkpoint (default: a ~374 M random Llama built locally)")
    parser.add_argument("--low-bit", default="sym_int4")
    parser.add_argument("--quick", action="store_true", help="A small model and short runs (well under a minute)")
    parser.add_argument("--turns", type=int, default=None, help="Agent replay turns (default 10; --quick 3)")
    parser.add_argument("--out", default="bench-results", help="Directory for bench.json, bench.png and logs")
    parser.add_argument("--against", choices=["llama-cpp"], action="append", default=[],
                        help="Also measure llama.cpp (llama-cpp-python) on the same model: by default the demo "
                             "model's own GGUF against this package serving the checkpoint converted from it")
    parser.add_argument("--gguf", default=None,
                        help="The GGUF llama.cpp runs (default with --against llama-cpp: the demo model's); "
                             "--model-path must then be the same model as a Hugging Face checkpoint")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    quick = args.quick
    model_path, gguf, against = args.model_path, args.gguf, tuple(args.against)
    if "llama-cpp" in against and not gguf:
        if model_path:
            raise SystemExit("fastchat-bigdl bench: --against llama-cpp with --model-path needs --gguf "
                             "(the same model as a GGUF)")
        from fastchat_bigdl.demo_model import demo_gguf_path, ensure_demo_model

        gguf, model_path = str(demo_gguf_path()), str(ensure_demo_model())
    real_model = bool(model_path)
    shape = shape_of_model(model_path) if model_path else (QUICK_SHAPE if quick else DEFAULT_SHAPE)
    return BenchSettings(
        shape=shape, model_path=model_path, low_bit=args.low_bit,
        prompt_tokens=32 if quick else 128, max_tokens=16 if quick else 64, repeats=1 if quick else 3,
        turns=args.turns or (3 if quick else 10), turn_tokens=16 if quick else 48,
        turn_max_tokens=8 if quick else 32, out_dir=Path(args.out),
        # A real model answers best in its own template (llama.cpp uses the GGUF's, too).
        conv_template=None if real_model else CONV_TEMPLATE,
        prompt_style="english" if real_model else "words",
        against=against, gguf_path=gguf,
    )


def main_args(args: argparse.Namespace) -> int:
    s = settings_from_args(args)
    peers = f" and {LLAMA_CPP} ({os.path.basename(s.gguf_path)})" if s.against else ""
    print(f"fastchat-bigdl bench: {OURS} ({s.low_bit}) vs {STOCK} (fp32){peers}, results in {s.out_dir}", flush=True)
    if s.against:
        from fastchat_bigdl.bench_llama_cpp import INSTALL_HINT, llama_cpp_version

        if llama_cpp_version() is None:
            print(f"fastchat-bigdl bench: --against llama-cpp needs llama-cpp-python: {INSTALL_HINT}", file=sys.stderr)
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
