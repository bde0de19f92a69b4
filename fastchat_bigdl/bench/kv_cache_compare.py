"""``fastchat-bigdl bench --kv-cache``: what storing the lean runner's KV cache in bf16 or
int8 costs against fp32, on the model being benchmarked, in a child process.

For each type: greedy agreement (the same prompts decoded greedily; how many tokens
match fp32's before the first difference, and how many whole answers are identical),
logit error (teacher-forced on fp32's tokens, so every position sees the same context:
the largest and the mean of max|logit - fp32's| / max|fp32's logit| per position),
decode time per token at a short and a long context, and bytes per position.

The low-bit kernels round their input activations to 8 bits, so any change upstream of a
linear layer, however small, moves its outputs by up to a rounding step: the comparison
includes ``fp32-nudged``, fp32 keys multiplied by (1 + 1e-6) before they are stored, the
noise floor below which no KV cache type can be told apart from fp32.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from fastchat_bigdl.engine.kv_cache import SequenceKV

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers and say why they are prime.",
    "Translate 'good morning, how are you?' into German.",
    "What does a compiler do?",
    "Give me a short recipe for pancakes.",
    "Who wrote Romeo and Juliet, and when?",
]


def _prompt_ids(tokenizer, text: str) -> List[int]:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer(text).input_ids


def _greedy(runner, prompt: List[int], tokens: int, forced: Optional[List[int]] = None):
    """(tokens chosen, logits of each step); with ``forced`` those tokens are fed instead."""
    kv = runner.new_sequence(len(prompt) + tokens + 1)
    logits = [runner.prefill(prompt, kv)[-1]]
    chosen = [int(logits[-1].argmax())]
    while len(chosen) < tokens:
        token = forced[len(chosen) - 1] if forced else chosen[-1]
        logits.append(runner.decode([(token, kv)])[-1])
        chosen.append(int(logits[-1].argmax()))
    return chosen, logits


def _decode_ms(runner, context: int, tokens: int = 32) -> float:
    import torch

    kv = runner.new_sequence(context + tokens + 1)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, runner.shape.vocab, (context,), generator=generator).tolist()
    token = int(runner.prefill(prompt, kv)[-1].argmax())
    started = time.perf_counter()
    for _ in range(tokens):
        token = int(runner.decode([(token, kv)])[-1].argmax())
    return (time.perf_counter() - started) / tokens * 1e3


def compare_kv_caches(model_path: str, low_bit: str, tokens: int = 48, contexts=(128, 1024)) -> dict:
    import torch

    from fastchat_bigdl.engine.selection import KV_CACHE_DTYPES, build_lean_runner
    from fastchat_bigdl.lowbit.backend import resolve_backend
    from fastchat_bigdl.lowbit.devices import use_physical_cores
    from fastchat_bigdl.lowbit.loader import load_low_bit_model

    use_physical_cores()
    backend = resolve_backend()
    model, tokenizer = load_low_bit_model(model_path, low_bit=low_bit, torch_dtype=torch.float32, backend=backend)
    runner = build_lean_runner(model, backend, "cpu", kv_cache_dtype="fp32")
    prompts = [_prompt_ids(tokenizer, text) for text in PROMPTS]
    contexts = [c for c in contexts if c + 32 <= runner.shape.context]
    reference = [_greedy(runner, p, tokens) for p in prompts]
    result: Dict[str, dict] = {}
    for name, dtype in KV_CACHE_DTYPES.items():
        runner.kv_dtype = dtype
        entry = {"bytes_per_position": runner.kv_bytes_per_position(),
                 "decode_ms": {str(c): min(_decode_ms(runner, c) for _ in range(3)) for c in contexts}}
        if name != "fp32":
            entry.update(_agreement(runner, prompts, reference, tokens))
        result[name] = entry
    runner.kv_dtype = torch.float32
    runner.new_sequence = functools.partial(_nudged_sequence, runner)
    result[NUDGED] = _agreement(runner, prompts, reference, tokens)
    return {"model": model_path, "low_bit": low_bit, "tokens": tokens, "prompts": len(prompts),
            "threads": torch.get_num_threads(), "types": result}


NUDGED = "fp32-nudged"
NUDGE = 1e-6


class _NudgedKV(SequenceKV):
    def write(self, layer: int, start: int, keys, values) -> None:
        super().write(layer, start, keys * (1 + NUDGE), values)


def _nudged_sequence(runner, expected_positions: int = 0) -> SequenceKV:
    s = runner.shape
    return _NudgedKV(s.layers, s.kv_heads, s.head_dim, runner.kv_dtype, max(1, expected_positions), s.context)


def _agreement(runner, prompts, reference, tokens: int) -> dict:
    matched, identical, errors = [], 0, []
    for prompt, (ref_tokens, ref_logits) in zip(prompts, reference):
        ours, _ = _greedy(runner, prompt, tokens)
        same = next((i for i, (a, b) in enumerate(zip(ours, ref_tokens)) if a != b), tokens)
        matched.append(same)
        identical += same == tokens
        _, forced = _greedy(runner, prompt, tokens, forced=ref_tokens)
        errors += [float((a - b).abs().max() / b.abs().max()) for a, b in zip(forced, ref_logits)]
    return {"tokens_before_first_difference": matched, "identical_answers": identical,
            "logit_error_max": max(errors), "logit_error_mean": sum(errors) / len(errors)}


def run_kv_cache_compare(model_path: str, low_bit: str, out: Path) -> dict:
    """``compare_kv_caches`` in a child process (the stacks measured next get a quiet machine)."""
    import os
    import subprocess

    subprocess.run([sys.executable, "-m", "fastchat_bigdl.bench.kv_cache_compare", "--model-path", model_path,
                    "--low-bit", low_bit, "--json", str(out)], check=True,
                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.read_text())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastchat_bigdl.bench.kv_cache_compare", description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--low-bit", default="sym_int4")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    result = compare_kv_caches(args.model_path, args.low_bit, args.tokens)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
