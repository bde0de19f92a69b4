"""Timing one stack: start it (through ``serve``'s ``Stack``), stream chat completions over
HTTP, and record time to first token, decode speed, the agent replay and memory."""
from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import requests

from fastchat_bigdl.bench.settings import OURS, SYSTEM, BenchSettings, prompt, stock_label
from fastchat_bigdl.stack.serve import Stack, StackError, free_port


@dataclass
class StackResult:
    label: str
    low_bit: Optional[str]
    starts_s: List[float] = field(default_factory=list)
    load_s: List[float] = field(default_factory=list)
    decode: List[dict] = field(default_factory=list)
    replay: List[dict] = field(default_factory=list)
    peak_rss_mb: Optional[float] = None
    concurrency: List[dict] = field(default_factory=list)
    start_peak_rss_mb: List[Optional[float]] = field(default_factory=list)  # each start's worker, to ready
    # the same without file-backed pages: a checkpoint read through mmap is page cache the
    # kernel drops under pressure, so this is the memory a start needs
    start_peak_anon_mb: List[Optional[float]] = field(default_factory=list)
    long_prompt: Optional[dict] = None  # TTFT of one long prompt (settings.long_prompt_tokens)
    agent_chat: Optional[dict] = None  # an AutoGen two-agent chat's turns (bench.agent_chat)
    long_chat: Optional[dict] = None  # an agent chat grown to settings.long_chat_tokens, and the worker's peak
    memory_cgroup: List[dict] = field(default_factory=list)  # each start's cgroup: limit, peak, OOM kills
    failure: Optional[str] = None  # why this stack could not be measured (e.g. it did not fit)


class MemoryWatchdog:
    """Kills one process (the worker) when its anonymous memory passes ``limit_mb``, before
    the machine swaps or the kernel's OOM killer picks a victim of its own: stock FastChat
    loading a 7B model in fp32 needs more than these machines have. Anonymous, not all
    resident memory: a checkpoint mapped from disk counts in RSS but is page cache the
    kernel reclaims. Also records the peak anonymous memory it saw (``peak_anon_mb``)."""

    def __init__(self, pid: int, limit_mb: float, poll_s: float = 0.1):
        self.pid, self.limit_mb, self.poll_s = pid, limit_mb, poll_s
        self.peak_anon_mb = 0.0
        self.killed_at_mb: Optional[float] = None
        self.started = time.perf_counter()
        self.killed_after_s: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            anon = anon_mb(self.pid)
            if anon is None:
                return
            self.peak_anon_mb = max(self.peak_anon_mb, anon)
            if anon > self.limit_mb:
                self.killed_at_mb, self.killed_after_s = anon, time.perf_counter() - self.started
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return

    def restart_peak(self) -> None:
        """Count the peak from now on (``peak_anon_mb`` covers what comes after)."""
        self.peak_anon_mb = anon_mb(self.pid) or 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def describe(self) -> str:
        return (f"did not fit: the bench's memory watchdog stopped the worker at {self.killed_at_mb / 1024:.1f} GiB "
                f"of anonymous memory (limit {self.limit_mb / 1024:.1f} GiB) after {self.killed_after_s:.0f} s of loading")


def available_memory_mb() -> Optional[float]:
    return _proc_field_mb("/proc/meminfo", "MemAvailable:")


def anon_mb(pid: int) -> Optional[float]:
    """Resident anonymous memory (heap, tensors): what cannot be dropped as page cache."""
    return _status_mb(pid, "RssAnon:")


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
    """(time to first token, total time, text) of one streamed chat completion; an error
    answer raises."""
    started = time.perf_counter()
    arrivals, text, error = timed_stream(base_url, model, messages, max_tokens)
    if error:
        raise RuntimeError(f"the server answered an error: {error}")
    ended = time.perf_counter()
    return (arrivals[0] if arrivals else ended) - started, ended - started, text


def timed_stream(base_url: str, model: str, messages: List[dict], max_tokens: int) -> Tuple[List[float], str, str]:
    """(arrival time of each content chunk, text, error or "") of one streamed chat."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    arrivals, text = [], ""
    try:
        with requests.post(base_url + "/chat/completions", json=body, stream=True, timeout=1800) as r:
            if r.status_code != 200:
                return arrivals, text, f"HTTP {r.status_code}: {r.text[:2000]}"
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error_code" in chunk or not chunk.get("choices"):  # FastChat's or the API server's error
                    return arrivals, text, f"error in the stream: {json.dumps(chunk)[:300]}"
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    arrivals.append(time.perf_counter())
                    text += delta
    except requests.RequestException as exc:
        return arrivals, text, str(exc)
    return arrivals, text, ""


def trimming_chat(base_url: str, model: str, messages: List[dict], max_tokens: int) -> Tuple[float, List[dict], str]:
    """An agent client's turn: (time to first token, the messages that were sent, text),
    the oldest turns dropped and the chat resent whenever the server answers that it
    outgrew the context (``autogen_local``'s history trimming); other errors raise."""
    from autogen_local.history import MAX_RESENDS, overflow_counts, trim_messages

    started, sent = time.perf_counter(), messages
    for _ in range(MAX_RESENDS + 1):
        arrivals, text, error = timed_stream(base_url, model, sent, max_tokens)
        if not error:
            return (arrivals[0] if arrivals else time.perf_counter()) - started, sent, text
        counts = overflow_counts(error.partition(": ")[2].encode()) if error.startswith("HTTP 400") else None
        trimmed = trim_messages(sent, *counts) if counts else None
        if trimmed is None:
            break
        sent = trimmed
    raise RuntimeError(f"the server answered an error: {error[:300]}")


def concurrency_sweep(s: BenchSettings, base_url: str, model: str, count: Callable[[str], int],
                      progress) -> List[dict]:
    """``n`` clients streaming at once, for each ``n`` of ``s.concurrency``: aggregate and
    per-stream decode speed, gaps between chunks, errors."""
    results = []
    for n in s.concurrency:
        chats = [[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": prompt(s, s.prompt_tokens // 4, 5000 + n * 100 + i)}] for i in range(n)]
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda m: timed_stream(base_url, model, m, s.max_tokens), chats))
        wall = time.perf_counter() - started
        tokens = [count(text) for _, text, _ in runs]
        gaps = sorted(b - a for arrivals, _, _ in runs for a, b in zip(arrivals, arrivals[1:]))
        per_stream = [(t - 1) / (a[-1] - a[0]) for t, (a, _, _) in zip(tokens, runs) if t > 1 and len(a) > 1 and a[-1] > a[0]]
        results.append({
            "streams": n, "wall_s": wall, "tokens": sum(tokens), "aggregate_tok_s": sum(tokens) / wall,
            "per_stream_tok_s": statistics.median(per_stream) if per_stream else None,
            "gap_p50_ms": 1e3 * gaps[len(gaps) // 2] if gaps else None,
            "gap_p99_ms": 1e3 * gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] if gaps else None,
            "errors": [e for _, _, e in runs if e],
        })
        r = results[-1]
        progress(f"    {n} streams at once: {r['aggregate_tok_s']:.1f} tok/s in all, "
                 f"{r['per_stream_tok_s'] or 0:.1f} per stream, p99 gap {r['gap_p99_ms'] or 0:.0f} ms, "
                 f"{len(r['errors'])} errors")
    return results


def _proc_field_mb(path: str, key: str) -> Optional[float]:
    """A ``key: N kB`` line of a /proc file, in MiB."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _status_mb(pid: int, key: str) -> Optional[float]:
    return _proc_field_mb(f"/proc/{pid}/status", key)


def peak_rss_mb(pid: int) -> Optional[float]:
    return _status_mb(pid, "VmHWM:")


def reset_peak_rss(pid: int) -> bool:
    """Restart the process's resident high-water mark from its current RSS (Linux 4.0+),
    so a later ``peak_rss_mb`` covers only what came after; False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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


def long_prompt_ttft(s: BenchSettings, chat: Chat, count: Callable[[str], int], progress) -> Optional[dict]:
    """Time to first token of one ``s.long_prompt_tokens``-token prompt (a pasted document)."""
    if not s.long_prompt_tokens:
        return None
    text = prompt(s, s.long_prompt_tokens, 7)
    ttft, _, _ = chat([{"role": "user", "content": text}], 2)
    tokens = count(text)
    progress(f"    {tokens}-token prompt: ttft {ttft:.1f} s")
    return {"prompt_tokens": tokens, "ttft_s": ttft}


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


LONG_CHAT_TURN_TOKENS = 500  # new tokens a turn of the long chat (a pasted document, a tool result), at most


def long_chat(s: BenchSettings, chat: Callable, count: Callable[[str], int], watchdog: "MemoryWatchdog",
              progress) -> Optional[dict]:
    """An agent chat whose history grows up to 500 tokens a turn to ``s.long_chat_tokens``
    (sent every turn as AutoGen does, trimmed as ``autogen_local`` trims it when it
    outgrows the context the worker serves: ``chat`` is ``trimming_chat``), and the
    worker's peak memory over it: resident (its high-water mark reset first, where the
    kernel allows; counts the low-bit weights mapped from the cache file) and anonymous
    (the watchdog's)."""
    if not s.long_chat_tokens:
        return None
    pid = watchdog.pid
    reset = reset_peak_rss(pid)
    watchdog.restart_peak()
    messages, turns, history = [{"role": "system", "content": SYSTEM}], [], count(SYSTEM)
    turn_tokens = max(1, min(LONG_CHAT_TURN_TOKENS, s.long_chat_tokens // 4))  # four turns at least
    while history < s.long_chat_tokens:
        new = min(turn_tokens, s.long_chat_tokens - history)
        messages.append({"role": "user", "content": prompt(s, new, 500 + len(turns))})
        history = sum(count(m["content"]) for m in messages)
        ttft, sent, text = chat(messages, s.turn_max_tokens)
        sent_tokens = sum(count(m["content"]) for m in sent)
        turns.append({"history_tokens": history, "sent_tokens": sent_tokens, "ttft_s": ttft})
        progress(f"    long chat turn {len(turns)}: history {history} tokens ({sent_tokens} sent), ttft {ttft:.1f} s")
        messages.append({"role": "assistant", "content": text})
        history += count(text)
    peak, anon = peak_rss_mb(pid), watchdog.peak_anon_mb
    progress(f"    long chat: {history} tokens of history, worker peak RSS {(peak or 0) / 1024:.2f} GiB "
             f"({anon / 1024:.2f} GiB anonymous)")
    return {"history_tokens": history, "turns": turns, "peak_rss_mb": peak, "peak_anon_mb": anon,
            "peak_since_reset": reset}


def _worker_args(s: BenchSettings, low_bit: Optional[str], stock_dtype: str) -> List[str]:
    args = ["--stream-interval", "1"]
    if s.conv_template:
        args += ["--conv-template", s.conv_template]
    if low_bit:
        args += ["--low-bit-cache", str(s.out_dir / "low-bit-cache")]
    elif stock_dtype != "float32":
        args += ["--dtype", stock_dtype]
    return args


def _served(s: BenchSettings, stack: Stack, result: StackResult, watchdog: "MemoryWatchdog",
            count: Callable[[str], int], progress) -> None:
    """Everything measured through the API of a started stack."""
    model_name, low_bit = stack.model_name, result.low_bit
    stream_chat(stack.base_url, model_name, [{"role": "user", "content": "w5 w6"}], 2)  # warm-up
    chat = functools.partial(stream_chat, stack.base_url, model_name)
    result.decode = decode_runs(s, chat, count, progress)
    result.long_prompt = long_prompt_ttft(s, chat, count, progress)
    result.replay = agent_replay(s, chat, count, progress)
    if result.label == OURS and s.concurrency:  # the stock worker takes turns: minutes for nothing new
        result.concurrency = concurrency_sweep(s, stack.base_url, model_name, count, progress)
    if result.label == OURS and s.agent_chat_turns:
        from fastchat_bigdl.bench.agent_chat import run_agent_chat

        result.agent_chat = run_agent_chat(stack.base_url, s.agent_chat_turns, s.turn_max_tokens, progress)
    result.peak_rss_mb = peak_rss_mb(watchdog.pid)
    if result.label == OURS and low_bit:
        trimming = functools.partial(trimming_chat, stack.base_url, model_name)
        result.long_chat = long_chat(s, trimming, count, watchdog, progress)


def _memory_cgroup(s: BenchSettings, low_bit: Optional[str], start: int):
    """Our worker's memory cgroup for this start (``--memory-cgroup``), else None."""
    if not (low_bit and s.memory_cgroup_mb):
        return None
    from fastchat_bigdl.bench.memory_cgroup import MemoryCgroup

    return MemoryCgroup(f"fastchat-bigdl-bench-{os.getpid()}-{start + 1}", s.memory_cgroup_mb)


def measure_stack(s: BenchSettings, model_path: str, model_name: str, low_bit: Optional[str], starts: int,
                  count: Callable[[str], int], progress: Callable[[str], None],
                  stock_dtype: str = "float32") -> StackResult:
    """``low_bit`` set: this package's worker; None: FastChat's stock worker in
    ``stock_dtype``. Each worker runs under a ``MemoryWatchdog``; one that does not fit is
    a result (``failure``), not a crash of the bench or the machine."""
    label = OURS if low_bit else stock_label(stock_dtype)
    result = StackResult(label, low_bit or ("bf16" if stock_dtype == "bfloat16" else None))
    limit_mb = s.memory_limit_mb or (available_memory_mb() or 8192) - 2048
    for start in range(starts):
        cgroup = _memory_cgroup(s, low_bit, start)
        stack = Stack(model_path=model_path, model_name=model_name, port=free_port(), low_bit=low_bit,
                      log_dir=s.out_dir / "logs" / f"{label}-{start + 1}",
                      worker_args=_worker_args(s, low_bit, stock_dtype),
                      worker_prefix=cgroup.command_prefix() if cgroup else [])
        what = "converting" if low_bit and start == 0 else ("cached" if low_bit else stock_dtype)
        where = f" in a {cgroup.limit_mb / 1024:.1f} GiB memory cgroup" if cgroup else ""
        progress(f"  {label}: start {start + 1}/{starts} ({what}{where}; worker memory limit "
                 f"{limit_mb / 1024:.1f} GiB) ...")
        began = time.perf_counter()
        stack.start()
        watchdog = MemoryWatchdog(stack.child("worker").proc.pid, limit_mb)
        try:
            try:
                stack.wait_ready(s.ready_timeout, progress=lambda line: None)
                _record_start(result, stack, watchdog, began, progress)
                if start == starts - 1:
                    _served(s, stack, result, watchdog, count, progress)
            except (StackError, requests.RequestException):
                oom_killed = cgroup is not None and cgroup.oom_kills()
                if watchdog.killed_at_mb is None and not oom_killed:
                    raise
                result.failure = watchdog.describe() if watchdog.killed_at_mb is not None else (
                    f"the worker was OOM-killed inside its {cgroup.limit_mb / 1024:.1f} GiB memory cgroup")
                progress(f"    {result.failure}")
                return result
        finally:
            watchdog.stop()
            stack.stop()
            if cgroup is not None:
                result.memory_cgroup.append(cgroup.summary())
                cgroup.remove()
    return result


def _record_start(result: StackResult, stack: Stack, watchdog: "MemoryWatchdog", began: float, progress) -> None:
    result.starts_s.append(time.perf_counter() - began)
    result.start_peak_rss_mb.append(peak_rss_mb(stack.child("worker").proc.pid))
    result.start_peak_anon_mb.append(watchdog.peak_anon_mb or None)
    load = worker_load_seconds(stack.child("worker").log_path.read_text(errors="replace"))
    if load is not None:
        result.load_s.append(load)
    progress(f"    ready in {result.starts_s[-1]:.1f} s, worker peak RSS "
             f"{(result.start_peak_rss_mb[-1] or 0) / 1024:.1f} GiB "
             f"({(result.start_peak_anon_mb[-1] or 0) / 1024:.1f} GiB anonymous)")
