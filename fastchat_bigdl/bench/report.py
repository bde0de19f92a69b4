"""From measurements to a report: per-stack summaries, ratios between stacks, the targets,
a text table and a plot."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import List, Optional

from fastchat_bigdl.bench.measure import StackResult
from fastchat_bigdl.bench.random_model import LlamaShape
from fastchat_bigdl.bench.settings import LLAMA_CPP, OURS, STOCK

# Bytes read per weight for each low-bit format (ggml block layouts: data + scales).
BYTES_PER_WEIGHT = {
    "sym_int4": 18 / 32, "asym_int4": 20 / 32, "sym_int5": 22 / 32, "asym_int5": 24 / 32,
    "sym_int8": 34 / 32, "nf4": 18 / 32, "nf3": 14 / 32, "fp4": 18 / 32, "fp6": 26 / 32,
    "fp8": 33 / 32, "fp8_e4m3": 33 / 32, "fp8_e5m2": 33 / 32, "fp16": 2.0, "bf16": 2.0, None: 4.0,
    "q4_1": 20 / 32,  # llama.cpp's Q4_1: 16 bytes of nibbles + fp16 scale + fp16 min per 32
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
        "concurrency": result.concurrency,
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
    checks = {
        "decode >= 3x stock fp32": (ratios["decode_speedup"], 3.0, "ge"),
        "replay turn-last TTFT <= 1.5x turn-1": (ours["replay_ttft_last_over_first"], 1.5, "le"),
        "cached start >= 5x faster (model load)": (ratios["cached_model_load_speedup"], 5.0, "ge"),
        "roofline >= 50%": (ours["roofline"]["percent"], 50.0, "ge"),
    }
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
    for r in ours.get("concurrency") or []:
        out.append(f"{r['streams']:2d} streams at once: {f(r['aggregate_tok_s'], '{:.1f}')} tok/s in all, "
                   f"{f(r['per_stream_tok_s'], '{:.1f}')} per stream, gap p50 {f(r['gap_p50_ms'], '{:.0f}')} ms / "
                   f"p99 {f(r['gap_p99_ms'], '{:.0f}')} ms, {len(r['errors'])} errors")
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
