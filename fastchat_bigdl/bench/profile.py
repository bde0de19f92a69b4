"""``fastchat-bigdl bench --profile``: where one generated token's time goes, measured in
a child process on the objects the worker builds (the model as the low-bit loader loads
it, the lean runner over it, the worker's token loop).

Per token: the low-bit linear calls alone (their inverse is the kernel ceiling: no
forward can decode faster with these kernels), attention, the other ops of the runner,
then the worker's token loop in-process (sampling, detokenization, stop strings), and the
Hugging Face forward for comparison. With the API measurement of the same bench run the
remainder is the serving path (HTTP, FastChat's worker and API server).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

PROFILE_TOKENS = 64


class Timed:
    """Wraps a callable and adds up the wall time spent in it."""

    def __init__(self, fn: Callable, clock: Dict[str, float], phase: str):
        self.fn, self.clock, self.phase = fn, clock, phase

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.clock[self.phase] += time.perf_counter() - started


def _time_runner_decode(runner, prompt: List[int], tokens: int, clock: Optional[Dict[str, float]] = None) -> float:
    """Seconds per generated token of a greedy decode loop on the runner; ``clock`` (the
    Timed parts) is zeroed when decoding starts, so the prompt's prefill is not counted
    (on CPUs where batched int4 rows are slow it outweighed the decode steps)."""
    kv = runner.new_sequence(len(prompt) + tokens + 1)
    token = int(runner.prefill(prompt, kv)[-1].argmax())
    for phase in clock or {}:
        clock[phase] = 0.0
    started = time.perf_counter()
    for _ in range(tokens):
        token = int(runner.decode([(token, kv)])[-1].argmax())
    return (time.perf_counter() - started) / tokens


def _time_hf_decode(model, prompt: List[int], tokens: int) -> float:
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        started = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
    return (time.perf_counter() - started) / tokens


def _time_token_loop(model, tokenizer, runner, prompt_text: str, tokens: int) -> float:
    """Seconds per token of the worker's own loop (``generate_stream``) in-process,
    first chunk to last, one chunk per token as the bench's workers stream."""
    from fastchat_bigdl.worker.generation import generate_stream

    params = {"prompt": prompt_text, "temperature": 0, "max_new_tokens": tokens + 1, "echo": False,
              "stop_token_ids": []}
    first = last = None
    chunks = 0
    for _ in generate_stream(model, tokenizer, params, "cpu", 1 << 30, stream_interval=1, runner=runner):
        last = time.perf_counter()
        first = first or last
        chunks += 1
    return (last - first) / max(1, chunks - 1)


def profile_model(model_path: str, low_bit: str, prompt_tokens: int = 128, tokens: int = PROFILE_TOKENS) -> dict:
    import torch

    from fastchat_bigdl.engine.llama_runner import DecodeRows
    from fastchat_bigdl.engine.selection import build_lean_runner
    from fastchat_bigdl.lowbit.backend import resolve_backend
    from fastchat_bigdl.lowbit.devices import use_physical_cores
    from fastchat_bigdl.lowbit.loader import load_low_bit_model

    use_physical_cores()
    backend = resolve_backend()
    model, tokenizer = load_low_bit_model(model_path, low_bit=low_bit, torch_dtype=torch.float32, backend=backend)
    runner = build_lean_runner(model, backend, "cpu")
    generator = torch.Generator().manual_seed(0)
    vocab = min(runner.shape.vocab, len(tokenizer))
    prompt = torch.randint(3, vocab, (prompt_tokens,), generator=generator).tolist()

    _time_runner_decode(runner, prompt, 8)  # warm-up
    lean = min(_time_runner_decode(runner, prompt, tokens) for _ in range(2))

    clock = {"linear": 0.0, "attention": 0.0}
    for layer in runner.layers:
        for name in ("o", "gate", "up", "down"):
            setattr(layer, name, Timed(getattr(layer, name), clock, "linear"))
        layer.qkv = tuple(Timed(p, clock, "linear") for p in layer.qkv)
    runner.lm_head = Timed(runner.lm_head, clock, "linear")
    attend = DecodeRows.attend  # decode attention (this is the profile's own process)
    timed_attend = Timed(attend, clock, "attention")
    DecodeRows.attend = lambda call, *args: timed_attend(call, *args)
    profiled = _time_runner_decode(runner, prompt, tokens, clock)
    linear, attention = clock["linear"] / tokens, clock["attention"] / tokens
    runner.lm_head = runner.lm_head.fn
    DecodeRows.attend = attend
    for layer in runner.layers:
        for name in ("o", "gate", "up", "down"):
            setattr(layer, name, getattr(layer, name).fn)
        layer.qkv = tuple(p.fn for p in layer.qkv)

    hf = min(_time_hf_decode(model, prompt, tokens) for _ in range(2))
    loop = min(_time_token_loop(model, tokenizer, runner, tokenizer.decode(prompt), tokens) for _ in range(2))
    return {
        "prompt_tokens": prompt_tokens,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "ms_per_token": {
            "linear": linear * 1e3,
            "attention": attention * 1e3,
            "other": max(0.0, profiled - linear - attention) * 1e3,
            "lean_forward": lean * 1e3,
            "token_loop": loop * 1e3,
            "hf_forward": hf * 1e3,
        },
        "tok_s": {
            "kernel_ceiling": 1 / linear,
            "lean_forward": 1 / lean,
            "token_loop": 1 / loop,
            "hf_forward": 1 / hf,
        },
    }


def run_profile(model_path: str, low_bit: str, out: Path, prompt_tokens: int = 128,
                tokens: int = PROFILE_TOKENS) -> dict:
    """``profile_model`` in a child process (the stacks measured next get a quiet machine)."""
    subprocess.run([sys.executable, "-m", "fastchat_bigdl.bench.profile", "--model-path", model_path,
                    "--low-bit", low_bit, "--prompt-tokens", str(prompt_tokens), "--tokens", str(tokens),
                    "--json", str(out)], check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.read_text())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastchat_bigdl.bench.profile", description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--low-bit", default="sym_int4")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=PROFILE_TOKENS)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    result = profile_model(args.model_path, args.low_bit, args.prompt_tokens, args.tokens)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
