"""The peer users would otherwise run, llama.cpp (through llama-cpp-python), measured on
the same model and prompts as the FastChat stacks in ``bench``: the demo model's own
GGUF against this package serving the checkpoint converted from it.

llama.cpp runs in a process of its own (``llama_cpp_server``, which imports nothing but
llama-cpp-python, so its peak RSS is its own), with its prompt cache on
(``LlamaRAMCache``) for the agent replay. Its times are taken inside that process,
around ``create_chat_completion``; the FastChat stacks are timed over HTTP through three
processes, which favours llama.cpp by a few milliseconds per request.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from fastchat_bigdl.bench.measure import StackResult, agent_replay, decode_runs
from fastchat_bigdl.bench.settings import LLAMA_CPP

SERVER_SCRIPT = Path(__file__).with_name("llama_cpp_server.py")
INSTALL_HINT = (
    'pip install "fastchat-bigdl[llama-cpp]" (llama-cpp-python builds from source, 15-30 min on 2 cores; '
    'on CPUs that report AMX but fault on it, set CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON '
    '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")'
)


def llama_cpp_version() -> Optional[str]:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


class LlamaCppProcess:
    """``bench.Chat`` backed by a llama.cpp process: call it with (messages, max_tokens)."""

    def __init__(self, gguf_path: str, threads: int, n_ctx: int = 2048, prompt_cache_mb: int = 1024):
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), gguf_path, str(threads), str(n_ctx), str(prompt_cache_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_s = self._read()["load_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp exited with code {self.proc.wait()} (its error is above)")
        return json.loads(line)

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def __call__(self, messages: List[dict], max_tokens: int) -> Tuple[float, float, str]:
        answer = self._ask({"chat": messages, "max_tokens": max_tokens})
        return answer["ttft_s"], answer["total_s"], answer["text"]

    def count_tokens(self, text: str) -> int:
        return self._ask({"count": text})["tokens"]

    def peak_rss_mb(self) -> Optional[float]:
        return self._ask({"peak_rss_mb": True})["peak_rss_mb"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def measure(settings, gguf_path: str, progress: Callable[[str], None], chat_factory=LlamaCppProcess) -> StackResult:
    """A ``bench.StackResult`` for llama.cpp: load, warm-up, decode runs, agent replay,
    with tokens counted by llama.cpp's own tokenizer (the GGUF's, the same vocabulary the
    converted checkpoint's tokenizer has)."""
    result = StackResult(LLAMA_CPP, "q4_1")
    progress(f"  {LLAMA_CPP}: loading {Path(gguf_path).name} ...")
    chat = chat_factory(gguf_path, threads=settings.threads)
    try:
        result.starts_s.append(chat.load_s)
        result.load_s.append(chat.load_s)
        progress(f"    ready in {chat.load_s:.1f} s")
        chat([{"role": "user", "content": "hello"}], 2)  # warm-up, as for the stacks
        result.decode = decode_runs(settings, chat, chat.count_tokens, progress)
        result.replay = agent_replay(settings, chat, chat.count_tokens, progress)
        result.peak_rss_mb = chat.peak_rss_mb()
    finally:
        chat.close()
    return result
