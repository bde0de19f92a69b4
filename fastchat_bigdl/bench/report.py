"""From measurements to a report: per-stack summaries, ratios between stacks, the targets,
a text table and a plot."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import List, Optional

from fastchat_bigdl.bench.measure import StackResult
from fastchat_bigdl.bench.random_model import LlamaShape
from fastchat_bigdl.bench.settings import LLAMA_CPP, OURS, STOCK, STOCK_BF16

GB = 1e9 / 2**20  # MiB in a GB, for targets stated in GB

# Bytes read per weight for each low-bit format (ggml block layouts: data + scales).
BYTES_PER_WEIGHT = {
    "sym_int4": 18 / 32, "asym_int4": 20 / 32, "sym_int5": 22 / 32, "asym_int5": 24 / 32,
    "sym_int8": 34 / 32, "nf4": 18 / 32, "nf3": 14 / 32, "fp4": 18 / 32, "fp6": 26 / 32,
    "fp8": 33 / 32, "fp8_e4m3": 33 / 32, "fp8_e5m2": 33 / 32, "fp16": 2.0, "bf16": 2.0, None: 4.0,
    "q4_1": 20 / 32,  # llama.cpp's Q4_1: 16 bytes of nibbles + fp16 scale + fp16 min per 32
    "q4_0": 18 / 32,  # llama.cpp's Q4_0: 16 bytes of nibbles + fp16 scale per 32
}


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
        "start_peak_rss_mb": result.start_peak_rss_mb,
        "start_peak_anon_mb": result.start_peak_anon_mb,
        "long_prompt": result.long_prompt,
        "agent_chat": result.agent_chat,
        "long_chat": result.long_chat,
        "memory_cgroup": result.memory_cgroup,
        "failed": result.failure,
        "concurrency": result.concurrency,
        "roofline": {"bytes_per_token": bytes_per_token, "tok_s": roofline,
                     "percent": 100 * tok_s / roofline if tok_s else None},
    }


def _ratio(a, b):
    return a / b if a and b else None


def _last_turn_ttft(stack: dict) -> Optional[float]:
    return stack["replay"][-1]["ttft_s"] if stack["replay"] else None


def _long_ttft(stack: dict) -> Optional[float]:
    return (stack.get("long_prompt") or {}).get("ttft_s")


def baseline(stacks: dict) -> Optional[str]:
    """The stock stack ours is compared with: fp32, or bf16 where fp32 did not fit."""
    return next((label for label in (STOCK, STOCK_BF16) if label in stacks and not stacks[label].get("failed")), None)


def compare(ours: dict, stock: Optional[dict]) -> dict:
    stock = stock or {"decode": {"tok_s": None, "ttft_s": None}, "replay": [], "peak_rss_mb": None}
    return {
        "decode_speedup": _ratio(ours["decode"]["tok_s"], stock["decode"]["tok_s"]),
        "ttft_speedup": _ratio(stock["decode"]["ttft_s"], ours["decode"]["ttft_s"]),
        "long_prompt_ttft_speedup": _ratio(_long_ttft(stock), _long_ttft(ours)),
        "replay_last_turn_ttft_speedup": _ratio(_last_turn_ttft(stock), _last_turn_ttft(ours)),
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
        "long_prompt_ttft_speedup": _ratio(_long_ttft(peer), _long_ttft(ours)),
        "replay_last_turn_ttft_speedup": _ratio(_last_turn_ttft(peer), _last_turn_ttft(ours)),
        "peak_rss_ratio": _ratio(ours["peak_rss_mb"], peer["peak_rss_mb"]),
    }


def compare_with_profile(ours: dict, profile: dict) -> dict:
    """The API's decode speed against the same model in-process (``bench.profile``)."""
    speeds = profile["tok_s"]
    return {
        "api_decode_over_kernel_ceiling": _ratio(ours["decode"]["tok_s"], speeds["kernel_ceiling"]),
        "api_decode_over_in_process": _ratio(ours["decode"]["tok_s"], speeds["token_loop"]),
        "lean_over_hf_forward": _ratio(speeds["lean_forward"], speeds["hf_forward"]),
    }


def targets(report: dict) -> dict:
    ours, ratios = report["stacks"][OURS], report["ratios"]
    big = report["model"]["params"] >= 3e9  # the 7B issue's targets
    checks = {}
    if big:  # stock fp32 does not fit: the best stock can do is bf16
        checks["decode >= 2x stock bf16"] = (ratios["decode_speedup"] if report.get("baseline") == STOCK_BF16
                                             else None, 2.0, "ge")
    else:
        checks["decode >= 3x stock fp32"] = (ratios["decode_speedup"] if report.get("baseline") == STOCK
                                             else None, 3.0, "ge")
    checks.update({
        "replay turn-last TTFT <= 1.5x turn-1": (ours["replay_ttft_last_over_first"], 1.5, "le"),
        "cached start >= 5x faster (model load)": (ratios["cached_model_load_speedup"], 5.0, "ge"),
        "roofline >= 50%": (ours["roofline"]["percent"], 50.0, "ge"),
    })
    if big:
        # anonymous memory: the bf16 checkpoint is mapped from disk, page cache the kernel
        # drops under pressure (resident peak reported beside it)
        converting = (ours.get("start_peak_anon_mb") or [None])[0]
        checks["worker peak RSS serving <= 6 GB"] = (ours["peak_rss_mb"] / GB if ours["peak_rss_mb"] else None,
                                                     6.0, "le")
        checks["converting worker peak memory (anonymous) <= 16 GB"] = (converting / GB if converting else None,
                                                                        16.0, "le")
    long = ours.get("long_chat") or {}
    if long.get("peak_rss_mb"):  # resident: the weights mapped from the cache file count too
        checks[f"worker peak RSS over a {long['history_tokens']}-token chat <= 6 GB"] = (
            long["peak_rss_mb"] / GB, 6.0, "le")
    for i, group in enumerate(ours.get("memory_cgroup") or []):
        checks[f"start {i + 1} in a {group['limit_mb'] / 1024:.0f} GiB memory cgroup: OOM kills"] = (
            group["oom_kills"], 0, "le")
    if "vs_llama_cpp" in report:
        checks["decode >= 0.6x llama.cpp"] = (report["vs_llama_cpp"]["decode_speedup"], 0.6, "ge")
    sweep = {r["streams"]: r for r in ours.get("concurrency") or []}
    if 8 in sweep:
        checks["8 streams: no errors"] = (len(sweep[8]["errors"]), 0, "le")
    if "profile" in report and 8 in sweep:
        checks["8 streams aggregate >= 0.85x kernel ceiling"] = (
            sweep[8]["aggregate_tok_s"] / report["profile"]["tok_s"]["kernel_ceiling"], 0.85, "ge")
    if "profile" in report:
        checks["API decode >= 0.85x kernel ceiling"] = (ratios["api_decode_over_kernel_ceiling"], 0.85, "ge")
        checks["API decode >= 0.9x in-process"] = (ratios["api_decode_over_in_process"], 0.9, "ge")
    return {name: {"value": v, "target": t, "met": (v is not None and (v >= t if op == "ge" else v <= t))}
            for name, (v, t, op) in checks.items()}


NOT_MEASURED = {"low_bit": "-", "decode": {"tok_s": None, "ttft_s": None}, "replay": [], "start_s": [None],
                "model_load_s": [], "peak_rss_mb": None, "replay_ttft_last_over_first": None,
                "roofline": {"tok_s": None, "percent": None}, "long_prompt": None, "start_peak_rss_mb": []}


def format_table(report: dict) -> str:
    """The bench's console report: the stacks side by side, then the notes below them."""
    header, rows = _comparison(report)
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    out = [line(header), line(tuple("-" * w for w in widths))] + [line(row) for row in rows]
    out.append("ratios: speed above 1 means ours is faster; RSS is ours / theirs")
    return "\n".join(out + _notes(report))


def _fmt(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def _times(v, note=""):
    return "-" if v is None else f"{v:.2f}x{note}"


def _comparison(report: dict):
    """(header, rows): one row a measurement, a column a stack, with the ratios."""
    stock_label = report.get("baseline") or STOCK
    ours, r = report["stacks"][OURS], report["ratios"]
    stock = report["stacks"][report["baseline"]] if report.get("baseline") else NOT_MEASURED
    peer = report["stacks"].get(LLAMA_CPP)
    vs = report.get("vs_llama_cpp") or {}
    f, x = _fmt, _times

    def p(key, fmt="{:.3f}", pick=lambda st: st):
        return f(pick(peer)[key], fmt) if peer else None

    rows = [
        ("decode tok/s", f(ours["decode"]["tok_s"], "{:.1f}"), f(stock["decode"]["tok_s"], "{:.1f}"),
         x(r["decode_speedup"]), p("tok_s", "{:.1f}", lambda st: st["decode"]), x(vs.get("decode_speedup"))),
        ("TTFT (s)", f(ours["decode"]["ttft_s"], "{:.3f}"), f(stock["decode"]["ttft_s"], "{:.3f}"),
         x(r["ttft_speedup"]), p("ttft_s", pick=lambda st: st["decode"]), x(vs.get("ttft_speedup"))),
        ("replay turn-1 TTFT (s)", f(_first_turn_ttft(ours), "{:.3f}"), f(_first_turn_ttft(stock), "{:.3f}"), "",
         f(_first_turn_ttft(peer), "{:.3f}") if peer else None, ""),
        (f"replay turn-{len(ours['replay'])} TTFT (s)", f(_last_turn_ttft(ours), "{:.3f}"),
         f(_last_turn_ttft(stock), "{:.3f}"), x(r["replay_last_turn_ttft_speedup"]),
         f(_last_turn_ttft(peer), "{:.3f}") if peer else None, x(vs.get("replay_last_turn_ttft_speedup"))),
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
        ("peak RSS to ready (MB)", " / ".join(f(v, "{:.0f}") for v in ours.get("start_peak_rss_mb") or []) + " (convert / cached)",
         f((stock.get("start_peak_rss_mb") or [None])[0], "{:.0f}"), "", "", ""),
        ("  of it anonymous (MB)", " / ".join(f(v, "{:.0f}") for v in ours.get("start_peak_anon_mb") or []),
         f((stock.get("start_peak_anon_mb") or [None])[0], "{:.0f}"), "", "", ""),
        ("roofline tok/s", f(ours["roofline"]["tok_s"], "{:.1f}"), f(stock["roofline"]["tok_s"], "{:.1f}"), "",
         p("tok_s", "{:.1f}", lambda st: st["roofline"]), ""),
        ("% of roofline", f(ours["roofline"]["percent"], "{:.0f}%"), f(stock["roofline"]["percent"], "{:.0f}%"), "",
         p("percent", "{:.0f}%", lambda st: st["roofline"]), ""),
    ]
    header = ("", f"{OURS} ({ours['low_bit']})", f"{stock_label} ({stock['low_bit']})", "ours vs stock")
    if peer:
        header += (f"{LLAMA_CPP} ({peer['low_bit']})", "ours vs llama.cpp")
    if ours.get("long_prompt"):
        rows.insert(2, (f"TTFT, {ours['long_prompt']['prompt_tokens']}-token prompt (s)", f(_long_ttft(ours), "{:.2f}"),
                        f(_long_ttft(stock), "{:.2f}"), x(r.get("long_prompt_ttft_speedup")),
                        f(_long_ttft(peer), "{:.2f}") if peer else None, x(vs.get("long_prompt_ttft_speedup"))))
    return header, [row[:len(header)] for row in rows]


def _notes(report: dict) -> list:
    """Lines under the table: failures, the agent chat, the machine, the profile,
    concurrency and the targets."""
    ours, f = report["stacks"][OURS], _fmt
    out = []
    for label, stack in report["stacks"].items():
        if stack.get("failed"):
            out.append(f"{label} ({stack['low_bit']}): {stack['failed']}")
    chat = ours.get("agent_chat")
    if chat:
        times = ", ".join(f"{t['seconds']:.1f}" for t in chat.get("turns", []))
        out.append(f"AutoGen two-agent chat: {len(chat.get('turns', []))} turns ({times} s)"
                   + (f"; error: {chat['error']}" if chat.get("error") else "; completed"))
    out += _memory_lines(ours)
    out.append(f"memory bandwidth {report['machine']['bandwidth_gbs']:.1f} GB/s; "
               f"model {report['model']['params'] / 1e6:.0f} M params; {report['machine'].get('cpu', '')}")
    if "profile" in report:
        ms, speeds = report["profile"]["ms_per_token"], report["profile"]["tok_s"]
        out.append(f"one token in-process: low-bit linears {ms['linear']:.1f} ms (kernel ceiling "
                   f"{speeds['kernel_ceiling']:.0f} tok/s), attention {ms['attention']:.1f} ms, other ops "
                   f"{ms['other']:.1f} ms; lean forward {ms['lean_forward']:.1f} ms, token loop "
                   f"{ms['token_loop']:.1f} ms, Hugging Face forward {ms['hf_forward']:.1f} ms")
        api = ours["decode"]["tok_s"]
        if api:
            out.append(f"through the API {1000 / api:.1f} ms a token: serving adds "
                       f"{1000 / api - ms['token_loop']:.1f} ms")
    out += _kv_cache_lines(report.get("kv_cache"))
    for r in ours.get("concurrency") or []:
        out.append(f"{r['streams']:2d} streams at once: {f(r['aggregate_tok_s'], '{:.1f}')} tok/s in all, "
                   f"{f(r['per_stream_tok_s'], '{:.1f}')} per stream, gap p50 {f(r['gap_p50_ms'], '{:.0f}')} ms / "
                   f"p99 {f(r['gap_p99_ms'], '{:.0f}')} ms, {len(r['errors'])} errors")
    for name, t in report["targets"].items():
        out.append(f"target {name}: {f(t['value'])} -> {'met' if t['met'] else 'NOT met'}")
    return out


def _memory_lines(ours: dict) -> list:
    """The long chat's and the memory cgroup's lines."""
    out = []
    long = ours.get("long_chat")
    if long:
        ttfts = ", ".join(f"{t['ttft_s']:.1f}" for t in long["turns"])
        last_sent = long["turns"][-1].get("sent_tokens", long["history_tokens"]) if long["turns"] else 0
        out.append(f"long agent chat: {long['history_tokens']} tokens of history in {len(long['turns'])} turns "
                   f"(TTFT {ttfts} s; the last turn sent {last_sent}, trimmed to the context served); worker peak "
                   f"over it: RSS {_fmt((long['peak_rss_mb'] or 0) / GB)} GB, "
                   f"anonymous {_fmt((long.get('peak_anon_mb') or 0) / GB)} GB")
    for i, group in enumerate(ours.get("memory_cgroup") or []):
        out.append(f"start {i + 1} in a {group['limit_mb'] / 1024:.1f} GiB memory cgroup ({group['cgroup']}): "
                   f"peak {_fmt((group['peak_mb'] or 0) / 1024)} GiB, OOM kills {group['oom_kills']}")
    return out


def _kv_cache_lines(kv_cache: Optional[dict]) -> list:
    """One line per KV cache type of ``bench --kv-cache``."""
    out = []
    for name, t in ((kv_cache or {}).get("types") or {}).items():
        parts = []
        if "bytes_per_position" in t:
            decode = ", ".join(f"{ms:.1f} ms at {c}" for c, ms in t["decode_ms"].items())
            parts.append(f"{t['bytes_per_position'] / 1024:.1f} KiB a position, decode {decode}")
        if "identical_answers" in t:
            parts.append(f"{t['identical_answers']}/{kv_cache['prompts']} greedy answers identical to fp32's, "
                         f"logit error max {100 * t['logit_error_max']:.2f}% / mean {100 * t['logit_error_mean']:.2f}%")
        line = f"KV cache {name}: " + "; ".join(parts)
        out.append(line)
    return out


def _first_turn_ttft(stack: Optional[dict]) -> Optional[float]:
    return stack["replay"][0]["ttft_s"] if stack and stack["replay"] else None


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [(OURS, "o-", "tab:blue"), (STOCK, "s--", "tab:orange"), (STOCK_BF16, "d--", "tab:red"),
              (LLAMA_CPP, "^-.", "tab:green")]
    series = [item for item in series if item[0] in report["stacks"] and not report["stacks"][item[0]].get("failed")]
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
    right.bar_label(bars, fmt="%.1f" if max(values) < 20 else "%.0f")  # a 7B model decodes at a few tok/s
    right.set(title="Decode speed through the API (gray: memory roofline)", ylabel="tokens/s (log)", yscale="log")
    fig.suptitle(f"{report['model']['name']} ({report['model']['params'] / 1e6:.0f} M params), "
                 f"{report['machine']['cpus']} CPUs, {report['machine']['bandwidth_gbs']:.0f} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
