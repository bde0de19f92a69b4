"""The peer users would otherwise run, llama.cpp (through llama-cpp-python), measured on
the same model and prompts as the FastChat stacks in ``bench``: the demo model's own
GGUF against this package serving the checkpoint converted from it, or a bench model
exported to Q4_0 (``bench.gguf_export``: llama.cpp's twin of ``sym_int4``) with prompts
tokenized by the bench as the FastChat worker tokenizes them (``chat_prompt_ids``).

llama.cpp runs in a process of its own (``llama_cpp_server``, which imports nothing but
llama-cpp-python, so its peak RSS is its own), with its prompt cache on
(``LlamaRAMCache``) for the agent replay. Its times are taken inside that process,
around ``create_chat_completion``; the FastChat stacks are timed over HTTP through three
processes, which favours llama.cpp by a few milliseconds per request.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from fastchat_bigdl.bench.measure import StackResult, agent_replay, decode_runs, long_prompt_ttft
from fastchat_bigdl.bench.settings import LLAMA_CPP

SERVER_SCRIPT = Path(__file__).with_name("llama_cpp_server.py")
INSTALL_HINT = (
    'pip install "fastchat-bigdl[llama-cpp]" (llama-cpp-python builds from source, 15-30 min on 2 cores; '
    'on CPUs that report AMX but fault on it, set CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON '
    '-DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF", plus -DGGML_AVX512=ON '
    '-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON where the CPU has AVX-512)'
)


CRASH_HINT = ("a segmentation fault in llama.cpp itself: seen with a native build on VMs that report AMX; "
              "rebuild without AMX: " + INSTALL_HINT)


# llama-cpp-python may live in a virtualenv of its own (it brings numpy 2, which ipex-llm's
# stack cannot share): the Python that runs it.
LLAMA_CPP_PYTHON_ENV = "FASTCHAT_BIGDL_LLAMA_CPP_PYTHON"


def llama_cpp_python() -> str:
    return os.environ.get(LLAMA_CPP_PYTHON_ENV) or sys.executable


def llama_cpp_version() -> Optional[str]:
    """llama-cpp-python's version in the Python that will run it, or None if it is missing."""
    probe = "import llama_cpp; print(getattr(llama_cpp, '__version__', 'unknown'))"
    try:
        out = subprocess.run([llama_cpp_python(), "-c", probe], capture_output=True, text=True, timeout=120)
    except OSError:
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


class LlamaCppExited(RuntimeError):
    """The llama.cpp process ended; ``code`` is its exit code (-11: a segmentation fault)."""

    def __init__(self, code: int):
        super().__init__(f"llama.cpp exited with code {code} (its error is above)")
        self.code = code


class LlamaCppProcess:
    """``bench.Chat`` backed by a llama.cpp process: call it with (messages, max_tokens)."""

    def __init__(self, gguf_path: str, threads: int, n_ctx: int = 2048, prompt_cache_mb: int = 1024,
                 encode: Optional[Callable[[List[dict]], Sequence[int]]] = None):
        self.encode = encode  # messages -> prompt token ids; None: llama.cpp applies the GGUF's template
        self.proc = subprocess.Popen(
            [llama_cpp_python(), str(SERVER_SCRIPT), gguf_path, str(threads), str(n_ctx), str(prompt_cache_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_s = self._read()["load_s"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise LlamaCppExited(self.proc.wait())
        return json.loads(line)

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def __call__(self, messages: List[dict], max_tokens: int) -> Tuple[float, float, str]:
        if self.encode is not None:
            answer = self._ask({"prompt_ids": list(self.encode(messages)), "max_tokens": max_tokens})
        else:
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


def gguf_file_type(gguf_path: str) -> str:
    """The GGUF's weight format as llama.cpp names it (``q4_0``, ``q4_1``, ...)."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(gguf_path).fields.get("general.file_type")
    if field is None:
        return "unknown"
    name = LlamaFileType(int(field.contents())).name
    return name.replace("MOSTLY_", "").replace("ALL_", "").lower()


def chat_prompt_ids(model_path: str, conv_template: str) -> Callable[[List[dict]], List[int]]:
    """Messages -> the token ids the FastChat stacks prefill for them: FastChat's
    conversation template renders the prompt (as its API server does) and the checkpoint's
    tokenizer encodes it (as the worker does)."""
    from fastchat.conversation import get_conv_template
    from transformers import AutoTokenizer

    from fastchat_bigdl.common.chat_template import conversation_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    conv = get_conv_template(conv_template)

    def encode(messages: List[dict]) -> List[int]:
        return tokenizer(conversation_prompt(conv, messages)).input_ids

    return encode


def measure(settings, gguf_path: str, progress: Callable[[str], None], chat_factory=LlamaCppProcess,
            encode: Optional[Callable[[List[dict]], Sequence[int]]] = None,
            count: Optional[Callable[[str], int]] = None) -> StackResult:
    """A ``bench.StackResult`` for llama.cpp: load, warm-up, decode runs, agent replay.
    Without ``encode``/``count`` llama.cpp applies the GGUF's chat template and counts
    tokens with the GGUF's tokenizer (the same vocabulary the converted checkpoint has);
    with them the bench tokenizes and counts, as for the FastChat stacks."""
    result = StackResult(LLAMA_CPP, gguf_file_type(gguf_path))
    progress(f"  {LLAMA_CPP}: loading {Path(gguf_path).name} ({result.low_bit}) ...")
    chat = None
    try:
        chat = chat_factory(gguf_path, threads=settings.threads, n_ctx=min(settings.shape.context, 4096),
                            encode=encode)
        count = count or chat.count_tokens
        result.starts_s.append(chat.load_s)
        result.load_s.append(chat.load_s)
        progress(f"    ready in {chat.load_s:.1f} s")
        chat([{"role": "user", "content": "hello"}], 2)  # warm-up, as for the stacks
        result.decode = decode_runs(settings, chat, count, progress)
        result.long_prompt = long_prompt_ttft(settings, chat, count, progress)
        result.replay = agent_replay(settings, chat, count, progress)
        result.peak_rss_mb = chat.peak_rss_mb()
    except LlamaCppExited as exc:  # llama.cpp died: a result, the other stacks' numbers still count
        result.failure = f"llama.cpp stopped: {exc}" + (f"; {CRASH_HINT}" if exc.code == -11 else "")
        progress(f"    {result.failure}")
    finally:
        if chat is not None:
            chat.close()
    return result
