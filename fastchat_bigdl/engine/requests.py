"""What a token loop asks the engine for, instead of calling the model itself.

A token loop (``worker.generation.token_loop``) is a generator: it yields one of these
and receives the answer through ``send``, or yields an output chunk for its client.
Handing the model calls to the engine lets one thread run the model for every stream
and put the decode steps of all streams into one batched call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

from fastchat_bigdl.engine.kv_cache import SequenceKV


@dataclass
class Prefill:
    """Prompt tokens after ``kv.length``; answered with the last token's logits [1, vocab]
    (every token's with ``all_logits``)."""
    tokens: List[int]
    kv: SequenceKV
    all_logits: bool = False


@dataclass
class Decode:
    """One generated token; answered with its logits [1, vocab]. Batched with the other
    streams' decode steps."""
    token: int
    kv: SequenceKV


@dataclass
class Compute:
    """Anything else on the model thread (the Hugging Face forward): run alone, answered
    with ``fn()``'s result."""
    fn: Callable[[], object]


@dataclass
class Reserve:
    """Bytes of KV cache to hold before allocating it (``engine.kv_budget``); answered
    with a ``Reservation`` once the engine's budget grants them, in arrival order (or
    with ``NeverFits`` raised in the loop). ``what`` names the request in that error."""
    nbytes: int
    what: str = "this request"
    waited: bool = False
    prompt: Sequence[int] = ()  # its tokens: the prefix-cache entry it will take out is spared


REQUESTS = (Prefill, Decode, Compute, Reserve)
