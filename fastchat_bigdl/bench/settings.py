"""What the benchmark measures: the settings of one run, the labels of the stacks, and
the prompts (the same for every stack, so each prefills the same tokens)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Tuple

from fastchat_bigdl.bench.random_model import LlamaShape, words

OURS, STOCK = "fastchat-bigdl", "stock-fastchat"
STOCK_BF16 = STOCK + "-bf16"  # the best stock FastChat can do where fp32 does not fit
LLAMA_CPP = "llama.cpp"
# Same prompt format for both stacks, so both prefill the same number of tokens.
CONV_TEMPLATE = "vicuna_v1.1"
SYSTEM = "A chat between a user and an assistant."
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
    profile: bool = False
    kv_cache: bool = False  # also compare the KV cache types in-process (bench.kv_cache_compare)
    concurrency: Tuple[int, ...] = ()  # streams at once, for the sweep (ours only)
    stock_dtypes: Tuple[str, ...] = ("float32",)  # stock FastChat is measured in each, in order
    long_prompt_tokens: int = 0  # also the TTFT of one prompt this long (0: not measured)
    agent_chat_turns: int = 0  # also an AutoGen two-agent chat against ours (0: not run)
    memory_limit_mb: Optional[float] = None  # a worker's resident memory limit (None: available - 2 GiB)
    long_chat_tokens: int = 0  # also an agent chat grown to this many tokens of history (ours; 0: not run)
    memory_cgroup_mb: Optional[float] = None  # our worker inside a memory cgroup this big (bench.memory_cgroup)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


def stock_label(dtype: str) -> str:
    return STOCK_BF16 if dtype == "bfloat16" else STOCK


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
